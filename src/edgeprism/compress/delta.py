"""Delta coding across layers with error feedback (closed-loop DPCM over the depth of the model).

Per request, every rank keeps the reconstruction r_q of each sender's tokens exactly as the receivers
decode it (the sender keeps its own). At the first exchange (layer 0) a sender sends its hidden
states in the `first` format (a key frame); at layer l > 0 it sends the residual h_l - r_q in the
`rest` format, and everyone sets r_q <- r_q + decode(message). Because the residual is taken against
the *reconstruction* (not against h_{l-1}), quantisation error does not accumulate over layers: the
error at layer l is the `rest` format's error on one residual (error feedback).

Why it pays: the residual stream changes by about half its norm per layer (MiniLM-L6: median
|h_l - h_{l-1}| / |h_l| ~ 0.45), and the large outlier channels barely change, so the same bits buy
a smaller error than quantising h_l itself.

Which layers get which bits (`schedule`): the error a layer's message leaves does not weigh the same
at every depth. MiniLM-L6 (2 ranks, 100 passages), 3-bit residuals at one layer and exact ones
elsewhere: 1 − cosine of the sentence embedding is 3e-5 for the 4-bit key frame, 8e-5, 4e-5, 3e-5,
3e-5 for layers 1-4 and 22e-5 for layer 5 — the last exchange feeds the output with no later layer to
soften it, and carries half of the total. `delta:F0:F1*4:F5` spends the bits there
(docs/CODECS.md has the measured variants).

The state is per request: `DeltaCodec.session()` returns a fresh `DeltaSession`, which the
position-wise transform creates per forward pass and drives layer by layer (every rank calls
`encode` for its own layer message, then `decode` for each message it reads, in layer order).
The valid mask travels once, bit-packed, in the key frame.

Stateless use (`DeltaCodec.encode/decode`) is the key frame alone: a caller without sessions still
gets correct (key-frame quality) values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from edgeprism.compress.base import EveryTokenCodec, WireSpec, check_inputs, spec_nbytes
from edgeprism.compress.formats import ValueFormat
from edgeprism.compress.lowbit import LowBitFormat, pack_bits, unpack_bits


@dataclass(frozen=True)
class DeltaCodec(EveryTokenCodec):
    """Key frame in `first` at layer 0, then residuals against the shared reconstruction: layer l in
    `schedule[l - 1]` for 1 <= l <= len(schedule), every later layer in `rest`.

    Key-frame wire: [*first (B, n, d), mask (B, ceil(n/8)) uint8].
    Delta wire (layer > 0): [*format of that layer (B, n, d)].
    Trailing schedule entries equal to `rest` are dropped (they change nothing), so equal codecs compare equal.
    """

    first: ValueFormat = field(default_factory=lambda: LowBitFormat(8, 4))
    rest: ValueFormat = field(default_factory=lambda: LowBitFormat(3, 4, rotate=True))
    schedule: tuple[ValueFormat, ...] = ()

    def __post_init__(self) -> None:
        schedule = tuple(self.schedule)
        while schedule and schedule[-1] == self.rest:
            schedule = schedule[:-1]
        object.__setattr__(self, "schedule", schedule)

    @property
    def name(self) -> str:
        if not self.schedule and self.first == self.rest:
            return f"delta:{self.rest.name}"
        runs: list[list] = []  # run-length encoding of the schedule: "lb3o4r*4"
        for fmt in self.schedule:
            if runs and runs[-1][0] == fmt:
                runs[-1][1] += 1
            else:
                runs.append([fmt, 1])
        middle = "".join(f":{fmt.name}" + (f"*{count}" if count > 1 else "") for fmt, count in runs)
        return f"delta:{self.first.name}{middle}:{self.rest.name}"

    # --- per layer ---
    def layer_format(self, layer: int) -> ValueFormat:
        """The format of layer `layer`'s message (the key frame's at 0, else that layer's residual's)."""
        if layer == 0:
            return self.first
        return self.schedule[layer - 1] if layer <= len(self.schedule) else self.rest

    def layer_wire_spec(self, layer: int, batch: int, num_tokens: int, hidden_size: int) -> WireSpec:
        if layer == 0:
            return [*self.first.wire_spec(batch, num_tokens, hidden_size),
                    ((batch, math.ceil(num_tokens / 8)), torch.uint8)]
        return self.layer_format(layer).wire_spec(batch, num_tokens, hidden_size)

    def layer_nbytes(self, layer: int, batch: int, num_tokens: int, hidden_size: int) -> int:
        return spec_nbytes(self.layer_wire_spec(layer, batch, num_tokens, hidden_size))

    def mean_nbytes(self, num_layers: int, batch: int, num_tokens: int, hidden_size: int) -> float:
        """Bytes per exchange averaged over a model of `num_layers` blocks (one key frame, then deltas)."""
        total = sum(self.layer_nbytes(layer, batch, num_tokens, hidden_size) for layer in range(num_layers))
        return total / num_layers

    def session(self) -> DeltaSession:
        """Fresh per-request state (the transform makes one per forward pass)."""
        return DeltaSession(self)

    # --- stateless use: the key frame ---
    def wire_spec(self, batch: int, num_tokens: int, hidden_size: int) -> WireSpec:
        return self.layer_wire_spec(0, batch, num_tokens, hidden_size)

    def nbytes(self, batch: int, num_tokens: int, hidden_size: int) -> int:
        """Bytes of the key frame (layer 0); later layers cost `layer_nbytes(layer, ...)`. See `mean_nbytes`."""
        return super().nbytes(batch, num_tokens, hidden_size)

    def encode(self, hidden: Tensor, valid: Tensor, anchor: Tensor | None = None) -> list[Tensor]:
        check_inputs(hidden, valid, anchor, self.name)
        x = hidden.to(torch.float32) * valid.unsqueeze(-1)  # (B, n, d), padding zeroed
        return [*self.first.encode(x), pack_bits(valid.to(torch.int64), 1)]

    def decode(self, wire: list[Tensor]) -> tuple[Tensor, Tensor]:
        *values, mask = wire
        vectors = self.first.decode(values)
        counts = unpack_bits(mask, 1, vectors.shape[1]).to(torch.float32)  # (B, n)
        return vectors, counts


@dataclass
class DeltaSession:
    """One request's state: this rank's own reconstruction and each sender's, plus their valid masks.

    Layers must be driven in order 0, 1, 2, ... (encode once per layer, decode each sender once per
    layer); a skipped or repeated layer raises instead of silently desynchronising sender and receiver.
    """

    codec: DeltaCodec
    own: Tensor | None = None  # (B, n_own, d) what receivers hold of this rank's tokens
    own_valid: Tensor | None = None  # (B, n_own) float
    own_layer: int = -1
    peers: dict[int, tuple[Tensor, Tensor, int]] = field(default_factory=dict)
    """sender -> (reconstruction (B, n_q, d), counts (B, n_q), last layer decoded)."""

    def wire_spec(self, layer: int, batch: int, num_tokens: int, hidden_size: int) -> WireSpec:
        return self.codec.layer_wire_spec(layer, batch, num_tokens, hidden_size)

    def encode(self, layer: int, hidden: Tensor, valid: Tensor, anchor: Tensor | None = None) -> list[Tensor]:
        assert layer == self.own_layer + 1, f"delta session encodes layer {layer} after layer {self.own_layer}"
        self.own_layer = layer
        if layer == 0:
            wire = self.codec.encode(hidden, valid, anchor)
            self.own, self.own_valid = self.codec.decode(wire)
            return wire
        assert self.own is not None and self.own_valid is not None, "layer 0 sets the session's state"
        x = hidden.to(torch.float32) * self.own_valid.unsqueeze(-1)  # (B, n, d), padding zeroed
        fmt = self.codec.layer_format(layer)
        wire = fmt.encode(x - self.own)
        self.own = self.own + fmt.decode(wire)
        return wire

    def decode(self, layer: int, sender: int, wire: list[Tensor]) -> tuple[Tensor, Tensor]:
        if layer == 0:
            assert sender not in self.peers, f"delta session: layer 0 of sender {sender} decoded twice"
            vectors, counts = self.codec.decode(wire)
        else:
            previous, counts, last = self.peers[sender]
            assert layer == last + 1, f"delta session decodes layer {layer} of sender {sender} after {last}"
            vectors = previous + self.codec.layer_format(layer).decode(wire)
        self.peers[sender] = (vectors, counts, layer)
        return vectors, counts
