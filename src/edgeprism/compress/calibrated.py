"""A codec whose rotation, outlier handling and bits come from data, not from a random seed ("tc:<digest>").

Transform coding (the KLT / PCA rotation of a calibration split, Huang & Schultheiss 1963) per layer:
a layer's exchanged vectors x (d values) are sent as

1. z = U^T (x - mu) / sigma: the PCA coordinates of the calibration split's vectors at this layer,
   each divided by its calibration standard deviation (U orthogonal, columns in falling variance);
2. one fp16 scale per vector, s = RMS(z), so a token far larger than usual (BERT's [CLS]/[SEP],
   a massive-activation token) keeps its relative precision;
3. component i quantised to `bits[i]` bits (0..8) at the MSE-optimal Lloyd-Max levels of a unit
   Gaussian, in units of s; bits by reverse water-filling on the calibration variances (greedy:
   each next bit goes where it removes the most squared error, `allocate_bits`), so the channels
   that carry outliers on the calibration data (the high-variance directions) get up to 8 bits and
   the quiet ones 0-2 — the outlier channels are picked by the data, per layer.

The error that counts need not be the vector's own: with a metric M per layer (`fit_layer`; what the
receiver's keys and values make of an error, `evaluate.calibrated.kv_metric`) steps 1-3 run on
y = (x - mu) M^(1/2), so PCA, bits and levels minimise e^T M e, and the decoder maps back through M^(-1/2)
(`LayerTransform.inverse`).

Nothing is random: the same calibration vectors give the same mu, U (eigenvector signs fixed: the
largest-|.| entry of each column positive), sigma and bits, hence the same bytes. The state is data
(`LayerTransform`, one per exchange) identified by the SHA-256 of its canonical bytes; the codec's
name carries 12 hex digits of it, and every rank loads the same file (`calibrated_state.py`).

Wire of layer l: [codes of the components with w bits, packed, one tensor per width w present
(B, S, ceil(n_w·w/8)) uint8 ..., scale (B, S, 1) fp16, valid mask (B, ceil(S/8)) uint8].
Bytes per vector: sum_w ceil(n_w·w/8) + 2 (+ the mask bits per message).
"""

from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass, field
from functools import cache

import torch
from torch import Tensor

from edgeprism.compress.base import EveryTokenCodec, WireSpec, check_inputs
from edgeprism.compress.lowbit import pack_bits, unpack_bits

MAX_BITS = 8
FIT_VECTORS = 8192
"""At most this many calibration vectors (evenly strided) fit the levels."""
LLOYD_ITERATIONS = 30
OUTLIER_BYTES = 4
"""An exact component: fp16 value + int16 index."""
NAME_PREFIX = "tc:"
DIGEST_CHARS = 12


@cache
def gaussian_levels(bits: int) -> tuple[tuple[float, ...], float]:
    """(the 2^bits MSE-optimal reconstruction levels of a unit Gaussian, ascending; their MSE).

    Lloyd's iteration on the density (centroid of [a, b] = (phi(a) - phi(b)) / (Phi(b) - Phi(a))),
    started from the companding levels (point density ~ phi^(1/3): the quantiles of N(0, 3), Panter & Dite
    1951), in float64; reproduces Max (1960) Table I (`lowbit.LLOYD_MAX_GAUSSIAN`)."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"Gaussian levels for {bits} bits: bits must be in 1..{MAX_BITS}")
    count = 2 ** bits

    def pdf(t: Tensor) -> Tensor:
        return torch.exp(-0.5 * t.nan_to_num(posinf=1e3, neginf=-1e3).pow(2)) / math.sqrt(2 * math.pi)

    quantiles = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    levels = math.sqrt(3) * torch.special.ndtri(quantiles)  # (2^bits,)
    inf = torch.tensor([math.inf], dtype=torch.float64)
    for _ in range(3000):
        edges = torch.cat([-inf, (levels[1:] + levels[:-1]) / 2, inf])  # (2^bits + 1,)
        mass = torch.special.ndtr(edges[1:]) - torch.special.ndtr(edges[:-1])
        levels = (pdf(edges[:-1]) - pdf(edges[1:])) / mass.clamp_min(1e-300)
    edges = torch.cat([-inf, (levels[1:] + levels[:-1]) / 2, inf])
    a, b = edges[:-1], edges[1:]
    mass = torch.special.ndtr(b) - torch.special.ndtr(a)
    # per cell: E[X^2] - 2c E[X] + c^2 P, with E[X^2; a<X<b] = P + a phi(a) - b phi(b)
    tail = (a.nan_to_num(neginf=0.0) * pdf(a)) - (b.nan_to_num(posinf=0.0) * pdf(b))
    mse = float((mass + tail - 2 * levels * (pdf(a) - pdf(b)) + levels.pow(2) * mass).sum())
    return tuple(float(v) for v in levels), mse


def level_mse(bits: int) -> float:
    """Squared error of a unit Gaussian at `bits` bits (1.0 at 0 bits: the value is sent as its mean)."""
    return 1.0 if bits == 0 else gaussian_levels(bits)[1]


def allocate_bits(variances: Tensor, code_bytes: int) -> tuple[int, ...]:
    """Bits per component (0..8) whose packed codes fit `code_bytes`, greedy on squared error.

    Each next bit goes to the component where it removes the most error (variance × the drop of
    `level_mse`), ties to the lower index; then, while the width groups' byte rounding overshoots,
    the bit that adds the least error is taken back. Deterministic in (variances, code_bytes)."""
    if code_bytes < 0:
        raise ValueError(f"code bytes per vector {code_bytes} must be >= 0")
    var = [float(v) for v in variances]
    bits = [0] * len(var)
    heap = [(-(v * (level_mse(0) - level_mse(1))), i) for i, v in enumerate(var)]
    heapq.heapify(heap)
    for _ in range(code_bytes * 8):
        if not heap:
            break
        _gain, i = heapq.heappop(heap)
        bits[i] += 1
        if bits[i] < MAX_BITS:
            heapq.heappush(heap, (-(var[i] * (level_mse(bits[i]) - level_mse(bits[i] + 1))), i))
    while packed_code_bytes(bits) > code_bytes:
        i = min((j for j, b in enumerate(bits) if b > 0),
                key=lambda j: (var[j] * (level_mse(bits[j] - 1) - level_mse(bits[j])), -j))
        bits[i] -= 1
    return tuple(bits)


def packed_code_bytes(bits: tuple[int, ...] | list[int]) -> int:
    """Bytes of one vector's codes: each width's components packed together, ceil(n_w·w/8) per width."""
    return sum(math.ceil(sum(1 for b in bits if b == w) * w / 8) for w in range(1, MAX_BITS + 1))


@dataclass(frozen=True)
class LayerTransform:
    """One exchange's calibrated state: mean (d,), basis (d, d) (x - mean -> coordinates; columns = components;
    orthogonal unless fitted in a metric, then `inverse` maps back), sigma (d,)
    calibration std per component, bits per component, `levels`: for each width w present (ascending), the
    reconstruction levels (n_w, 2^w) of its components (in units of sigma · the vector's scale), and
    `outliers`: per vector, the components the codes serve worst sent exact (fp16 value, int16 index).
    Tensors float32."""

    mean: Tensor
    basis: Tensor
    sigma: Tensor
    bits: tuple[int, ...]
    levels: tuple[Tensor, ...]
    outliers: int = 0
    inverse: Tensor | None = None
    """Coordinates -> x - mean (d, d) when `basis` is not orthogonal (fitted in a metric, `fit_layer`); None:
    basis.T."""

    @property
    def hidden_size(self) -> int:
        return int(self.mean.shape[0])

    def widths(self) -> list[tuple[int, Tensor]]:
        """[(w, component indices with w bits)] for each width present, ascending."""
        bits = torch.tensor(self.bits)
        return [(w, torch.nonzero(bits == w).flatten()) for w in range(1, MAX_BITS + 1) if bool((bits == w).any())]

    def wire_spec(self, batch: int, num_vectors: int) -> WireSpec:
        k = min(self.outliers, self.hidden_size)
        return [*[((batch, num_vectors, math.ceil(len(index) * w / 8)), torch.uint8) for w, index in self.widths()],
                ((batch, num_vectors, 1), torch.float16),
                ((batch, num_vectors, k), torch.int16), ((batch, num_vectors, k), torch.float16)]

    def _scaled(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> PCA coordinates y (B, S, d), z = y / sigma / scale, scale (B, S, 1) fp16."""
        y = (x.to(torch.float32) - self.mean) @ self.basis  # (B, S, d)
        z = y / self.sigma  # standardised
        k = min(self.outliers, self.hidden_size)
        quantised = torch.tensor(self.bits) > 0
        # the scale ignores the k largest |z| (they travel exact), so one outlier does not coarsen the rest
        tamed = z.abs().scatter(-1, z.abs().topk(k, dim=-1).indices, 0.0) if k else z.abs()
        scale = tamed[..., quantised].pow(2).mean(-1, keepdim=True).sqrt().to(torch.float16)  # (B, S, 1)
        s = scale.to(torch.float32)
        return y, z / torch.where(s > 0, s, torch.ones_like(s)), scale

    def _dequantise(self, codes: list[Tensor], scale: Tensor) -> Tensor:
        """Packed codes per width + scale (B, S, 1) fp16 -> PCA coordinates y (B, S, d), sigma applied."""
        batch, num_vectors, _ = scale.shape
        z = torch.zeros(batch, num_vectors, self.hidden_size)  # (B, S, d); 0-bit components sit at the mean
        for (w, index), levels, packed in zip(self.widths(), self.levels, codes):
            code = unpack_bits(packed, w, len(index))  # (B, S, n_w)
            z[..., index] = torch.gather(levels.expand(batch, num_vectors, *levels.shape), -1,
                                         code.unsqueeze(-1)).squeeze(-1)
        return z * scale.to(torch.float32) * self.sigma

    def encode(self, x: Tensor) -> list[Tensor]:
        y, z, scale = self._scaled(x)
        codes = [pack_bits(quantise(z[..., index], levels), w)
                 for (w, index), levels in zip(self.widths(), self.levels)]
        k = min(self.outliers, self.hidden_size)
        error = (y - self._dequantise(codes, scale)).abs()  # (B, S, d), in the units of x
        index = error.topk(k, dim=-1).indices  # (B, S, k): the components the codes serve worst
        return [*codes, scale.contiguous(), index.to(torch.int16).contiguous(),
                torch.gather(y, -1, index).to(torch.float16).contiguous()]

    def decode(self, wire: list[Tensor]) -> Tensor:
        *codes, scale, index, values = wire
        y = self._dequantise(codes, scale).scatter(-1, index.to(torch.int64), values.to(torch.float32))
        return y @ (self.basis.T if self.inverse is None else self.inverse) + self.mean  # (B, S, d)


def quantise(values: Tensor, levels: Tensor) -> Tensor:
    """values (..., n) -> index of the nearest of each component's ascending levels (n, L), int64."""
    edges = (levels[:, 1:] + levels[:, :-1]) / 2  # (n, L - 1)
    flat = values.reshape(-1, values.shape[-1]).T.contiguous()  # (n, M)
    return torch.searchsorted(edges.contiguous(), flat).T.reshape(values.shape)


def fit_levels(samples: Tensor, bits: int, iterations: int = LLOYD_ITERATIONS) -> Tensor:
    """Lloyd's algorithm per component on calibration values (M, n) -> levels (n, 2^bits), ascending: starts
    from the unit-Gaussian levels times each component's RMS, so heavy tails get levels of their own."""
    rms = samples.pow(2).mean(0).sqrt().clamp_min(1e-12)  # (n,)
    levels = torch.tensor(gaussian_levels(bits)[0]).unsqueeze(0) * rms.unsqueeze(1)  # (n, L)
    values = samples.T.contiguous()  # (n, M)
    for _ in range(iterations):
        codes = torch.searchsorted(((levels[:, 1:] + levels[:, :-1]) / 2).contiguous(), values)  # (n, M)
        sums = torch.zeros_like(levels).scatter_add_(1, codes, values)
        counts = torch.zeros_like(levels).scatter_add_(1, codes, torch.ones_like(values))
        levels = torch.where(counts > 0, sums / counts.clamp_min(1), levels).sort(dim=1).values
    return levels


def fit_layer(samples: Tensor, code_bytes: int, outliers: int = 0, metric: Tensor | None = None) -> LayerTransform:
    """One layer's transform from its calibration vectors (N, d): PCA, `outliers` exact components per vector
    (4 bytes each), bits for the rest of `code_bytes` (`allocate_bits`), and each component's levels fitted
    to its calibration values (`fit_levels`).

    `metric` (d, d) symmetric positive definite: the error that counts is e^T M e, not |e|^2 (e.g. what the
    error does to the keys and values the receiver computes, `evaluate.calibrated.kv_metric`). The vectors
    are then coded in the coordinates y = (x - mean) M^(1/2), whose squared error is that one: PCA, bits
    and levels are fitted there, and the decoder maps back through M^(-1/2)."""
    if samples.dim() != 2 or samples.shape[0] < 2:
        raise ValueError(f"calibration vectors have shape {tuple(samples.shape)}; need (N >= 2, hidden)")
    x = samples.to(torch.float64)
    hidden = x.shape[1]
    mean = x.mean(0)
    root = inverse_root = None
    if metric is not None:
        if metric.shape != (hidden, hidden):
            raise ValueError(f"metric has shape {tuple(metric.shape)}; vectors have {hidden} features")
        weights, axes = torch.linalg.eigh((metric.to(torch.float64) + metric.to(torch.float64).T) / 2)
        if float(weights.min()) <= 0:
            raise ValueError(f"metric is not positive definite (least eigenvalue {float(weights.min()):.3g})")
        root = axes @ torch.diag(weights.sqrt()) @ axes.T  # M^(1/2), symmetric
        inverse_root = axes @ torch.diag(weights.rsqrt()) @ axes.T
        x = mean + (x - mean) @ root
    cov = (x - mean).T @ (x - mean) / (x.shape[0] - 1)  # (d, d)
    eigenvalues, vectors = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(eigenvalues, descending=True, stable=True)
    eigenvalues, vectors = eigenvalues[order].clamp_min(0), vectors[:, order]
    pivot = vectors.abs().argmax(0)  # sign convention: the largest-|.| entry of each column is positive
    vectors = vectors * torch.sign(vectors[pivot, torch.arange(hidden)]).unsqueeze(0)
    sigma = eigenvalues.clamp_min(max(float(eigenvalues[0]) * 1e-12, 1e-20)).sqrt()
    bits = allocate_bits(eigenvalues, code_bytes - OUTLIER_BYTES * outliers)
    basis, inverse = vectors, None
    if root is not None and inverse_root is not None:
        basis, inverse = (root @ vectors).float(), (vectors.T @ inverse_root).float()
    draft = LayerTransform(mean.float(), basis.float(), sigma.float(), bits, (), outliers, inverse)
    probe = samples[:: max(1, samples.shape[0] // FIT_VECTORS)].to(torch.float32).unsqueeze(0)  # (1, M, d)
    _, z, _ = draft._scaled(probe)
    levels = tuple(fit_levels(z[0][:, index], w) for w, index in draft.widths())
    return LayerTransform(mean.float(), basis.float(), sigma.float(), bits, levels, outliers, inverse)


def state_digest(layers: tuple[LayerTransform, ...], delta: bool = False) -> str:
    """SHA-256 (hex) of the layers' canonical bytes (float32 little-endian tensors, bits as bytes) and the mode."""
    digest = hashlib.sha256(b"edgeprism-tc/1" + (b"+delta" if delta else b""))
    for layer in layers:
        for tensor in (layer.mean, layer.basis, layer.sigma):
            digest.update(tensor.to(torch.float32).contiguous().numpy().astype("<f4").tobytes())
        for levels in layer.levels:
            digest.update(levels.to(torch.float32).contiguous().numpy().astype("<f4").tobytes())
        digest.update(bytes(layer.bits) + layer.outliers.to_bytes(4, "little"))
        if layer.inverse is not None:  # absent: the same bytes as before the field existed
            digest.update(b"inverse" + layer.inverse.to(torch.float32).contiguous().numpy().astype("<f4").tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class TransformCodec(EveryTokenCodec):
    """Per-layer calibrated transform coding (module doc). Stateful only in the layer index: the
    transform drives it through `session()`; stateless use (`encode`/`decode`) is layer 0's transform."""

    digest: str
    layers: tuple[LayerTransform, ...] = field(compare=False, repr=False, hash=False)
    delta: bool = False
    """Layers > 0 send the residual against the shared reconstruction of the layer before (closed loop, as
    `compress.delta`); their transforms are fitted on those residuals."""
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a calibrated codec needs at least one layer's transform")
        widths = {layer.hidden_size for layer in self.layers}
        if len(widths) != 1:
            raise ValueError(f"calibrated layers have different widths {sorted(widths)}")

    @property
    def name(self) -> str:
        return NAME_PREFIX + self.digest[:DIGEST_CHARS]

    @property
    def hidden_size(self) -> int:
        return self.layers[0].hidden_size

    def layer(self, layer: int) -> LayerTransform:
        if not 0 <= layer < len(self.layers):
            raise ValueError(f"codec {self.name} was calibrated for {len(self.layers)} exchanges (layers); "
                             f"layer {layer} has no transform: calibrate it on this model")
        return self.layers[layer]

    def _check_width(self, hidden_size: int) -> None:
        if hidden_size != self.hidden_size:
            raise ValueError(f"codec {self.name} was calibrated on {self.hidden_size} features per token; "
                             f"this exchange has {hidden_size}")

    def layer_wire_spec(self, layer: int, batch: int, num_tokens: int, hidden_size: int) -> WireSpec:
        self._check_width(hidden_size)
        return [*self.layer(layer).wire_spec(batch, num_tokens), ((batch, math.ceil(num_tokens / 8)), torch.uint8)]

    def layer_nbytes(self, layer: int, batch: int, num_tokens: int, hidden_size: int) -> int:
        return sum(math.prod(s) * torch.empty((), dtype=t).element_size()
                   for s, t in self.layer_wire_spec(layer, batch, num_tokens, hidden_size))

    def encode_layer(self, layer: int, hidden: Tensor, valid: Tensor, anchor: Tensor | None = None) -> list[Tensor]:
        check_inputs(hidden, valid, anchor, self.name)
        self._check_width(hidden.shape[-1])
        x = hidden.to(torch.float32) * valid.unsqueeze(-1)  # (B, n, d), padding zeroed
        return [*self.layer(layer).encode(x), pack_bits(valid.to(torch.int64), 1)]

    def decode_layer(self, layer: int, wire: list[Tensor]) -> tuple[Tensor, Tensor]:
        *values, mask = wire
        vectors = self.layer(layer).decode(values)  # (B, n, d)
        counts = unpack_bits(mask, 1, vectors.shape[1]).to(torch.float32)  # (B, n)
        return vectors * counts.unsqueeze(-1), counts

    # --- stateless use: layer 0 ---
    def wire_spec(self, batch: int, num_tokens: int, hidden_size: int) -> WireSpec:
        return self.layer_wire_spec(0, batch, num_tokens, hidden_size)

    def encode(self, hidden: Tensor, valid: Tensor, anchor: Tensor | None = None) -> list[Tensor]:
        return self.encode_layer(0, hidden, valid, anchor)

    def decode(self, wire: list[Tensor]) -> tuple[Tensor, Tensor]:
        return self.decode_layer(0, wire)

    def session(self) -> TransformSession:
        return TransformSession(self)

    def __str__(self) -> str:
        return self.name


@dataclass
class TransformSession:
    """What `PositionWise` drives per request: each layer's message in that layer's transform; with `delta`,
    this rank's reconstruction of its own tokens and each sender's, as receivers hold them."""

    codec: TransformCodec
    own: Tensor | None = None  # (B, n_own, d)
    peers: dict[int, Tensor] = field(default_factory=dict)

    def wire_spec(self, layer: int, batch: int, num_tokens: int, hidden_size: int) -> WireSpec:
        return self.codec.layer_wire_spec(layer, batch, num_tokens, hidden_size)

    def encode(self, layer: int, hidden: Tensor, valid: Tensor, anchor: Tensor | None = None) -> list[Tensor]:
        if not self.codec.delta:
            return self.codec.encode_layer(layer, hidden, valid, anchor)
        x = hidden.to(torch.float32) * valid.unsqueeze(-1)  # (B, n, d), padding zeroed
        if layer > 0:
            assert self.own is not None, "layer 0 sets the session's reconstruction"
            x = x - self.own
        wire = self.codec.encode_layer(layer, x, valid, anchor)
        step = self.codec.decode_layer(layer, wire)[0]
        self.own = step if layer == 0 or self.own is None else self.own + step
        return wire

    def decode(self, layer: int, sender: int, wire: list[Tensor]) -> tuple[Tensor, Tensor]:
        vectors, counts = self.codec.decode_layer(layer, wire)
        if self.codec.delta:
            vectors = vectors if layer == 0 else self.peers[sender] + vectors
            self.peers[sender] = vectors
        return vectors, counts


def fit_codec(samples: list[Tensor], code_bytes: int | list[int], outliers: int = 0, delta: bool = False,
              description: str = "", metrics: list[Tensor] | None = None) -> TransformCodec:
    """A calibrated codec from each exchange's calibration vectors (one (N, d) tensor per layer, the same
    tokens in the same order at every layer when `delta`) and the code bytes per vector (one number, or one
    per layer). With `delta` each layer is fitted on the closed-loop residuals the layers before it leave.
    `metrics`: one (d, d) error metric per layer (`fit_layer`), or None (squared error)."""
    per_layer = [code_bytes] * len(samples) if isinstance(code_bytes, int) else list(code_bytes)
    if len(per_layer) != len(samples):
        raise ValueError(f"{len(per_layer)} code-byte budgets for {len(samples)} layers; give one per layer")
    if delta and len({x.shape[0] for x in samples}) != 1:
        raise ValueError(f"delta calibration needs the same tokens at every layer; got {[x.shape[0] for x in samples]}")
    layers: list[LayerTransform] = []
    recon: Tensor | None = None
    if metrics is not None and len(metrics) != len(samples):
        raise ValueError(f"{len(metrics)} error metrics for {len(samples)} layers; give one per layer")
    for i, (x, budget) in enumerate(zip(samples, per_layer)):
        target = x if recon is None or not delta else x - recon
        layer = fit_layer(target, budget, outliers, None if metrics is None else metrics[i])
        layers.append(layer)
        if delta:
            step = torch.cat([layer.decode(layer.encode(chunk.unsqueeze(0)))[0] for chunk in target.split(4096)])
            recon = step if recon is None else recon + step
    return TransformCodec(state_digest(tuple(layers), delta), tuple(layers), delta, description)
