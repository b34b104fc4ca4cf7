"""The position-wise transform: run a reference model with each rank owning a contiguous token range.

Per layer, a rank encodes its own hidden states with a codec (identity = full exchange, Segment
Means, quantised ...), exchanges them, and runs the block with queries for its own tokens and
keys/values for [own tokens ; received vectors] only (docs/ARCHITECTURE.md, rules 1-7).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
from torch import Tensor

from edgeprism.comm.context import DistContext
from edgeprism.comm.exchange import Exchanger
from edgeprism.compress.base import Codec, IdentityCodec, pack, spec_nbytes, unpack
from edgeprism.compress.kvshare import KVShareCodec
from edgeprism.models.base import (
    Inputs,
    KVExchangeBlock,
    ReferenceModel,
    SplitBlock,
    check_blocks,
)
from edgeprism.partition.attend import block_with_remote, exchanged_states, own_key_bias
from edgeprism.partition.decode import ShardState, greedy_decode
from edgeprism.partition.kvwire import kv_share_refusal
from edgeprism.partition.microbatch import interleave, row_slices
from edgeprism.partition.overlapped import DEFAULT_TOKEN_CHUNKS, chunks_for, overlapped_layers, read_chunks
from edgeprism.partition.ranges import TokenRange, equal_shares, split_tokens
from edgeprism.partition.scatter import part_wire_spec, raw_spec, read_part, wire_part, wire_tensors
from edgeprism.partition.timeline import Timeline

log = logging.getLogger(__name__)

# Defaults chosen from measurements (README "Fidelity"; `edgeprism eval --size-aware both --average both`,
# 2 ranks, Segment Means). Size-aware weighting (docs/ARCHITECTURE.md rule 4) helps MiniLM (CR 16: intent
# agreement 0.72 -> 0.85) and DINOv2 (CR 4: probe accuracy 0.61 -> 0.68), and helps the GPT-2 fixture when the
# normalised K/V input is averaged (CR 16: +2.35 % -> +1.24 % perplexity) while hurting it when the raw
# residual stream is (+5.4 %). Departure from rule 2, measured: what is averaged is the block's
# normalised K/V input (LN1 of the residual stream) rather than the residual stream itself; for post-LN
# BERT the two are the same thing, and at CR = 1 both are exact. `average="residual"` keeps rule 2.
DEFAULT_SIZE_AWARE = True
DEFAULT_AVERAGE: Literal["residual", "normed"] = "normed"
# Overlap (partition/overlap.py): each encoder layer's all-gather runs in the background while the rank attends
# over its own tokens; the received part is merged by log-sum-exp (exact). Measured in the README.
DEFAULT_OVERLAP = True
# Micro-batches (partition/microbatch.py): a batch of B >= 2 rows runs as 2 slices, one exchanging while the other
# computes. Measured (scripts/bench_speed.py, wifi4, 2 devices of one core, host shared, paired): at batch 8 0.60x
# of the plain split's latency for ViT-B/16 fp16 (overlap alone 0.89x) and 0.58x for DINOv2-S fp16 (0.74x).
DEFAULT_MICRO_BATCHES = 2


class PositionWise:
    """A reference model, split by token position across the ranks of `ctx`.

    Every rank calls `forward` (rank 0 with the request, the others with None). The request's one
    header (`split`: ranges, codec, the raw parts' shapes) reaches the ranks either with the caller's own
    message (the engine's control header: every rank passes `header=`) or, used alone, by one broadcast
    here. Rank 0 then sends each rank the raw slice of input it needs, every rank embeds its own tokens,
    and the outputs come back to rank 0, which returns them (the others return None).
    """

    def __init__(self, model: ReferenceModel, ctx: DistContext, codec: Codec | None = None,
                 size_aware: bool = DEFAULT_SIZE_AWARE, exchanger: Exchanger | None = None,
                 average: Literal["residual", "normed"] = DEFAULT_AVERAGE, warn_clamped_ratio: bool = True,
                 overlap: bool = DEFAULT_OVERLAP, micro_batches: int = DEFAULT_MICRO_BATCHES,
                 token_chunks: int = DEFAULT_TOKEN_CHUNKS) -> None:
        check_blocks(model)  # the declared contract (models.base.Block), checked before any collective
        self.model = model
        self.ctx = ctx
        self.codec = codec or IdentityCodec()
        self.size_aware = size_aware
        if average not in ("residual", "normed"):
            raise ValueError(f"average {average!r} must be 'residual' or 'normed'")
        self.average = average
        if average != DEFAULT_AVERAGE and model.config.exchanges_kv:
            log.warning("average=%r has no effect on %s: its blocks exchange rotated keys and values",
                        average, model.config.name)
        self.exchanger = exchanger or Exchanger(ctx)
        self.overlap = overlap and not model.causal and all(
            isinstance(b, SplitBlock) and not isinstance(b, KVExchangeBlock) for b in model.block_list())
        """Exchange overlapped with own-token attention (encoders whose blocks fit `SplitBlock`)."""
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.micro_batches = micro_batches if self.overlap else 1
        """Rows run as this many micro-batches, one exchanging while another computes (partition/microbatch.py;
        only on the overlapped path). Rank 0's value travels in the request's header."""
        if token_chunks < 1:
            raise ValueError(f"token_chunks must be >= 1, got {token_chunks}")
        self.token_chunks = token_chunks
        """Token chunks per exchange of a one-micro-batch request whose codec splits by token (partition/overlapped.py;
        every rank must use the same: it is in `settings`)."""
        why = kv_share_refusal(model.config, self.overlap, average) if isinstance(self.codec, KVShareCodec) else None
        if why:  # compress/kvshare.py: an encoder on the overlapped path only
            raise ValueError(f"codec {self.codec.name} cannot run on {model.config.name}: {why}; use "
                             f"{cast(KVShareCodec, self.codec).inner.name}")
        self.timeline = Timeline()
        """This rank's last request, layer by layer (partition/timeline.py)."""
        self._requests = 0
        self.scatter_coding_s = 0.0
        """This rank's seconds on the last request's scatter wire form: rank 0 encoding the other ranks' parts
        (`split`), a receiver decoding its own (`_scatter`)."""
        self._warned_ratio = not warn_clamped_ratio
        """One warning when a CR exceeds a rank's tokens (off where the caller reports it, e.g. evaluations)."""

    # --- start-up check ---
    def settings(self) -> dict:
        from edgeprism.compress.registry import codec_fingerprint

        return {"model": self.model.config.name, "config_hash": self.model.config.config_hash(),
                "codec": codec_fingerprint(self.codec), "size_aware": self.size_aware,
                "average": self.average, "token_chunks": self.token_chunks}

    def verify_peers(self) -> None:
        """All ranks compare settings (model, codec, weighting) before any request; a mismatch raises
        the same ValueError on every rank instead of hanging in a collective later."""
        if self.ctx.world_size == 1:
            return
        mine = json.dumps(self.settings(), sort_keys=True)
        digest = torch.frombuffer(bytearray(hashlib.sha256(mine.encode()).digest()), dtype=torch.uint8)
        gathered = self.exchanger.all_gather_bytes(digest, [32] * self.ctx.world_size, kind="control")
        differing = [q for q, d in enumerate(gathered) if not torch.equal(d, digest)]
        if differing:
            raise ValueError(f"rank {self.ctx.group_rank} settings {mine} differ from rank(s) {differing}: "
                             f"start every rank with the same --model, --codec and weighting")

    # --- the request path ---
    def split(self, inputs: Inputs, ranges: tuple[TokenRange, ...], gather_hidden: bool = False,
              generate: int = 0) -> tuple[dict[str, Any], list[Inputs]]:
        """Rank 0: the request's one header (its number, the ranges, the codec, each part's shapes, dtypes and
        wire form, what to return) and the parts: rank 0's own raw, every other rank's in its wire form (pixels
        as lossless 8-bit levels where they allow it: partition/scatter.py). `inputs` are already checked by
        the caller; the ranges come from the plan (`Plan.token_ranges`) or `split_tokens`. ValueError for a
        request this split cannot serve (a range count other than the world's; a decode that does not fit)."""
        ctx, model = self.ctx, self.model
        if len(ranges) != ctx.world_size:
            raise ValueError(f"{len(ranges)} token ranges for a world of {ctx.world_size} ranks; give one per rank")
        if generate:
            num_tokens = ranges[-1].end
            if not model.causal:
                raise ValueError(f"{model.config.name} is not a decoder model; generating needs a causal family")
            if generate < 1 or num_tokens + generate > model.config.max_positions:
                raise ValueError(f"{num_tokens} prompt tokens + {generate} new tokens must fit in "
                                 f"{model.config.name}'s {model.config.max_positions} positions (and generate >= 1)")
            if "attention_mask" in inputs and not bool(inputs["attention_mask"].bool().all()):
                raise ValueError("generation needs unpadded prompts: give rows of equal length")
        parts = [model.split_input(inputs, r.start, r.end) for r in ranges]
        start = time.perf_counter()
        wired = [wire_part(model, part) for part in parts[1:]]  # what the scatter sends ranks 1..P-1
        self.scatter_coding_s = time.perf_counter() - start
        self._warn_if_ratio_exceeds(ranges)
        self._requests += 1
        header = {"request": self._requests, "ranges": [[r.start, r.end] for r in ranges], "codec": self.codec.name,
                  "gather_hidden": gather_hidden, "generate": generate, "micro_batches": self.micro_batches,
                  "parts": [raw_spec(parts[0])] + [spec for spec, _ in wired]}
        return header, [parts[0]] + [wire for _, wire in wired]

    def _announce(self, inputs: Inputs | None, shares: tuple[float, ...] | None, gather_hidden: bool,
                  generate: int) -> tuple[dict[str, Any], list[Inputs] | None]:
        """Standalone use (no engine): rank 0 checks the request, splits it by `shares` and broadcasts the
        header; every rank returns it (rank 0 with the parts)."""
        ctx, model = self.ctx, self.model
        header: dict[str, Any] | None = None
        parts = None
        if ctx.is_root:
            if inputs is None:
                raise ValueError("rank 0 must be given the request's inputs")
            num_tokens = model.validate_input(inputs)
            header, parts = self.split(inputs, split_tokens(num_tokens, shares or equal_shares(ctx.world_size)),
                                       gather_hidden, generate)
        if ctx.world_size > 1:
            header = self.exchanger.broadcast_json(header)
        assert header is not None, "rank 0 made it; the others received it"
        return header, parts

    def forward(self, inputs: Inputs | None = None, shares: tuple[float, ...] | None = None,
                gather_hidden: bool = False, header: dict[str, Any] | None = None,
                parts: list[Inputs] | None = None) -> dict[str, Tensor] | None:
        """One request over the group. Standalone, rank 0 gives `inputs` (and `shares`) and the header is
        broadcast here; under the engine every rank gives the `header` rank 0's `split` made (sent with the
        engine's own control message: one header per request) and rank 0 its `parts`."""
        if header is None:
            header, parts = self._announce(inputs, shares, gather_hidden, 0)
        ranges = tuple(TokenRange(i, s, e) for i, (s, e) in enumerate(header["ranges"]))
        part = self._scatter(parts, header["parts"])
        state = self.forward_shard(part, ranges, micro_batches=header.get("micro_batches", 1))
        return self._collect(state, ranges, header["gather_hidden"])

    def generate(self, inputs: Inputs | None, max_new_tokens: int, shares: tuple[float, ...] | None = None,
                 header: dict[str, Any] | None = None, parts: list[Inputs] | None = None) -> Tensor | None:
        """Greedy decoding after a distributed prefill (docs/ARCHITECTURE.md rule 6; causal models only).

        Every rank runs the prefill; the last rank keeps its exact K/V plus the K/V of the vectors it
        received as its cache and decodes with no further exchange. Rank 0 returns (B, max_new_tokens)
        token ids, the others None. `header`/`parts`: as in `forward`.
        """
        ctx, model = self.ctx, self.model
        if not model.causal:
            raise ValueError(f"{model.config.name} is not a decoder model; --generate needs a causal family's preset")
        if header is None:
            header, parts = self._announce(inputs, shares, False, max_new_tokens)
        ranges = tuple(TokenRange(i, s, e) for i, (s, e) in enumerate(header["ranges"]))
        part = self._scatter(parts, header["parts"])
        last = ctx.world_size - 1
        is_last = ctx.group_rank == last
        state = self.forward_shard(part, ranges, keep_cache=is_last)
        tokens = greedy_decode(model, state, header["generate"]) if is_last else None
        if ctx.world_size == 1:
            return tokens
        batch = state.hidden.shape[0]
        if is_last:
            assert tokens is not None, "the last rank decoded them"
            self.exchanger.send_tensor(tokens, dst=0, kind="output")
            return None
        if ctx.is_root:
            return self.exchanger.recv_tensor((batch, header["generate"]), torch.int64, src=last, kind="output")
        return None

    def _warn_if_ratio_exceeds(self, ranges: tuple[TokenRange, ...]) -> None:
        """A CR above a rank's token count is clamped (one segment per row), with one warning."""
        ratio = getattr(self.codec, "ratio", 1)
        smallest = min(r.num_tokens for r in ranges)
        if ratio > smallest and not self._warned_ratio:
            self._warned_ratio = True
            log.warning("CR %d exceeds the smallest partition (%d tokens): such a rank sends one mean per row "
                        "(as if CR were %d)", ratio, smallest, smallest)

    def _scatter(self, parts: list[Inputs] | None, specs: list[dict]) -> Inputs:
        """Rank 0 sends each rank its raw slice (pixels of its patches / its token ids) as one message, in the
        wire form `split` chose (the header's specs); a receiver reads it back bit for bit."""
        ctx = self.ctx
        if ctx.is_root:
            assert parts is not None, "rank 0 holds every rank's part"
            for q in range(1, ctx.world_size):
                payload = pack(wire_tensors(specs[q], parts[q]))
                self.exchanger.send_tensor(payload, dst=q, kind="scatter")
            return {k: v.to(ctx.device) for k, v in parts[0].items()}
        spec = specs[ctx.group_rank]
        wire_spec = part_wire_spec(spec)
        payload = self.exchanger.recv_tensor((spec_nbytes(wire_spec),), torch.uint8, src=0, kind="scatter")
        start = time.perf_counter()
        part = read_part(spec, unpack(payload, wire_spec))
        self.scatter_coding_s = time.perf_counter() - start
        return {key: tensor.to(ctx.device) for key, tensor in part.items()}

    def forward_shard(self, part: Inputs, ranges: tuple[TokenRange, ...], keep_cache: bool = False,
                      micro_batches: int = 1) -> ShardState:
        """This rank's layers: embed own tokens, then per block exchange and attend; `micro_batches` as rank 0's
        header says (every rank must issue the same exchanges)."""
        model, codec = self.model, self.codec
        own = ranges[self.ctx.group_rank]
        causal = model.causal
        with torch.no_grad():
            hidden = model.embed(part, own.start, own.end)  # (B, n_own, d)
            batch, num_own, _ = hidden.shape
            valid = model.valid_mask(part, batch, num_own).to(hidden.device)
            anchor = model.anchor_mask(part, own.start, own.end).to(hidden.device)
            own_bias = own_key_bias(valid, own.start, own.end, causal, hidden.dtype)  # (B, 1, n_own, n_own)
            own_causal_square = causal and bool(valid.all())  # own_bias is the bare causal mask
            positions = torch.arange(own.start, own.end, device=hidden.device)  # global token indices (n_own,)
            width = model.config.exchange_width  # features per token on the wire: d, or a rotary block's K/V
            specs = [codec.wire_spec(batch, r.num_tokens, width) for r in ranges]
            sizes = [spec_nbytes(s) for s in specs]
            # A stateful codec (e.g. delta coding across layers) keeps per-request state in a session;
            # its wire shapes may differ per layer. Stateless codecs have no `session`.
            session = codec.session() if hasattr(codec, "session") else None
            state = ShardState(own, hidden, valid)
            clock = self.timeline = Timeline()
            if self.overlap and self.ctx.world_size > 1:  # encoders: exchanges hidden behind compute
                rows = row_slices(batch, micro_batches)
                chunks = chunks_for(codec, ranges, len(rows), self.token_chunks)
                hidden = torch.cat(interleave(
                    [overlapped_layers(self, hidden[r], own_bias[r], valid[r], anchor[r], ranges, slot, chunks)
                     for slot, r in enumerate(rows)], len(model.block_list()), clock, self.exchanger.stats))
                state.hidden = model.finish(hidden)
                return state
            for layer, block in enumerate(model.block_list()):
                clock.start_layer(self.exchanger.stats)
                # What is sent (docs/ARCHITECTURE.md rule 2 and its departures): the block's normalised K/V input
                # (DEFAULT_AVERAGE), the residual stream, or a rotary block's rotated keys and values.
                sent = exchanged_states(block, hidden, self.average, positions)
                if session is not None:
                    specs = [session.wire_spec(layer, batch, r.num_tokens, width) for r in ranges]
                    sizes = [spec_nbytes(s) for s in specs]
                remote, counts = self._exchange(sent, valid, anchor, specs, sizes, causal, session, layer)
                hidden, kv, remote_bias = block_with_remote(block, hidden, own_bias, remote, counts,
                                                            self.size_aware, self.average, sent, positions,
                                                            own_causal_square)
                clock.end_layer(layer, self.exchanger.stats)
                if keep_cache:
                    state.kv_cache.append(kv)
                    state.remote_bias = remote_bias
            state.hidden = model.finish(hidden)
        return state

    def _encode(self, hidden: Tensor, valid: Tensor, anchor: Tensor, session, layer: int) -> Tensor:
        with self.timeline.encoding():
            if session is not None:
                return pack(session.encode(layer, hidden, valid, anchor))
            return pack(self.codec.encode(hidden, valid, anchor))

    def _exchange(self, hidden: Tensor, valid: Tensor, anchor: Tensor, specs: list, sizes: list[int],
                  causal: bool, session=None, layer: int = 0) -> tuple[Tensor, Tensor]:
        """Encode own states, exchange, decode what this rank may read → (B, S_remote, d), (B, S_remote).

        With a codec `session` (stateful codecs), encode/decode go through it with the layer index and,
        for decode, the sender's rank."""
        world = self.ctx.world_size
        batch, _, d = hidden.shape
        if world == 1:
            return hidden.new_zeros(batch, 0, d), hidden.new_zeros(batch, 0)
        payload = self._encode(hidden, valid, anchor, session, layer)
        received: list[Tensor | None]
        with self.timeline.waiting():
            if causal:  # docs/ARCHITECTURE.md rule 5: only ranks q < p are readable, so send only forward
                received = self.exchanger.send_forward_bytes(payload, sizes)
            else:
                received = list(self.exchanger.all_gather_bytes(payload, sizes))
        return self._readable(received, specs, hidden, session, layer)

    def _readable(self, received: Sequence[Tensor | None], specs: list, hidden: Tensor, session,
                  layer: int) -> tuple[Tensor, Tensor]:
        """What this rank may read of the received payloads → (B, S_remote, d), (B, S_remote)."""
        return read_chunks(self, [received], [specs], hidden, session, layer)

    def _collect(self, state: ShardState, ranges: tuple[TokenRange, ...], gather_hidden: bool) -> dict | None:
        """Output rows to rank 0: [CLS] (rank 0 has it), pooled mean by exact sum, or the last position."""
        ctx, model = self.ctx, self.model
        hidden, valid = state.hidden, state.valid
        batch, _, d = hidden.shape
        last = ctx.world_size - 1
        outputs: dict[str, Tensor] = {}
        with torch.no_grad():
            if model.causal:
                row = hidden[:, -1]
                if ctx.world_size > 1 and ctx.group_rank == last:
                    self.exchanger.send_tensor(row, dst=0, kind="output")
                elif ctx.world_size > 1 and ctx.is_root:
                    row = self.exchanger.recv_tensor((batch, d), hidden.dtype, src=last, kind="output")
            else:
                row = hidden[:, 0]
                weights = valid.to(hidden.dtype)[..., None]
                sums = torch.cat([(hidden * weights).sum(1), weights.sum(1)], dim=-1)  # (B, d + 1)
                if ctx.world_size > 1:
                    sums = self.exchanger.reduce_sum_to_root(sums)
                outputs["mean"] = sums[:, :d] / sums[:, d:].clamp_min(1.0)
            if ctx.is_root:
                outputs.update(model.head(row))
            if gather_hidden:
                if ctx.is_root:
                    pieces = [hidden] + [
                        self.exchanger.recv_tensor(
                            (batch, r.num_tokens, d), hidden.dtype, src=r.group_rank, kind="output"
                        )
                        for r in ranges[1:]
                    ]
                    outputs["hidden"] = torch.cat(pieces, dim=1)
                else:
                    self.exchanger.send_tensor(hidden, dst=0, kind="output")
        return outputs if ctx.is_root else None
