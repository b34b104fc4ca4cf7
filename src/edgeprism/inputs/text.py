"""Text ↔ token ids, from a checkpoint folder's own files.

Two tokenizers, one contract (`TextTokenizer`):

- `FileTokenizer`: the folder's ``tokenizer.json`` read with the `tokenizers` library. Special tokens are added
  exactly as the file's post-processor says ([CLS]/[SEP] for BERT, BOS for Llama-style templates). The file's own
  padding and truncation settings are switched off (all-MiniLM-L6-v2's file pads and truncates to 128!): callers
  pad to the longest row and truncate only when asked, so nothing is cut silently.
- `ByteTokenizer`: the byte-level convention of edgeprism's gpt2-shakespeare fixture. A folder with no
  ``tokenizer.json`` whose ``config.json`` says ``vocab_size`` 257 and ``bos_token_id == eos_token_id == 256``:
  ids 0..255 are the UTF-8 bytes of the text and id 256 separates documents (BOS/EOS). Decoding drops 256 and
  replaces invalid UTF-8 with U+FFFD.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

BYTE_VOCAB_SIZE = 257
BYTE_SEPARATOR_ID = 256
"""Byte-level convention: ids 0..255 are bytes, 256 is BOS/EOS (scripts/train_tiny_gpt2.py, EOS_ID)."""


@dataclass(frozen=True)
class Encoded:
    """One text's tokens with special tokens added; `num_content` counts the tokens of the text itself."""

    ids: tuple[int, ...]
    type_ids: tuple[int, ...]
    num_content: int
    num_untruncated: int
    """Length the text would have with special tokens and no truncation."""


class TextTokenizer(Protocol):
    vocab_size: int
    num_special_tokens: int
    """Special tokens added around one text (2 for BERT's [CLS] ... [SEP])."""
    source: str

    def encode(self, text: str, max_tokens: int | None = None) -> Encoded:
        """Token ids with special tokens; content cut so the total fits `max_tokens` when given."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError as exc:
        raise ModuleNotFoundError("reading tokenizer.json needs the tokenizers library: "
                                  "pip install 'edgeprism[serve]' (or pip install tokenizers)") from exc
    return tokenizers


@dataclass(frozen=True, eq=False)
class FileTokenizer:
    """A ``tokenizer.json`` with its padding and truncation switched off (set once, at load)."""

    tokenizer: object
    """A `tokenizers.Tokenizer`; only its thread-safe encode/decode/post_process are called after load."""
    vocab_size: int
    num_special_tokens: int
    source: str

    @classmethod
    def load(cls, path: Path) -> FileTokenizer:
        tokenizers = _require_tokenizers()
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"{path} could not be read as a tokenizers file ({err})") from None
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return cls(tokenizer, tokenizer.get_vocab_size(with_added_tokens=True),
                   tokenizer.num_special_tokens_to_add(is_pair=False), str(path))

    def encode(self, text: str, max_tokens: int | None = None) -> Encoded:
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        num_content = len(encoding.ids)
        if max_tokens is not None and num_content + self.num_special_tokens > max_tokens:
            encoding.truncate(max_tokens - self.num_special_tokens)
        # What Tokenizer.encode(text) does after tokenizing: the post-processor adds the special tokens.
        encoding = self.tokenizer.post_process(encoding, add_special_tokens=True)
        return Encoded(tuple(encoding.ids), tuple(encoding.type_ids), num_content,
                       num_content + self.num_special_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; 256 = BOS/EOS, never produced by `encode`, dropped by `decode`."""

    vocab_size: int = BYTE_VOCAB_SIZE
    num_special_tokens: int = 0
    source: str = "byte-level (ids 0..255 = UTF-8 bytes, 256 = BOS/EOS)"

    def encode(self, text: str, max_tokens: int | None = None) -> Encoded:
        ids = tuple(text.encode("utf-8"))
        num_content = len(ids)
        if max_tokens is not None:
            ids = ids[:max_tokens]
        return Encoded(ids, (0,) * len(ids), num_content, num_content)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i != BYTE_SEPARATOR_ID).decode("utf-8", errors="replace")


def is_byte_level(hf_config: dict) -> bool:
    """The gpt2-shakespeare convention: vocab 257 with BOS = EOS = 256 (and no tokenizer.json beside it)."""
    return (hf_config.get("vocab_size") == BYTE_VOCAB_SIZE
            and hf_config.get("bos_token_id") == BYTE_SEPARATOR_ID
            and hf_config.get("eos_token_id") == BYTE_SEPARATOR_ID)


def load_tokenizer(folder: Path, hf_config: dict, model_name: str, vocab_size: int) -> TextTokenizer:
    """The folder's tokenizer.json, else the byte-level convention, else a ValueError saying what is missing."""
    path = folder / "tokenizer.json"
    if path.is_file():
        tokenizer: TextTokenizer = FileTokenizer.load(path)
    elif is_byte_level(hf_config):
        tokenizer = ByteTokenizer()
    else:
        raise ValueError(f"{folder} has no tokenizer.json, and its config.json (vocab_size "
                         f"{hf_config.get('vocab_size')}, bos/eos {hf_config.get('bos_token_id')}/"
                         f"{hf_config.get('eos_token_id')}) is not the byte-level convention (vocab 257, "
                         f"bos = eos = 256); {model_name} needs the checkpoint's tokenizer.json for text")
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{tokenizer.source} has {tokenizer.vocab_size} token ids but {model_name} embeds only "
                         f"{vocab_size}; the tokenizer does not belong to this model")
    return tokenizer


def sentence_max_tokens(folder: Path) -> int | None:
    """``max_seq_length`` of a sentence-transformers folder (``sentence_bert_config.json``), if any."""
    path = folder / "sentence_bert_config.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get("max_seq_length")
    return int(value) if value else None
