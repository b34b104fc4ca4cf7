"""An encoder's layers on one rank with every exchange in flight while the rank computes (issue 16 item 2).

Per layer the rank has already started the all-gather of its own tokens' vectors; it attends over its own keys
meanwhile (partition/overlap.py), then waits, folds the received vectors in, and runs the rest of the block.

**Token chunks.** The rest of the block (output projection, MLP, norms) treats each token on its own, and so do
codecs that split by token (`compress.base.splits_by_token`: every token encoded on its own, no state). So the
rank may run that tail in `chunks` slices of its own tokens and start the next layer's all-gather of each slice
as soon as it is done: the first slices cross the link while the rank still computes the last ones, and only the
last slice's wire is left to hide behind the own-key attention. What travels is byte for byte what one message
would carry (the slices' encodings concatenated), so the answer is the unchunked one up to the float rounding of
the smaller GEMMs. It is for where nothing else hides the wire: a request of one row (micro-batches need rows).
`chunks_for` is the rule every rank applies alike (`PositionWise(token_chunks=...)`); off by default, since on
CPU-only devices it gained little (DEFAULT_TOKEN_CHUNKS).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol, cast

import torch
from torch import Tensor

from edgeprism.compress.base import WireSpec, spec_nbytes, splits_by_token
from edgeprism.compress.kvshare import KVShareCodec, kv_message, rows_to_heads
from edgeprism.models.base import SplitBlock
from edgeprism.partition.attend import exchanged_states, remote_key_bias
from edgeprism.partition.kvwire import decoded_messages, read_kv_messages
from edgeprism.partition.microbatch import LayerSteps, row_slices
from edgeprism.partition.overlap import OwnPart
from edgeprism.partition.ranges import TokenRange
from edgeprism.partition.timeline import Timeline


class TransformView(Protocol):
    """What the overlapped layers use of their `partition.transform.PositionWise` (a protocol: the transform imports
    this module)."""

    codec: Any
    model: Any
    ctx: Any
    exchanger: Any
    average: Literal["residual", "normed"]
    size_aware: bool
    timeline: Timeline

    def _encode(self, hidden: Tensor, valid: Tensor, anchor: Tensor, session: Any, layer: int) -> Tensor: ...


DEFAULT_TOKEN_CHUNKS = 1
"""Token chunks per exchange where `chunks_for` allows them: 1 (off) by default. Measured (docs/METHODOLOGY.md,
"Token chunks"): on CPU-only devices the chunks' earlier bytes cost the rank's compute what the unchunked exchange
spent in its idle wait, so they gained ~0-7 % at batch 1 (ViT-B/16, 2 devices of one core, wifi4)."""


def chunks_for(codec: object, ranges: Sequence[TokenRange], micro_batches: int, token_chunks: int) -> int:
    """How many token chunks each rank sends per layer: `token_chunks` for a request of one micro-batch whose
    codec splits by token, at most the smallest rank's token count; else 1. A function of what every rank knows
    alike (the codec, the header's ranges and micro-batches), so they all issue the same collectives."""
    if micro_batches != 1 or token_chunks <= 1 or not splits_by_token(codec):
        return 1
    return max(1, min(token_chunks, min(r.num_tokens for r in ranges)))


def overlapped_layers(pw: TransformView, hidden: Tensor, own_bias: Tensor, valid: Tensor, anchor: Tensor,
                      ranges: tuple[TokenRange, ...], slot: int, chunks: int = 1) -> LayerSteps:
    """An encoder's blocks for these rows (B_slice, n_own, d) on `pw`'s rank, each with its all-gather in flight
    while the own-token attention runs; yields once per layer with the exchange started, for `interleave` to run
    another micro-batch meanwhile (partition/microbatch.py) -> the last hidden states. `slot`: this micro-batch's
    index; `chunks`: token chunks per exchange (`chunks_for`; 1 with a kv-share codec or a codec session)."""
    codec, blocks, rank = pw.codec, pw.model.block_list(), pw.ctx.group_rank
    batch, width = hidden.shape[0], pw.model.config.exchange_width
    session = codec.session() if hasattr(codec, "session") else None  # per micro-batch
    share = codec if isinstance(codec, KVShareCodec) else None  # checked in PositionWise.__init__
    assert chunks == 1 or (session is None and share is None), "chunks need a codec that splits by token"
    pieces = [row_slices(r.num_tokens, chunks) for r in ranges]  # per rank, its token chunks (chunks_for: <= n)
    mine = pieces[rank]

    def chunk_specs(layer: int) -> list[list[WireSpec]]:
        """Per chunk, every rank's wire spec of it at `layer`."""
        if session is not None:
            return [[session.wire_spec(layer, batch, r.num_tokens, width) for r in ranges]]
        return [[codec.wire_spec(batch, p[c].stop - p[c].start, width) for p in pieces] for c in range(chunks)]

    def start(layer: int, c: int, rows: Tensor, specs: list[list[WireSpec]]):
        """Start chunk c of `layer`'s all-gather from its own rows' states -> (sent, own K/V or None, pending)."""
        block, cut = blocks[layer], mine[c]
        sent = exchanged_states(block, rows, pw.average)  # (B_slice, n_chunk, d)
        own_kv, message, message_valid = None, sent, valid[:, cut]
        if share is not None:  # the own keys and values first: a share of them travels
            own_kv = cast(SplitBlock, block).attn.project_kv(sent)  # each (B_slice, heads, n_own, head_dim)
            message, message_valid = kv_message(share, sent, own_kv, message_valid)  # (B_slice, m + 2k, d)
        payload = pw._encode(message, message_valid, anchor[:, cut], session, layer)
        sizes = [spec_nbytes(s) for s in specs[c]]
        return sent, own_kv, pw.exchanger.start_all_gather_bytes(payload, sizes, slot=slot * chunks + c)

    specs = chunk_specs(0)
    started = [start(0, c, hidden[:, cut], specs) for c, cut in enumerate(mine)]
    for layer, block in enumerate(blocks):
        split = cast(SplitBlock, block)  # `pw.overlap` checked every block once
        sent = torch.cat([s for s, _, _ in started], dim=1) if chunks > 1 else started[0][0]
        own = OwnPart(split, sent if pw.average == "normed" else block.kv_input(hidden), own_bias, kv=started[0][1])
        yield
        with pw.timeline.waiting():
            received = [pending.wait() for _, _, pending in started]
        remote_kv = None
        if share is not None:
            remote, counts, keys, values, kv_counts = read_kv_messages(share, received[0], specs[0], rank, ranges,
                                                                       sent.dtype)
            heads = own.kv[0].shape[1]
            remote_kv = rows_to_heads(keys, heads), rows_to_heads(values, heads)
            counts = torch.cat([counts, kv_counts], dim=1)
        else:
            remote, counts = read_chunks(pw, received, specs, sent, session, layer)
        remote_bias = remote_key_bias(counts, pw.size_aware, hidden.dtype)  # (B_slice, 1, 1, S_remote)
        remote_kv_in = block.kv_input(remote) if pw.average == "residual" else remote
        attended, _ = own.attend(remote_kv_in, remote_bias, remote_kv=remote_kv)  # encoders keep no cache
        last = layer + 1 == len(blocks)
        if session is not None and not last:  # a stateless codec's wire shapes are the same at every layer
            specs = chunk_specs(layer + 1)
        outputs, started = [], []
        for c, cut in enumerate(mine):  # the tail per token chunk, each chunk's next exchange started at once
            outputs.append(split.after_attention(hidden[:, cut], attended[:, cut]))
            if not last:
                started.append(start(layer + 1, c, outputs[-1], specs))
        hidden = torch.cat(outputs, dim=1) if chunks > 1 else outputs[0]
    return hidden


def read_chunks(pw: TransformView, received: Sequence[Sequence[Tensor | None]], specs: Sequence[Sequence[WireSpec]],
                hidden: Tensor, session, layer: int) -> tuple[Tensor, Tensor]:
    """What `pw`'s rank may read of one exchange received in chunks (per chunk, every rank's payload or None, and
    its wire spec) -> (B, S_remote, d), (B, S_remote): senders in rank order, each sender's chunks in order."""
    rank = pw.ctx.group_rank
    batch, _, d = hidden.shape
    decode = (lambda q, wire: session.decode(layer, q, wire)) if session is not None else (
        lambda _q, wire: pw.codec.decode(wire))
    per_sender: dict[int, list[tuple[Tensor, Tensor]]] = {}
    for payloads, chunk_specs in zip(received, specs):
        for q, vectors, counts in decoded_messages(payloads, chunk_specs, rank, decode):
            per_sender.setdefault(q, []).append((vectors.to(hidden.dtype), counts))
    if not per_sender:  # rank 0 of a causal model reads nobody
        return hidden.new_zeros(batch, 0, d), hidden.new_zeros(batch, 0)
    pairs = [pair for q in sorted(per_sender) for pair in per_sender[q]]
    return torch.cat([v for v, _ in pairs], dim=1), torch.cat([c for _, c in pairs], dim=1)


__all__ = ["DEFAULT_TOKEN_CHUNKS", "chunks_for", "overlapped_layers", "read_chunks"]
