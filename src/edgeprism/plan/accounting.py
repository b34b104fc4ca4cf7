"""Bytes exchanged and FLOPs per rank for one position-wise request: pure arithmetic, no I/O.

Exchange (docs/ARCHITECTURE.md, rules 2 and 9): before every block, each rank sends its codec message of the
residual stream entering that block, so a request makes `num_layers` exchanges. Rank p's message
is `codec.nbytes(batch, n_p, d)` — values, scales and counts included — and it stands for
`num_vectors(codec, n_p)` key/value rows at the receiver (S_p = ceil(n_p / c) for Segment Means,
plus anchor slots). The final output rows sent to rank 0 are not counted (a few vectors per request).

Two flows:
- "all_gather": every rank receives every other rank's message (encoders, and decoders that do not
  exploit causality).
- "to_higher_ranks": decoders with the partition-aware causal mask — rank p's message is needed only
  by ranks q > p, so the last rank sends nothing and rank p receives only from ranks q < p.

FLOP convention (matmul FLOPs, 2 per multiply-add, per layer, for a rank with n own tokens that
attends to r remote vectors, batch B; single device: n = N, r = 0):

    Q projection        2·B·n·d²
    K, V projections    2·2·B·(n + r)·d·d_kv     (d_kv = kv_heads·head_dim, d without grouped-query attention;
                                                  n alone where blocks exchange rotated K/V: received rows
                                                  arrive projected; a kv share's projected rows likewise)
    scores QKᵀ, A·V     2·2·B·n·(n + r)·d        (dense: a causal mask does not skip work)
    output projection   2·B·n·d²
    MLP                 2·m·B·n·d·d_mlp          (m = 2 matrices; 3 for SwiGLU)

Bytes are charged at the model's `exchange_width` per token (the hidden size, or 2·d_kv for blocks that
exchange keys and values: SmolLM2 sends 384 features per token, not 576).

LayerNorm, softmax, GELU, biases, residual adds, embeddings and the task head are left out: at
BERT-base sizes the elementwise work is under 0.5 % of a layer (256 tokens: ≈ 0.015 GFLOP against
3.8 GFLOP of matmuls, counting ~5 FLOPs per LayerNorm/softmax element and ~8 per GELU) and it scales
like the matmuls next to it; counting it moves the figure below from 51.24 % to about 51.26 %.
With this convention BERT-base, 256 tokens, 2 equal ranks, c = 128 gives 51.24 % less compute per
device and 99.22 % less communication than full exchange — the figures of docs/ARCHITECTURE.md rule 9.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Literal

import torch

from edgeprism.compress.base import Codec, IdentityCodec
from edgeprism.compress.codecs import SegmentMeansCodec
from edgeprism.compress.kvshare import KVShareCodec
from edgeprism.compress.registry import get_codec, num_vectors, request_nbytes
from edgeprism.models.config import ModelConfig

Flow = Literal["all_gather", "to_higher_ranks"]
FLOWS: tuple[Flow, ...] = ("all_gather", "to_higher_ranks")


def layer_flops(config: ModelConfig, num_own_tokens: int, num_remote_vectors: int = 0, batch: int = 1,
                num_remote_projected: int | None = None) -> int:
    """Matmul FLOPs of one block for `num_own_tokens` queries over own + remote keys (module convention);
    `num_remote_projected`: of the remote vectors, those this rank projects itself (None: all, or none where blocks
    exchange rotated K/V; a kv share, compress/kvshare.py, sends the rest projected)."""
    d, d_mlp, d_kv = config.hidden_size, config.intermediate_size, config.kv_heads * config.head_dim
    n, kv = num_own_tokens, num_own_tokens + num_remote_vectors
    if num_remote_projected is None:
        num_remote_projected = 0 if config.exchanges_kv else num_remote_vectors
    projected = n + num_remote_projected  # K/V rows this rank projects
    q_and_out = 2 * 2 * n * d * d
    k_and_v = 2 * 2 * projected * d * d_kv
    attention = 2 * 2 * n * kv * d
    mlp = 2 * config.mlp_matrices * n * d * d_mlp
    return batch * (q_and_out + k_and_v + attention + mlp)


def single_device_flops(config: ModelConfig, num_tokens: int, batch: int = 1) -> int:
    """Matmul FLOPs of the whole layer stack on one device (every token, no remote vectors)."""
    return config.num_layers * layer_flops(config, num_tokens, 0, batch)


@dataclass(frozen=True)
class ExchangeCost:
    """Cost of one request under a position-wise plan. Per-rank tuples are indexed by group rank."""

    model: str
    codec: str
    flow: Flow
    batch: int
    token_shares: tuple[int, ...]
    num_layers: int
    remote_vectors_per_rank: tuple[int, ...]
    """Key/value rows each rank receives from other ranks per row of the batch (per layer)."""
    message_bytes_per_rank: tuple[int, ...]
    """Bytes rank p sends per layer (0 for the last rank under "to_higher_ranks"). For a codec whose
    message changes by layer (delta coding) the per-layer fields are layer 0's (the key frame)."""
    received_bytes_per_rank: tuple[int, ...]
    """Bytes rank p receives per layer."""
    bytes_per_layer: int
    """Sum of the messages sent in one exchange, each counted once (sum_p S_p·d·bytes + counts, scales)."""
    bytes_per_request: int
    """Every layer's messages summed: bytes_per_layer × num_layers, except for codecs whose message
    changes by layer (`compress.request_nbytes`)."""
    padded_allgather_bytes_per_layer: int
    """What one GLOO all-gather with equal buffers moves: ranks × largest message."""
    full_exchange_bytes_per_request: int
    """The same flow with fp32 full-tensor exchange (c = 1): the communication baseline."""
    flops_per_layer_per_rank: tuple[int, ...]
    flops_per_rank: tuple[int, ...]
    """Matmul FLOPs of the whole layer stack per rank (module docstring convention)."""
    flops_single_device: int

    @property
    def communication_saving_fraction(self) -> float:
        """1 − bytes / full-exchange bytes (0 for c = 1 fp32; 0 when nothing is exchanged)."""
        if self.full_exchange_bytes_per_request == 0:
            return 0.0
        return 1.0 - self.bytes_per_request / self.full_exchange_bytes_per_request

    @property
    def compute_saving_fraction(self) -> float:
        """1 − (busiest rank's FLOPs) / (single device's FLOPs)."""
        return 1.0 - max(self.flops_per_rank) / self.flops_single_device

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> ExchangeCost:
        tuples = {f.name for f in dataclasses.fields(cls) if str(f.type).startswith("tuple")}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in data.items()})  # type: ignore[arg-type]

    def __str__(self) -> str:
        shares = "+".join(map(str, self.token_shares))
        return (f"{self.model} {shares} tokens ×{self.batch} {self.codec} ({self.flow}): "
                f"{self.bytes_per_request} B/request ({self.communication_saving_fraction:.1%} less than full), "
                f"busiest rank {max(self.flops_per_rank) / 1e9:.2f} GFLOP "
                f"({self.compute_saving_fraction:.1%} less than one device)")


def _as_codec(codec: Codec | int | str) -> Codec:
    if isinstance(codec, bool):
        raise ValueError(f"codec {codec!r} is not a codec, a ratio or a codec name; e.g. 4, 'sm4+int8'")
    if isinstance(codec, int):
        if codec < 1:
            raise ValueError(f"compression ratio {codec} must be >= 1 (1 = full exchange)")
        return SegmentMeansCodec(codec)
    if isinstance(codec, str):
        return get_codec(codec)
    return codec


def exchange_cost(config: ModelConfig, token_shares: tuple[int, ...] | list[int], codec: Codec | int | str,
                  batch: int = 1, flow: Flow = "all_gather") -> ExchangeCost:
    """Bytes and FLOPs of one request split as `token_shares` (tokens per rank, in rank order).

    `codec` is a Codec, a codec name ("sm4a+int8"), or an integer compression ratio c (Segment Means,
    fp32 means, uint8/int16 counts). One share is a single device: nothing is exchanged.
    """
    shares = tuple(int(n) for n in token_shares)
    if not shares or any(n < 0 for n in shares) or sum(shares) == 0:
        raise ValueError(f"token shares {list(token_shares)} must be one non-negative count per rank, "
                         f"summing to at least 1")
    if batch < 1:
        raise ValueError(f"batch {batch} must be >= 1")
    if flow not in FLOWS:
        raise ValueError(f"flow {flow!r} is not one of {', '.join(FLOWS)}")
    codec = _as_codec(codec)
    d, ranks = config.exchange_width, len(shares)  # features per token on the wire

    def senders_to(p: int) -> range:
        return range(p) if flow == "to_higher_ranks" else range(ranks)

    def message_bytes(c: Codec) -> list[int]:
        sends = [ranks > 1 and (flow == "all_gather" or p < ranks - 1) for p in range(ranks)]
        return [c.nbytes(batch, n, d) if send else 0 for n, send in zip(shares, sends)]

    messages = message_bytes(codec)
    # A stateful codec's message changes by layer (delta: key frame, then residuals): sum every layer.
    request_messages = [request_nbytes(codec, config.num_layers, batch, n, d) if m else 0
                        for n, m in zip(shares, messages)]
    vectors = [num_vectors(codec, n) for n in shares]
    remote = [sum(vectors[q] for q in senders_to(p) if q != p) for p in range(ranks)]
    received = [sum(messages[q] for q in senders_to(p) if q != p) for p in range(ranks)]
    kv_sent = [codec.kv_tokens(n) if isinstance(codec, KVShareCodec) else 0 for n in shares]  # sent projected
    projected = [r - sum(kv_sent[q] for q in senders_to(p) if q != p) for p, r in enumerate(remote)]
    layer = [layer_flops(config, n, r, batch, None if config.exchanges_kv else m)
             for n, r, m in zip(shares, remote, projected)]
    full = message_bytes(IdentityCodec(torch.float32))
    return ExchangeCost(
        model=config.name, codec=codec.name, flow=flow, batch=batch, token_shares=shares,
        num_layers=config.num_layers,
        remote_vectors_per_rank=tuple(remote),
        message_bytes_per_rank=tuple(messages),
        received_bytes_per_rank=tuple(received),
        bytes_per_layer=sum(messages),
        bytes_per_request=sum(request_messages),
        padded_allgather_bytes_per_layer=ranks * max(messages) if ranks > 1 else 0,
        full_exchange_bytes_per_request=sum(full) * config.num_layers,
        flops_per_layer_per_rank=tuple(layer),
        flops_per_rank=tuple(f * config.num_layers for f in layer),
        flops_single_device=single_device_flops(config, sum(shares), batch),
    )
