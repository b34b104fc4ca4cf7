"""The coordinator that devices join over the network, and the device's side of joining.

One machine runs the coordinator (it is also rank 0 and holds the weights); every other device runs
`edgeprism join ADDR:PORT --secret-file F`. The coordinator hosts the rendezvous store on ADDR:PORT and
publishes there, sealed with the cluster secret, what a device needs to start alike (`ClusterSpec`: the
model, seed, whether the weights come from a checkpoint, the engine's settings and the profile). A device
connects, checks the spec's seal (a store run by anyone else is refused), loads the model, and asks to
be admitted as any free rank (edgeprism.runtime.membership); the coordinator checks its start digests
(model config, weights, profile) and takes it into the next epoch's lanes between two requests. A device
that leaves (Ctrl-C) says so and is planned around; one that dies is noticed by the next request that
needs it (rerun on rank 0) and by the liveness round after it. A device whose coordinator goes away, or
that was dropped, keeps trying to join again, with backoff, until it is stopped. With a succession list
of coordinators a device instead walks the list and may take over (edgeprism.runtime.succession).

Store keys under `edgeprism/` (besides membership's): `cluster/spec` (sealed ClusterSpec) and
`cluster/status` (sealed `Engine.cluster_status()`, rewritten every `join_check_s` by the coordinator's
ticker; `edgeprism cluster status ADDR:PORT` reads it).

The same path serves a local cluster (`edgeprism.runtime.cluster.launch_engine`): its worker processes
run `run_device` against a coordinator bound to 127.0.0.1, asking for their own rank.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from edgeprism.comm.auth import AuthError, open_sealed, seal
from edgeprism.comm.context import DistContext, pin_cpu
from edgeprism.models.base import ReferenceModel
from edgeprism.models.loading import load_model
from edgeprism.profile.profiler import device_kind, usable_cores
from edgeprism.profile.schema import Profile
from edgeprism.runtime.codec_states import install_codec_states
from edgeprism.runtime.config import EngineConfig
from edgeprism.runtime.engine import Engine
from edgeprism.runtime.groups import start_digests
from edgeprism.runtime.joining import admission_key, announce_leave, join_cluster
from edgeprism.runtime.store_filter import attach_allow_filter, raise_open_files_limit

log = logging.getLogger(__name__)

SPEC_KEY = "cluster/spec"
STATUS_KEY = "cluster/status"
MAX_SPEC_BYTES = 8 << 20
"""A profile with many codecs and fidelity rows is ~100 KB; the bound only keeps a forged value small."""
PREFIX = "edgeprism/"


@dataclass(frozen=True)
class ClusterSpec:
    """What every device must start with, published by the coordinator (sealed with the secret)."""

    model: str
    """Preset name (or the name the coordinator gave a checkpoint's architecture)."""
    seed: int
    """Seed of the random weights when there is no checkpoint."""
    checkpoint: bool
    """The coordinator's weights come from a checkpoint: each device must give its own copy."""
    world_size: int
    timeout_s: float
    config: dict[str, Any]
    """EngineConfig fields."""
    profile: dict[str, Any]
    """The profile the coordinator plans with (every rank must hold the same one)."""
    coordinators: tuple[str, ...] = ()
    """The succession list (HOST:PORT, in order) when the cluster fails over (edgeprism.runtime.succession);
    empty: this coordinator has no successor."""
    service: dict[str, Any] | None = None
    """What a promoted successor serves besides the store: the coordinator's HTTP API settings
    (`http_port`, `served_model_name`, `dynamic_batching`, `batch_window_s`, `outputs`); None: no HTTP."""

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, body: bytes) -> ClusterSpec:
        data = json.loads(body.decode())
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            raise ValueError(f"cluster spec has fields {sorted(data) if isinstance(data, dict) else data!r}, "
                             f"expected {sorted(names)}: coordinator and device run different edgeprism versions")
        data["coordinators"] = tuple(data["coordinators"])
        return cls(**data)


def parse_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """'HOST:PORT', '[v6]:PORT' or ':PORT' → (host, port); ValueError naming the problem."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"address {text!r} is not HOST:PORT with a port in 0..65535 (e.g. 192.168.1.10:29400)")
    host = host.strip("[]") or default_host
    return host, int(port)


def local_address_towards(host: str, port: int) -> str:
    """The address of this machine's interface that reaches host:port (no packet is sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port or 1))
        return probe.getsockname()[0]


def self_description(device: str, cores: tuple[int, ...]) -> dict[str, Any]:
    """What a process says of itself in the cluster status (and at admission, where a profile that recorded
    each rank's device checks `device_kind` and `num_cores`, as edgeprism.runtime.cluster_jobs describes them)."""
    return {"host": platform.node(), "pid": os.getpid(), "device": device, "cores": list(cores),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "device_kind": device_kind(device),
            "num_cores": usable_cores()}


def _sealed(secret: bytes | None, channel: bytes, body: bytes) -> bytes:
    return seal(admission_key(secret), channel, 0, body)


def publish_spec(store, secret: bytes | None, boot_nonce: bytes, spec: ClusterSpec) -> None:
    """Write the sealed spec, bound to this coordinator's boot nonce (a recorded one cannot be replayed)."""
    store.set(SPEC_KEY, _sealed(secret, b"spec" + boot_nonce, spec.to_json()))


def read_spec(store, secret: bytes | None, timeout_s: float, tries: int = 3, retry_s: float = 2.0) -> ClusterSpec:
    """The coordinator's spec; AuthError when its seal does not verify with our secret `tries` times,
    `retry_s` apart (the coordinator restores a spec or boot nonce that someone on the store overwrote)."""
    store.wait(["auth/boot", SPEC_KEY], timedelta(seconds=timeout_s))
    for attempt in range(tries):
        boot_nonce = store.get("auth/boot")
        try:
            body = open_sealed(admission_key(secret), b"spec" + boot_nonce, 0, store.get(SPEC_KEY), MAX_SPEC_BYTES)
            return ClusterSpec.from_json(body)
        except AuthError:
            if attempt + 1 < tries:
                time.sleep(retry_s)
    raise AuthError("the coordinator's cluster spec failed authentication: this device's secret file differs "
                    "from the coordinator's (copy the same file to every device)")


def publish_status(store, secret: bytes | None, status: dict) -> None:
    status = {**status, "published_at": time.time()}
    store.set(STATUS_KEY, _sealed(secret, b"status", json.dumps(status).encode()))


def read_status(address: str, secret: bytes | None, timeout_s: float = 10.0) -> dict:
    """`edgeprism cluster status`: the coordinator's last published status, checked with the secret."""
    host, port = parse_address(address)
    store = dist.TCPStore(host, port, None, False, timedelta(seconds=timeout_s))
    prefixed = dist.PrefixStore(PREFIX, store)
    prefixed.wait([STATUS_KEY], timedelta(seconds=timeout_s))
    body = open_sealed(admission_key(secret), b"status", 0, prefixed.get(STATUS_KEY), MAX_SPEC_BYTES)
    return json.loads(body.decode())


def start_store(host: str, port: int, timeout_s: float, allow: tuple = ()):
    """(store, port): the rendezvous store served on host:port (never all interfaces unless the host says
    so). Port 0 picks a free one. The store stops serving when the last reference to it goes. `allow`:
    IPv4 networks (besides this host) whose packets alone reach the store (edgeprism.runtime.store_filter)."""
    raise_open_files_limit()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as err:
        listener.close()
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror} (is the address this machine's, and the "
                         f"port free?)") from None
    if allow:
        try:
            attach_allow_filter(listener, allow, host)
        except ValueError:
            listener.close()
            raise
    listener.listen(128)
    port = listener.getsockname()[1]
    store = dist.TCPStore(host, port, None, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                          master_listen_fd=listener.fileno())
    listener.detach()  # the store owns the descriptor now (and closes it when it goes)
    return store, port


class Ticker:
    """The coordinator's idle duty: every `interval_s`, take in joined devices, drop departed ones
    (`Engine.tick`) and publish the cluster status; stopped by `stop()` (or when the engine closes)."""

    def __init__(self, engine: Engine, store, secret: bytes | None, interval_s: float) -> None:
        self.engine, self.store, self.secret, self.interval_s = engine, store, secret, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgeprism-coordinator-tick", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.engine.tick()
                publish_status(self.store, self.secret, self.engine.cluster_status())
            except Exception as err:
                if self._stop.is_set():
                    return
                log.warning("coordinator tick failed: %s: %s", type(err).__name__, err)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 30.0)


def coordinator_spec(model_name: str, seed: int, checkpoint: bool, world_size: int, timeout_s: float,
                     config: EngineConfig, profile: Profile, coordinators: tuple[str, ...] = (),
                     service: dict[str, Any] | None = None) -> ClusterSpec:
    return ClusterSpec(model=model_name, seed=seed, checkpoint=checkpoint, world_size=world_size,
                       timeout_s=timeout_s, config=dataclasses.asdict(config), profile=profile.to_dict(),
                       coordinators=tuple(coordinators), service=service)


# --- the device's side ---
@dataclass(frozen=True)
class DeviceOptions:
    """How a device joins: `edgeprism join`'s options."""

    address: str
    """The coordinator's HOST:PORT."""
    checkpoint: str | None = None
    device: str = "cpu"
    cores: tuple[int, ...] = ()
    rank: int = 0
    """0: any free rank (the coordinator picks); a local cluster asks for its own."""
    bind_addr: str | None = None
    """Where this device's data lanes listen (default: its interface towards the coordinator)."""
    connect_timeout_s: float = 60.0
    retry: bool = True
    """Keep trying to (re)join after the coordinator went away or dropped us; False: return instead."""
    max_backoff_s: float = 30.0
    full_retry_s: float = 2.0
    """How often to ask again while the cluster is full (a lost device's rank frees when rank 0's liveness
    round gives up on it)."""
    coordinators: tuple[str, ...] = ()
    """The succession list this device was given (edgeprism.runtime.succession); a coordinator publishing
    another one is refused (ValueError). Empty: no check."""


class ClusterFull(RuntimeError):
    """Every device rank is taken; retried, since a lost device's rank is freed after its liveness round."""


class Device:
    """A device's life in a cluster: join the coordinator and serve its plans; join again (with backoff)
    after losing it, when `options.retry`. `run()` blocks (call it on a thread of its own); `leave()`,
    from any other thread (the CLI's Ctrl-C), tells the coordinator over a connection of its own that
    this device is leaving — the serving thread may be blocked inside the store's C++ wait, where no
    Python signal handler runs. `on_event` gets one line per step (the CLI prints them)."""

    def __init__(self, options: DeviceOptions, secret: bytes | None, link=None,
                 on_event: Callable[[str], None] = lambda text: None) -> None:
        self.options, self.secret, self.link, self.on_event = options, secret, link, on_event
        self.host, self.port = parse_address(options.address)
        self.session = None
        """The current admission (None while not admitted)."""
        self.spec: ClusterSpec | None = None
        """The last cluster spec read from a coordinator (what a promoted successor starts with)."""
        self.served = 0
        self._loaded: dict[tuple, ReferenceModel] = {}

    def connect_to(self, address: str) -> None:
        """Join the coordinator at `address` from the next `run()` on (a succession list's walk)."""
        self.host, self.port = parse_address(address)

    @property
    def model(self) -> ReferenceModel | None:
        """The model loaded for the last spec (None before the first)."""
        return next(iter(self._loaded.values()), None)

    def run(self) -> int:
        """Serve until the coordinator ends the session (no retry) or forever (retry). Returns the number of
        distributed requests served. ValueError when the coordinator refuses this device for a reason retrying
        cannot fix (different model, weights or profile; the cluster is full); AuthError for a wrong secret."""
        options = self.options
        if options.cores:
            pin_cpu(options.cores)
        bind_addr = options.bind_addr or local_address_towards(self.host, self.port)
        backoff_s = 1.0
        while True:
            try:
                self.served += self._serve_once(bind_addr)
                backoff_s = 1.0
                if not options.retry:
                    return self.served
                self.on_event("the coordinator ended the session; waiting for it to serve again")
            except AuthError:
                raise
            except ClusterFull as err:
                self.on_event(f"{err}; trying again in {options.full_retry_s:.0f} s")
                time.sleep(options.full_retry_s)
                continue
            except (RuntimeError, ConnectionError, TimeoutError) as err:  # DistStoreError is a RuntimeError
                self.on_event(f"lost the coordinator at {self.host}:{self.port}: {_short(err)}")
                if not options.retry:
                    return self.served
                self.on_event(f"joining again in {backoff_s:.0f} s")
            finally:
                self.session = None
            time.sleep(backoff_s)
            backoff_s = min(options.max_backoff_s, backoff_s * 2)

    def leave(self) -> bool:
        """Tell the coordinator this device leaves (it plans without it from its next tick). False when
        not admitted, or the coordinator cannot be reached."""
        session = self.session
        if session is None:
            return False
        try:
            store = dist.TCPStore(self.host, self.port, None, False, timedelta(seconds=5))
            announce_leave(dist.PrefixStore(PREFIX, store), session)
        except (RuntimeError, ConnectionError) as err:
            self.on_event(f"could not say goodbye to the coordinator: {_short(err)}")
            return False
        self.on_event(f"left the cluster (rank {session.rank})")
        return True

    def _serve_once(self, bind_addr: str) -> int:
        options, secret = self.options, self.secret
        store = dist.TCPStore(self.host, self.port, None, False, timedelta(seconds=options.connect_timeout_s))
        prefixed = dist.PrefixStore(PREFIX, store)
        spec = read_spec(prefixed, secret, options.connect_timeout_s)
        if options.coordinators and tuple(spec.coordinators) != tuple(options.coordinators):
            raise ValueError(f"the coordinator at {self.host}:{self.port} has the succession list "
                             f"{','.join(spec.coordinators) or '(none)'}, this device "
                             f"{','.join(options.coordinators)}: give every machine the same --coordinators")
        self.spec = spec
        if spec.checkpoint and options.checkpoint is None:
            raise ValueError(f"the coordinator serves {spec.model} with weights from a checkpoint; give this device "
                             f"its copy of the same checkpoint folder with --checkpoint DIR")
        profile = Profile.from_dict(spec.profile)
        for path in install_codec_states(prefixed, secret, profile, f"{self.host}:{self.port}"):
            self.on_event(f"installed a calibrated codec's state from the coordinator: {path}")
        key = (spec.model, options.checkpoint, spec.seed)
        if key not in self._loaded:
            self.on_event(f"loading {spec.model}" + (f" from {options.checkpoint}" if options.checkpoint else
                                                    f" (seeded random weights, seed {spec.seed})"))
            self._loaded = {key: load_model(spec.model, options.checkpoint, seed=spec.seed)}
        model = self._loaded[key]
        config = EngineConfig(**spec.config)
        try:
            session = join_cluster(prefixed, secret, options.rank, start_digests(model, profile),
                                   options.connect_timeout_s, info=self_description(options.device, options.cores))
        except ValueError as err:
            if str(err).startswith("the cluster is full"):  # a lost device's rank frees after its liveness round
                raise ClusterFull(str(err)) from None
            raise
        self.session = session
        self.on_event(f"admitted as rank {session.rank} of {spec.world_size} by {self.host}:{self.port}; lanes on "
                      f"{bind_addr}")
        ctx = DistContext(group_rank=session.rank, world_size=spec.world_size, backend="gloo",
                          device=torch.device(options.device), timeout_s=spec.timeout_s, link=self.link,
                          cores=options.cores)
        engine = Engine(model, profile, ctx, config, store=prefixed, secret=secret, bind_addr=bind_addr,
                        session=session, self_info=self_description(options.device, options.cores))
        served = engine.serve_workers()
        self.on_event(f"rank {session.rank}: the coordinator ended the session after {served} distributed requests")
        return served


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


__all__ = ["ClusterSpec", "Device", "DeviceOptions", "Ticker", "coordinator_spec", "local_address_towards",
           "parse_address", "publish_spec", "publish_status", "read_spec", "read_status", "self_description",
           "start_store"]
