"""The evaluation sets behind `edgeprism eval`: real weights and data, all offline (docs/DATA.md).

- minilm-l6: all-MiniLM-L6-v2 + the CLINC150 intent head; passages of 128-256 tokens and short queries.
- dinov2-s14: DINOv2-S/14 + a linear probe fitted on Fashion-MNIST train features (single device).
- gpt2-shakespeare: the project's byte-level GPT-2 fixture; held-out next-byte agreement (the budget
  metric of decoders, `evaluate.metrics`) and perplexity.
- *-test presets: random weights and synthetic inputs (fast; for tests of the harness itself).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from edgeprism.evaluate.fidelity import EvalSet, embedding_score, fit_linear_probe, next_token_score, probe_score
from edgeprism.models.base import Inputs

log = logging.getLogger(__name__)

EVAL_MODELS = ("minilm-l6", "dinov2-s14", "gpt2-shakespeare")


def _pad_batches(encodings: list[list[int]], batch_size: int, pad_id: int = 0) -> list[Inputs]:
    """Token-id lists → right-padded batches (rows sorted by length to waste little padding)."""
    order = sorted(range(len(encodings)), key=lambda i: len(encodings[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = [encodings[i] for i in order[start:start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):
            ids[j, :len(row)] = torch.tensor(row)
            mask[j, :len(row)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    return batches


def minilm_sets(limit: int = 200, query_limit: int = 200, batch_size: int = 1,
                checkpoint: str | None = None) -> list[EvalSet]:
    from edgeprism import assets
    from edgeprism.assets.datasets import short_queries, text_passages
    from edgeprism.models.loading import load_model

    model = load_model("minilm-l6", checkpoint or assets.minilm_checkpoint_dir())
    tokenizer = assets.minilm_tokenizer(max_length=512)
    head = assets.intent_head()
    passages = text_passages(tokenizer, 128, 256, limit=limit)
    queries = short_queries("intent", limit=query_limit)
    sets = []
    for name, texts in (("passages", passages), ("queries", queries)):
        encodings = [e.ids for e in tokenizer.encode_batch(texts)]
        sets.append(EvalSet(f"minilm-{name}", model, _pad_batches(encodings, batch_size),
                            embedding_score(head), description=f"{len(texts)} {name}"))
    return sets


def dinov2_set(limit: int = 200, train_limit: int = 1000, image_size: int = 224, batch_size: int = 8,
               progress: Callable[[str], None] | None = None, checkpoint: str | None = None) -> list[EvalSet]:
    from edgeprism import assets
    from edgeprism.assets.datasets import fashion_mnist, to_dinov2_input
    from edgeprism.models.loading import load_model

    model = load_model("dinov2-s14", checkpoint or assets.dinov2_checkpoint_dir())
    test_images, test_labels = fashion_mnist("test", limit=limit)
    probe = _cached_probe(model, train_limit, image_size, batch_size, progress)
    batches = [{"pixel_values": to_dinov2_input(test_images[s:s + batch_size], image_size)}
               for s in range(0, len(test_images), batch_size)]
    return [EvalSet("dinov2-fashion-mnist", model, batches,
                    probe_score(probe, torch.from_numpy(test_labels.astype("int64"))),
                    description=f"{len(test_images)} test images, probe fitted on {train_limit} training images")]


def _cached_probe(model, train_limit: int, image_size: int, batch_size: int,
                  progress: Callable[[str], None] | None) -> torch.nn.Linear:
    """The Fashion-MNIST linear probe on single-device [CLS] features, fitted once and kept in the cache
    (keyed by the weights' fingerprint, the training-set size, the image size and the preprocessing's
    fingerprint: a probe fitted on other inputs is never reused)."""
    import hashlib

    from safetensors.torch import load_file, save_file

    from edgeprism import assets
    from edgeprism.assets.datasets import dinov2_input_fingerprint, fashion_mnist, to_dinov2_input

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items())[:8]:
        digest.update(name.encode() + tensor.numpy().tobytes()[:4096])
    name = f"fmnist-{digest.hexdigest()[:12]}-{train_limit}-{image_size}-{dinov2_input_fingerprint(image_size)}"
    path = assets.cache_dir() / "probes" / f"{name}.safetensors"
    probe = torch.nn.Linear(model.config.hidden_size, 10)
    if path.exists():
        probe.load_state_dict(load_file(str(path)))
        return probe
    train_images, train_labels = fashion_mnist("train", limit=train_limit)
    features = []
    with torch.no_grad():
        for start in range(0, len(train_images), batch_size):
            pixels = to_dinov2_input(train_images[start:start + batch_size], image_size)
            features.append(model({"pixel_values": pixels})["pooled"])
            if progress and (start // batch_size) % 25 == 0:
                progress(f"probe features {start + len(pixels)}/{len(train_images)}")
    probe = fit_linear_probe(torch.cat(features), torch.from_numpy(train_labels.astype("int64")), 10)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, str(path))
    return probe


def gpt2_set(limit: int = 64, window: int = 256, batch_size: int = 8, checkpoint: str | None = None) -> list[EvalSet]:
    from edgeprism import assets
    from edgeprism.assets.datasets import gpt2_heldout_bytes
    from edgeprism.models.loading import load_pretrained

    model = load_pretrained(checkpoint or assets.gpt2_shakespeare_dir(), "gpt2-shakespeare")
    window = min(window, model.config.max_positions)
    data = torch.tensor(list(gpt2_heldout_bytes()), dtype=torch.long)
    windows = data[: (len(data) // window) * window].view(-1, window)[:limit]
    batches = [{"input_ids": windows[s:s + batch_size]} for s in range(0, len(windows), batch_size)]
    return [EvalSet("gpt2-heldout", model, batches, next_token_score(model, batches),
                    gather_hidden=True, description=f"{len(windows)} windows of {window} held-out bytes")]


def synthetic_set(model_name: str, batches: int = 4, batch_size: int = 2, seq_len: int = 32) -> list[EvalSet]:
    """Random weights, random inputs: for testing the harness, not for fidelity claims."""
    from edgeprism.evaluate.fidelity import MetricValue
    from edgeprism.models.loading import build_model
    from edgeprism.models.synthetic import pads_rows, synthetic_inputs

    model = build_model(model_name, seed=11)
    inputs = [synthetic_inputs(model.config, batch_size, seq_len=seq_len, padded=pads_rows(model.config),
                               seed=100 + i) for i in range(batches)]
    if model.config.causal:  # a decoder: next-token agreement (its budget metric) and perplexity
        return [EvalSet(f"{model_name}-synthetic", model, inputs, next_token_score(model, inputs), gather_hidden=True)]

    def cosine(reference, candidate):
        key = "mean"
        ref = torch.cat([r[key] for r in reference])
        got = torch.cat([c[key] for c in candidate])
        return [MetricValue("embedding_cosine", float(torch.nn.functional.cosine_similarity(ref, got).mean()), 1.0)]

    return [EvalSet(f"{model_name}-synthetic", model, inputs, cosine)]


def eval_sets_for(model: str, limit: int | None = None, progress: Callable[[str], None] | None = None,
                  **kwargs) -> list[EvalSet]:
    if model == "minilm-l6":
        return minilm_sets(limit=limit or 200, query_limit=limit or 200, **kwargs)
    if model == "dinov2-s14":
        return dinov2_set(limit=limit or 200, progress=progress, **kwargs)
    if model == "gpt2-shakespeare":
        return gpt2_set(limit=limit or 64, **kwargs)
    if model.endswith("-test"):
        if kwargs.get("checkpoint"):
            raise ValueError(f"--checkpoint: {model} is a synthetic smoke preset with random weights")
        return synthetic_set(model)
    raise ValueError(f"no evaluation set for {model!r}; choose one of {', '.join(EVAL_MODELS)} "
                     f"(or a *-test preset for a synthetic smoke run)")


def fashion_mnist_probe(model, train_limit: int = 1000, image_size: int = 224,
                        progress: Callable[[str], None] | None = None) -> torch.nn.Linear:
    """The DINOv2 Fashion-MNIST linear probe the `dinov2-s14` set scores with (fitted once, then cached)."""
    return _cached_probe(model, train_limit, image_size, 8, progress)
