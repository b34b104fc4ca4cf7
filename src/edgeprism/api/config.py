"""`ApiConfig`: how the HTTP API batches, bounds and names what it serves (sizes in bytes, times in seconds)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from edgeprism.runtime.serving import OutputsMode


@dataclass(frozen=True)
class ApiConfig:
    """How the HTTP API batches, bounds and names what it serves. Sizes in bytes, times in seconds."""

    model_name: str | None = None
    """The public model name clients put in `"model"` (and /v1/models lists); None: the engine's model name."""
    dynamic_batching: bool = True
    """Merge concurrent requests of the same kind into one engine call (api.batching). Off: one call per request."""
    batch_window_s: float = 0.005
    """How long after the first request of a batch arrives the engine thread waits for more to merge with it.
    Requests that queued while the engine was busy merge at once, whatever the window."""
    max_batch: int | None = None
    """Rows per engine call (merged requests included); None: the engine's `config.max_batch`."""
    max_body_bytes: int = 16 << 20
    """Largest request body (16 MiB); larger bodies get 413 before they are parsed."""
    max_texts: int | None = None
    """Most texts (embeddings), prompts (completions) or images (classify) in one request; None: `max_batch`.
    One request is one engine call at most, so this cannot exceed `max_batch`."""
    max_completion_tokens: int = 256
    """Largest `max_tokens` a completion may ask for (also bounded by the model's positions)."""
    outputs_mode: OutputsMode = "summary"
    """What POST /infer returns of the outputs: shapes (and logits argmax), every value, or nothing."""
    top_k: int = 5
    """Labels per row when a classifier answers (/v1/classify, `labels` on /v1/embeddings)."""
    guard_margin: float | None = None
    """Labelled rows that a split over a reduced-precision wire answered with a top-2 score margin under this are
    rerun on one device before they are returned (runtime/guard.py); 0 turns the guard off. None: per codec,
    `GUARD_HEADROOM` × its label shift measured in the profile, `DEFAULT_GUARD_MARGIN` where unmeasured."""
    store_watch_s: float = 5.0
    """How often a fresh client probes the engine's rendezvous store for /metrics (api.store_watch); 0: never."""
    store_stall_s: float = 1.0
    """A store probe slower than this (or failed) counts as a stall."""

    def __post_init__(self) -> None:
        if not self.batch_window_s >= 0:
            raise ValueError(f"batch_window_s {self.batch_window_s} must be >= 0")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"max_batch {self.max_batch} must be >= 1")
        if self.max_texts is not None and self.max_texts < 1:
            raise ValueError(f"max_texts {self.max_texts} must be >= 1")
        if self.max_texts is not None and self.max_batch is not None and self.max_texts > self.max_batch:
            raise ValueError(f"max_texts {self.max_texts} exceeds max_batch {self.max_batch}: one request is served "
                             f"in one engine call")
        if self.store_watch_s < 0 or not self.store_stall_s > 0:
            raise ValueError(f"store_watch_s {self.store_watch_s} must be >= 0 and store_stall_s {self.store_stall_s} "
                             f"> 0")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes {self.max_body_bytes} must be >= 1")
        if self.max_completion_tokens < 1 or self.top_k < 1:
            raise ValueError(f"max_completion_tokens {self.max_completion_tokens} and top_k {self.top_k} must be >= 1")
        if self.guard_margin is not None and not 0 <= self.guard_margin < 1:
            raise ValueError(f"guard_margin {self.guard_margin} must be in [0, 1): a difference of two probabilities "
                             f"(0 turns the near-tie guard off)")
        if self.outputs_mode not in ("summary", "full", "none"):
            raise ValueError(f"outputs_mode {self.outputs_mode!r} must be summary, full or none")
        if self.model_name is not None and not self.model_name.strip():
            raise ValueError("model_name must not be blank")

    def resolved(self, engine_max_batch: int, engine_model_name: str) -> ApiConfig:
        """This config with the engine's defaults filled in (and checked against the engine's max batch)."""
        max_batch = engine_max_batch if self.max_batch is None else self.max_batch
        if max_batch > engine_max_batch:
            raise ValueError(f"max_batch {max_batch} exceeds the engine's max batch {engine_max_batch}")
        max_texts = max_batch if self.max_texts is None else self.max_texts
        return replace(self, max_batch=max_batch, max_texts=max_texts,
                       model_name=self.model_name or engine_model_name)


__all__ = ["ApiConfig", "OutputsMode"]
