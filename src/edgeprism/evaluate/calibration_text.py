"""What a calibrated codec (`tc:`, `evaluate.calibrated.calibrate_codec`) is fitted on, for text models:
each calibration passage, then short sentences of that passage and of everyday English, as requests.

Why: passages of 128-256 tokens alone are a poor sample of what a short request exchanges. A query of ~10
tokens split over 2 ranks is ~5 tokens per rank, one of them [CLS] or [SEP] (20 % of its vectors against
~1 % in a passage), its tokens' states come from attention over a handful of positions, and each token's
error weighs ~20x more in the mean-pooled output. Fitted on passages only, the codec's error on short
queries was the largest of any set (MiniLM, worst of 5 draws: pooled cosine 0.99974 on intent queries
against 0.99990 on passages), and one near-tied query flipped in 3 of 5 draws.

The rule (`calibration_texts`): after each passage, up to `SHORT_PER_PASSAGE` of its sentences (split at
. ! ? ; : and line ends) of `SHORT_TOKENS` tokens, evenly strided through the passage, then its even share
of the committed everyday sentences (`everyday_sentences`, even lines; modern English, unlike the plays).
Nothing random: the same passages give the same texts. Chosen on dev sets carved from the calibration
sources only (MiniLM, 2 ranks, 8x, calibration samples 0-1; mean pooled cosine):

| calibration requests | 150 short play questions (in no pool passage) | 100 everyday (odd lines) | 40 pool passages |
|---|---|---|---|
| passages only (before; sample 0) | 0.99981 | 0.99984 | 0.99992 |
| + 5 own short sentences each | 0.99990 / 0.99991 | 0.99991 / 0.99992 | 0.99995 / 0.99995 |
| + everyday sentences (the rule) | 0.99991 / 0.99991 | 0.99992 / 0.99993 | 0.99995 / 0.99996 |
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from edgeprism import assets

SHORT_PER_PASSAGE = 5
"""Short sentences mixed in after each calibration passage (0: passages only, the rule before)."""

SHORT_TOKENS = (6, 24)
"""Token range (special tokens included) of a mixed-in sentence: the lengths of short conversational requests."""

EVERYDAY_FILE = "everyday.txt"
"""Short modern English sentences under `assets.TEXT_DIR` (written for the project, see its SOURCE.md)."""

_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n")


def sentences(text: str) -> list[str]:
    """The sentences of `text` (split after . ! ? ; : and at line ends), whitespace-normalised, in order."""
    return [" ".join(part.split()) for part in _SENTENCE_END.split(text) if part.strip()]


def short_sentences(text: str, tokenizer, count: int = SHORT_PER_PASSAGE,
                    tokens: tuple[int, int] = SHORT_TOKENS) -> list[str]:
    """Up to `count` sentences of `text` whose tokenized length (special tokens included) lies in `tokens`,
    evenly strided through the passage (first, then every len/count-th), in passage order."""
    low, high = tokens
    if not 0 < low <= high:
        raise ValueError(f"short sentences need 0 < min <= max tokens; got {tokens}")
    if count < 0:
        raise ValueError(f"short sentences per passage must be >= 0; got {count}")
    candidates = sentences(text)
    lengths = [len(e.ids) for e in tokenizer.encode_batch(candidates)] if candidates else []
    fitting = [s for s, n in zip(candidates, lengths) if low <= n <= high]
    if count == 0 or not fitting:
        return []
    if len(fitting) <= count:
        return fitting
    return [fitting[i * len(fitting) // count] for i in range(count)]


def everyday_sentences(split: Literal["calibration", "dev"] = "calibration") -> list[str]:
    """The committed everyday sentences (`EVERYDAY_FILE`): even lines are calibration data, odd lines dev."""
    if split not in ("calibration", "dev"):
        raise ValueError(f"everyday sentences split {split!r}; choose 'calibration' or 'dev'")
    lines = [line.strip() for line in (assets.TEXT_DIR / EVERYDAY_FILE).read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    return lines[0::2] if split == "calibration" else lines[1::2]


def calibration_texts(passages: Sequence[str], tokenizer, per_passage: int = SHORT_PER_PASSAGE,
                      tokens: tuple[int, int] = SHORT_TOKENS, extra: Sequence[str] = ()) -> list[str]:
    """Each passage, then its short sentences (`short_sentences`), then its even share of `extra` (short texts
    of another domain, e.g. `everyday_sentences()`, in order: passage k of n gets extra[k·E/n : (k+1)·E/n]):
    the requests a text codec is calibrated on, one request per text (batch 1), in this order
    (`calibrate_codec` measures layer sensitivity on the first ones, so every kind counts there)."""
    out: list[str] = []
    n = len(passages)
    for k, passage in enumerate(passages):
        out += [passage, *short_sentences(passage, tokenizer, per_passage, tokens),
                *extra[k * len(extra) // n:(k + 1) * len(extra) // n]]
    return out
