"""The offline profiler: measure compute, staging, link and energy once, and write the versioned profile.

    options = ProfileOptions(model="vit-base-patch16-224", world_size=2, link=get_preset("wifi4"))
    with LinkSession(options.world_size, options.link) as session:
        report = run_profile(options, session, progress=...)
    report.profile.save("vit.profile.json")

Measures; decides nothing (docs/ARCHITECTURE.md, "Rooms"). Each phase lives in its own module:
`compute` (one block per grid point, pinned to one core), `staging`, `link` (the testbed's link test
through the runtime's collectives), `energy`, `fidelity` (with `codec_timing`: each codec's encode and
decode seconds per vector, on one thread of this process).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import math
import os
import platform
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from edgeprism.compress.kvshare import KVShareCodec
from edgeprism.compress.registry import get_codec, list_codecs
from edgeprism.models.base import ReferenceModel
from edgeprism.models.config import ModelConfig
from edgeprism.models.loading import load_model, model_config
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.partition.kvwire import kv_share_refusal
from edgeprism.profile.codec_timing import timed_entries
from edgeprism.profile.compute import ProgressFn, fit_errors, measure_compute, sparse_batches
from edgeprism.profile.compute_job import measure_on_session
from edgeprism.profile.energy import measure_energy, one_block
from edgeprism.profile.exchange_cost import exchange_cost_rank, message_bytes, seconds_per_byte
from edgeprism.profile.fidelity import codec_entries, evaluate_fidelity, label_shifts, load_fidelity_rows, select_rows
from edgeprism.profile.link import LinkSession
from edgeprism.profile.schema import HostFacts, Profile
from edgeprism.profile.sealing import codec_messages, measure_sealing
from edgeprism.profile.staging import measure_staging
from edgeprism.testbed.presets import LinkPreset

log = logging.getLogger(__name__)

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32)
DEFAULT_SEQ_LENS = (32, 128)
"""Text models: token counts profiled (validation holds out one between them)."""


@dataclass(frozen=True)
class ProfileOptions:
    """What to profile and how hard. Units in names; every choice has a default that fits a 2-minute run."""

    model: str
    world_size: int = 2
    checkpoint: str | None = None
    link: LinkPreset | None = None
    """The link between the devices (None: unshaped loopback between local workers)."""
    link_backend: str = "auto"
    """Testbed backend: "auto", "netns" (kernel tbf, root) or "loopback" (link emulated in the transport)."""
    batches: tuple[int, ...] = DEFAULT_BATCHES
    """Batch sizes the profile must cover; a sparse subset of them is timed (see `max_batch_points`)."""
    max_batch_points: int = 4
    seq_lens: tuple[int, ...] | None = None
    """Text models: token counts to time (default `DEFAULT_SEQ_LENS`); ViT: its image's tokens."""
    image_size: int | None = None
    codecs: tuple[str, ...] = ()
    """Exchange codecs to record (default: the standard family, `compress.list_codecs()`)."""
    device: str = "cpu"
    warmup: int = 1
    repeats: int = 3
    fidelity_file: str | None = None
    """Rows from `edgeprism eval --out` to take fidelity from (instead of evaluating here)."""
    evaluate: bool = True
    """Run the model's evaluation set for fidelity when it has one (and no `fidelity_file` is given)."""
    eval_limit: int | None = 32
    meter: str = "auto"
    power_model: str | None = None
    compute_on: str = "devices"
    """"devices": every device of the session times its share at once (as requests run); "here": this
    process alone, pinned to `core` (no worker processes; for tests and quick looks)."""
    core: int | None = 0
    """Core the in-process ("here") compute timing is pinned to (one emulated device)."""
    seed: int = 0

    def codec_names(self) -> tuple[str, ...]:
        return self.codecs or tuple(list_codecs())


@dataclass(frozen=True)
class ProfileReport:
    """The profile and how it was made (not part of the profile: timings of the profiling itself)."""

    profile: Profile
    profile_seconds: float
    phase_seconds: dict[str, float]
    sampled_batches: tuple[int, ...]
    token_counts: tuple[int, ...]
    num_compute_points: int
    fit_median_rel_error: float
    fit_max_rel_error: float
    staging: dict[str, Any]
    link_test: dict[str, Any]
    fidelity_note: str
    load_average: tuple[float, float] = (0.0, 0.0)
    """1-minute load average of the host before and after (see `validate.ValidationReport`)."""

    def to_dict(self) -> dict[str, Any]:
        return {"profile_seconds": self.profile_seconds, "phase_seconds": dict(self.phase_seconds),
                "sampled_batches": list(self.sampled_batches), "token_counts": list(self.token_counts),
                "num_compute_points": self.num_compute_points, "fit_median_rel_error": self.fit_median_rel_error,
                "fit_max_rel_error": self.fit_max_rel_error, "staging": self.staging,
                "link_test": {k: v for k, v in self.link_test.items() if not k.endswith("_samples_s")},
                "fidelity_note": self.fidelity_note, "profile_hash": self.profile.profile_hash(),
                "load_average": list(self.load_average), "host_cores": os.cpu_count()}


def token_counts_for(config: ModelConfig, options: ProfileOptions) -> tuple[int, ...]:
    """The token counts the compute grid covers: the ViT's image, or the text model's sequence lengths."""
    if config.modality == "image":
        if options.seq_lens:
            raise ValueError(f"--seq-lens is for text models; {config.name} is a ViT (use --image-size)")
        return (config.num_tokens(image_size=options.image_size),)
    if options.image_size:
        raise ValueError(f"--image-size is for ViT models; {config.name} is a text model (use --seq-lens)")
    lens = options.seq_lens or tuple(n for n in DEFAULT_SEQ_LENS if n <= config.max_positions)
    for n in lens:
        if not 1 <= n <= config.max_positions:
            raise ValueError(f"sequence length {n} is outside 1..{config.max_positions} for {config.name}")
    return tuple(sorted(set(lens)))


def input_bytes_per_token(model: ReferenceModel, num_tokens: int, world_size: int, image_size: int | None) -> float:
    """Raw input bytes rank 0 scatters per token: what `split_input` gives a non-root rank, as it is (8-bit pixels
    travel as levels, a request's own figure: partition/scatter.py `scatter_ratio`)."""
    config = model.config
    seq_len = None if config.modality == "image" else num_tokens
    inputs = synthetic_inputs(config, 1, seq_len=seq_len, image_size=image_size)
    start = math.ceil(num_tokens / world_size)
    part = model.split_input(inputs, start, num_tokens)
    nbytes = sum(v.numel() * v.element_size() for v in part.values())
    return nbytes / max(1, num_tokens - start)


def output_bytes_per_row(model: ReferenceModel) -> float:
    """Bytes per row each other rank sends rank 0 at the end: GPT-2's last position (d floats); encoders'
    pooled sums by an exact float reduce ((d + 1) floats, see `PositionWise._collect`)."""
    d = model.config.hidden_size
    return 4.0 * d if model.causal else 4.0 * (d + 1)


def host_facts(device: torch.device, cores_per_device: int = 1) -> HostFacts:
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return HostFacts(cpu_model=cpu_model, num_cores=cores_per_device, torch_version=torch.__version__,
                     device_kind=device_kind(device), python_version=platform.python_version(),
                     host_id=hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8])


def device_kind(device: torch.device | str) -> str:
    """"cpu" or "cuda:<device name>": what `HostFacts.device_kind` and `DeviceDescription.device_kind` say."""
    device = torch.device(device)
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity, e.g. `edgeprism join --cores 0-3`)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def validate_options(options: ProfileOptions) -> None:
    """Every user mistake, before anything is measured."""
    config = model_config(options.model, options.checkpoint)  # unknown model: ValueError listing the presets
    for n in token_counts_for(config, options):
        if n < options.world_size:
            raise ValueError(f"{n} tokens cannot be split over {options.world_size} ranks")
    if options.world_size < 2:
        raise ValueError(f"--world-size {options.world_size}: a distributed profile needs at least 2 ranks")
    if not options.batches or any(b < 1 for b in options.batches):
        raise ValueError(f"--batches {list(options.batches)}: give batch sizes >= 1, e.g. 1,2,4,8,16,32")
    if options.warmup < 0 or options.repeats < 1:
        raise ValueError(f"--warmup {options.warmup} must be >= 0 and --repeats {options.repeats} >= 1")
    if options.compute_on not in ("devices", "here"):
        raise ValueError(f"compute_on {options.compute_on!r}: choose 'devices' or 'here'")
    if options.max_batch_points < 2:
        raise ValueError(f"max_batch_points {options.max_batch_points} must be >= 2 (the fit needs a spread)")
    if options.eval_limit is not None and options.eval_limit < 1:
        raise ValueError(f"--eval-limit {options.eval_limit} must be >= 1")
    for name in options.codec_names():
        codec = get_codec(name)
        why = kv_share_refusal(config) if isinstance(codec, KVShareCodec) else None
        if why:
            raise ValueError(f"--codecs {name}: a kv-share codec cannot run on {config.name}: {why}; profile "
                             f"{cast(KVShareCodec, codec).inner.name} instead")
    if options.fidelity_file:
        load_fidelity_rows(options.fidelity_file)  # malformed rows fail now, not after minutes of measuring
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {options.device}: CUDA is not available on this host")


def run_profile(options: ProfileOptions, session: LinkSession, progress: ProgressFn | None = None,
                message: Callable[[str], None] | None = None) -> ProfileReport:
    """Measure everything and build the profile. `session` is the group the link test runs on."""
    validate_options(options)
    say = message or (lambda text: None)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    phases: dict[str, float] = {}
    device = torch.device(options.device)
    model = load_model(options.model, options.checkpoint, seed=options.seed).eval()
    config = model.config
    token_counts = token_counts_for(config, options)
    codecs = [get_codec(name) for name in options.codec_names()]
    sampled = sparse_batches(options.batches, options.max_batch_points)

    where = "every device at once" if options.compute_on == "devices" else "this process, one core"
    say(f"compute: {config.name}, batches {list(sampled)} of {sorted(set(options.batches))}, tokens "
        f"{list(token_counts)}, one block per point, timed on {where}")
    mark = time.perf_counter()
    speeds = (1.0,) * options.world_size
    if options.compute_on == "devices":
        table, overhead, shapes, speeds, _ = measure_on_session(
            session, options.model, options.checkpoint, options.seed, token_counts, sampled, codecs,
            device=options.device, warmup=options.warmup, repeats=options.repeats, num_layers=config.num_layers,
            progress=progress)
    else:
        table, overhead, shapes = measure_compute(model, token_counts, sampled, options.world_size, codecs, device,
                                                  core=options.core, warmup=options.warmup,
                                                  repeats=options.repeats, progress=progress)
    fit_median, fit_max = fit_errors(table, overhead.per_token_s, config.num_layers)
    phases["compute_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    staging = measure_staging(device)
    phases["staging_s"] = time.perf_counter() - mark
    say(f"staging: {staging.note}")

    mark = time.perf_counter()
    say(f"link: link test over {options.world_size} ranks ({session.emulation or 'unshaped loopback'})")
    link, raw_link = session.measure_link()
    phases["link_s"] = time.perf_counter() - mark
    say(f"link: {link.latency_s * 1e3:.2f} ms per hop, {link.bandwidth_bps / 1e6:.2f} Mbit/s per rank in all-gather")
    if options.compute_on == "devices" and options.world_size > 1:
        nbytes = message_bytes(max(sampled), max(token_counts), options.world_size, config.exchange_width)
        raw_cost = session.run(exchange_cost_rank, {"nbytes": nbytes, "width": config.hidden_size})
        link = dataclasses.replace(link, exchange_compute_s_per_byte=seconds_per_byte(raw_cost, speeds))
        raw_link = {**raw_link, "exchange_cost": raw_cost}
        say(f"link: compute lost to exchanging {link.exchange_compute_s_per_byte * 1e9:.2f} ns per byte received "
            f"({raw_cost['allgathers']} all-gathers of {nbytes} B beside a {raw_cost['alone_s'][0]:.2f} s workload; "
            f"per rank {[round(x * 1e9, 2) for x in raw_cost['seconds_per_byte']]} ns)")

    mark = time.perf_counter()
    energy = measure_energy(one_block(model, token_counts[0], device), device, meter_kind=options.meter,
                            power_model=options.power_model)
    phases["energy_s"] = time.perf_counter() - mark
    say(f"energy: {energy.source} ({energy.meter})")

    mark = time.perf_counter()
    entries, fidelity_note = fidelity_entries(options, config, codecs, say)
    phases["fidelity_s"] = time.perf_counter() - mark
    say(f"fidelity: {fidelity_note}")
    sealing = measure_sealing(codec_messages(entries, token_counts[0], options.world_size))
    say(f"sealing: {sealing.per_message_s * 1e6:.1f} us per message + {sealing.per_byte_s * 1e9:.2f} ns per byte "
        f"(seal + open, {len(sealing.samples)} codecs)")

    notes = "; ".join([
        f"compute: {len(shapes)} block timings (batches {list(sampled)}, tokens {list(token_counts)}), "
        f"{options.warmup} warm-up + {options.repeats} repeats, median, pinned to one core; fit median error "
        f"{fit_median:.1%}, max {fit_max:.1%}; per_token_s includes embedding + final norm "
        f"({overhead.per_token_s:.3g} s/token over {config.num_layers} layers)",
        (f"device speeds: measured, median of rank 0's time over each rank's on the shared shapes {speeds}"
         if options.compute_on == "devices" else "device speeds: not measured (compute timed in one process); 1.0"),
        staging.note, f"link: {link.method}", fidelity_note,
        f"host load average {load_before:.1f} at the start on {os.cpu_count()} cores"
        + (" (other work shared the cores: timings are noisier)" if load_before > (os.cpu_count() or 1) else ""),
    ])
    profile = Profile(
        model=config, config_hash=config.config_hash(), world_size=options.world_size,
        device_speeds=speeds, host=host_facts(device), compute=table, staging=staging.table,
        link=link, energy=energy, codecs=entries,
        input_bytes_per_token=input_bytes_per_token(model, token_counts[0], options.world_size, options.image_size),
        output_bytes_per_row=output_bytes_per_row(model), sealing=sealing,
        created_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), notes=notes)
    return ProfileReport(profile=profile, profile_seconds=time.perf_counter() - started, phase_seconds=phases,
                         sampled_batches=sampled, token_counts=token_counts, num_compute_points=len(shapes),
                         fit_median_rel_error=fit_median, fit_max_rel_error=fit_max, staging=staging.to_dict(),
                         link_test=raw_link, fidelity_note=fidelity_note,
                         load_average=(load_before, os.getloadavg()[0]))


def fidelity_entries(options: ProfileOptions, config: ModelConfig, codecs: Sequence,
                     say: Callable[[str], None]) -> tuple[tuple, str]:
    """Each codec's wire cost, own compute (encode/decode seconds per vector, timed here on one thread:
    profile/codec_timing.py) and fidelity (imported rows, the model's evaluation set, or unmeasured) → (entries,
    note)."""
    if options.fidelity_file:
        rows = load_fidelity_rows(options.fidelity_file)
        fidelity_note = f"fidelity imported from {options.fidelity_file}"
    elif options.evaluate:
        rows, fidelity_note = evaluate_fidelity(options.model, options.codec_names(), options.world_size,
                                                options.eval_limit, progress=say)
    else:
        rows, fidelity_note = [], "fidelity not measured (evaluation switched off)"
    selected = select_rows(rows, config.name, options.world_size)
    entries = codec_entries(codecs, config.exchange_width, selected, num_layers=config.num_layers,
                            shifts=label_shifts(rows, config.name, options.world_size))
    entries = timed_entries(entries, codecs, config.exchange_width, config.num_layers)
    say("codec timing: encode + decode per vector, one thread: "
        + ", ".join(f"{e.codec} {(e.encode_s_per_vector + e.decode_s_per_vector) * 1e6:.2f} us" for e in entries))
    unmeasured = [e.codec for e in entries if e.loss is None]
    if rows and unmeasured:
        fidelity_note += f"; no rows for {', '.join(unmeasured)} (unmeasured)"
    report_only = [f"{e.codec} ({e.report_only_metric})" for e in entries
                   if e.report_only_metric and e.fidelity_loss is None]
    if report_only:
        fidelity_note += (f"; measured only by a metric no budget applies to: {', '.join(report_only)} (unmeasured "
                          f"for the planner; measure next-token agreement with `edgeprism eval --out`)")
    return tuple(entries), fidelity_note


def held_out_batches(batches: Sequence[int], sampled: Sequence[int], count: int = 3) -> tuple[int, ...]:
    """Batch sizes for validation that the profile did not time: unsampled ones of the range, spread out;
    if fewer than `count` exist, midpoints between sampled ones."""
    candidates = sorted(set(batches) - set(sampled))
    if len(candidates) < count:
        points = sorted(sampled)
        mids = {round(math.sqrt(a * b)) for a, b in zip(points, points[1:])}
        candidates = sorted(set(candidates) | (mids - set(sampled)))
    if len(candidates) <= count:
        return tuple(candidates)
    step = (len(candidates) - 1) / (count - 1)
    return tuple(sorted({candidates[round(i * step)] for i in range(count)}))


__all__ = [
    "DEFAULT_BATCHES",
    "DEFAULT_SEQ_LENS",
    "ProfileOptions",
    "ProfileReport",
    "device_kind",
    "fidelity_entries",
    "held_out_batches",
    "host_facts",
    "input_bytes_per_token",
    "output_bytes_per_row",
    "run_profile",
    "token_counts_for",
    "usable_cores",
    "validate_options",
]
