"""Process groups of the engine, and the per-exchange record it learns from.

- One data *lane* per candidate rank subset containing rank 0: a GLOO group, its own DistContext
  (group-relative ranks) and Exchanger, and one PositionWise per codec. The engine builds the lanes of
  an *epoch* (`build_epoch_lanes`) as `ProcessGroupGloo` objects over a `PrefixStore("epoch{n}-{tag}/...")`
  of the rendezvous store (a tag only holders of the secret can compute: `LaneKeys`, which also seals
  the lanes' messages when asked), over the members alive at the time, so that they can be rebuilt
  without the dead rank, or with a returning one, while rank 0 keeps running; torch's default group
  cannot shrink or grow. A broken epoch's groups are aborted and dropped on a background thread (`retire_lanes`):
  a group whose peer hangs blocks its destructor until the group's own timeout.
- `make_lanes` / `make_control` build the same over the default group (`dist.new_group`), for callers
  that run under one fixed process group.
- The start-up check: sha256 digests of the model config, a weights fingerprint and the profile
  (`start_digests`), compared with rank 0's at admission (edgeprism.runtime.membership) or, over the
  default group, by `verify_same_start`.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from edgeprism.comm.context import DistContext
from edgeprism.comm.exchange import Exchanger, ExchangeStats
from edgeprism.comm.sealing import LaneSealer, lane_key, lane_store_tag
from edgeprism.models.base import ReferenceModel
from edgeprism.profile.schema import Profile

ALL_SUBSETS_UP_TO = 4
"""Up to this world size a lane is made for every subset with rank 0 (7 for 4 ranks); above it only for
the subsets the planner can choose (rank 0 plus the k - 1 fastest others: edgeprism.plan.planner)."""

_SAMPLES_PER_TENSOR = 4096
log = logging.getLogger(__name__)


@dataclass
class RecordingStats(ExchangeStats):
    """ExchangeStats that also keeps every exchange: (kind, bytes sent, emulated delay s, collective s)."""

    events: list[tuple[str, int, float, float]] = field(default_factory=list)

    def add(self, kind: str, sent: int, received: int, staging_s: float, collective_s: float, delay_s: float) -> None:
        super().add(kind, sent, received, staging_s, collective_s, delay_s)
        self.events.append((kind, sent, delay_s, collective_s))


def default_store(ctx: DistContext):
    """The launcher's rendezvous store (torchrun's, or the default group's), under `edgeprism/`, and under
    torchrun's restart count as well: the elastic agent's store outlives a restart, and keys of the
    previous attempt (boot nonce, join slots) must not be read by the next."""
    store = dist.distributed_c10d._get_default_store()
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "")
    return dist.PrefixStore(f"edgeprism/{attempt}/" if attempt else "edgeprism/", store)


def start_recording(exchanger) -> RecordingStats:
    """Give `exchanger` fresh recording stats (works for Exchanger and the loopback fake alike)."""
    exchanger.stats = RecordingStats()
    return exchanger.stats


def weights_fingerprint(model: ReferenceModel) -> str:
    """sha256 over every tensor's name, shape, dtype and an evenly strided sample of its values:
    different seeds or checkpoints differ in it, and it costs milliseconds even for ViT-B."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step][:_SAMPLES_PER_TENSOR].to("cpu").contiguous()
        digest.update(bytes(sample.view(torch.uint8).numpy()))
    return digest.hexdigest()


def start_digests(model: ReferenceModel, profile: Profile) -> dict[str, bytes]:
    config = json.dumps(model.config.to_dict(), sort_keys=True)
    return {"model config": hashlib.sha256(config.encode()).digest(),
            "weights": hashlib.sha256(weights_fingerprint(model).encode()).digest(),
            "profile": hashlib.sha256(profile.profile_hash().encode()).digest()}


def verify_same_start(exchanger, model: ReferenceModel, profile: Profile) -> None:
    """Collective: raise the same ValueError on every rank when a rank's model or profile differs."""
    ctx = exchanger.ctx
    if ctx.world_size == 1:
        return
    digests = start_digests(model, profile)
    mine = b"".join(digests.values())
    payload = torch.frombuffer(bytearray(mine), dtype=torch.uint8)
    gathered = exchanger.all_gather_bytes(payload, [len(mine)] * ctx.world_size, kind="control")
    reference = bytes(gathered[0].numpy())
    problems = []
    for rank, got in enumerate(gathered[1:], start=1):
        got = bytes(got.numpy())
        differing = [name for i, name in enumerate(digests)
                     if got[32 * i:32 * (i + 1)] != reference[32 * i:32 * (i + 1)]]
        if differing:
            problems.append(f"rank {rank}: {', '.join(differing)}")
    if problems:
        raise ValueError(f"ranks did not start alike ({'; '.join(problems)} differ from rank 0's): start every "
                         f"rank with the same model, checkpoint (or seed) and profile")


def candidate_subsets(profile: Profile, members: tuple[int, ...] | None = None) -> list[tuple[int, ...]]:
    """Rank subsets (sorted, with rank 0, size >= 2) of `members` (default: every rank) that get a lane;
    the same list on every rank."""
    world = profile.world_size
    others = [r for r in range(1, world) if members is None or r in members]
    if world <= ALL_SUBSETS_UP_TO:
        return [(0, *rest) for size in range(1, len(others) + 1) for rest in itertools.combinations(others, size)]
    speeds = profile.device_speeds
    order = sorted(others, key=lambda r: (-speeds[r], r))
    return [tuple(sorted((0, *order[:size]))) for size in range(1, len(others) + 1)]


@dataclass
class Lane:
    """A data subgroup: the plan's ranks, this rank's context in it (None if not a member), its exchanger,
    and one PositionWise per codec (made on first use)."""

    ranks: tuple[int, ...]
    ctx: DistContext | None
    exchanger: Exchanger | None
    transforms: dict = field(default_factory=dict)

    def transform(self, model: ReferenceModel, codec_name: str, size_aware: bool, overlap: bool = True,
                  micro_batches: int = 1):
        from edgeprism.compress.registry import get_codec
        from edgeprism.partition.transform import PositionWise

        key = (codec_name, size_aware, overlap, micro_batches)
        if key not in self.transforms:
            self.transforms[key] = PositionWise(model, self.ctx, get_codec(codec_name), size_aware=size_aware,
                                                exchanger=self.exchanger, overlap=overlap,
                                                micro_batches=micro_batches)
        return self.transforms[key]


def make_group(ranks: list[int], timeout_s: float):
    """A GLOO subgroup (every rank of the default group must call this, in the same order).
    GLOO always: the exchanger stages tensors to CPU, even on a CUDA device."""
    return dist.new_group(ranks=ranks, timeout=timedelta(seconds=timeout_s), backend="gloo")


def sub_context(ctx: DistContext, ranks: tuple[int, ...], group, timeout_s: float) -> DistContext:
    return DistContext(group_rank=ranks.index(ctx.group_rank), world_size=len(ranks), backend="gloo",
                       device=ctx.device, timeout_s=timeout_s, group=group, link=ctx.link, cores=ctx.cores)


def make_lanes(ctx: DistContext, profile: Profile) -> dict[tuple[int, ...], Lane]:
    lanes = {}
    for ranks in candidate_subsets(profile):
        group = make_group(list(ranks), ctx.timeout_s)
        member = ctx.group_rank in ranks
        sub = sub_context(ctx, ranks, group, ctx.timeout_s) if member else None
        lanes[ranks] = Lane(ranks, sub, Exchanger(sub) if member else None)
    return lanes


def make_control(ctx: DistContext, idle_timeout_s: float) -> Exchanger:
    ranks = tuple(range(ctx.world_size))
    group = make_group(list(ranks), idle_timeout_s)
    return Exchanger(sub_context(ctx, ranks, group, idle_timeout_s))


def gloo_group(store, group_rank: int, size: int, timeout_s: float, bind_addr: str | None):
    """A ProcessGroupGloo over `store`. `bind_addr` pins its listening socket to that address (e.g.
    127.0.0.1); None picks the interface as torch does (GLOO_SOCKET_IFNAME, else the hostname)."""
    gloo = dist.ProcessGroupGloo
    if bind_addr is None:
        return gloo(store, group_rank, size, timedelta(seconds=timeout_s))
    options = gloo._Options()
    options._timeout = timedelta(seconds=timeout_s)
    options._devices = [gloo.create_device(hostname=bind_addr)]
    return gloo(store, group_rank, size, options)


@dataclass(frozen=True)
class LaneKeys:
    """What an epoch's lanes are keyed with: the cluster secret (the admission key when there is none) and
    rank 0's boot nonce; `sealed`: whether every lane message is sealed (edgeprism.comm.sealing)."""

    secret: bytes = field(repr=False)
    boot_nonce: bytes
    sealed: bool

    def prefix(self, epoch: int) -> str:
        return f"epoch{epoch}-{lane_store_tag(self.secret, self.boot_nonce, epoch)}/"

    def sealer(self, epoch: int, ranks: tuple[int, ...], group_rank: int) -> LaneSealer | None:
        if not self.sealed:
            return None
        return LaneSealer(lane_key(self.secret, self.boot_nonce, epoch, ranks), group_rank)


def build_epoch_lanes(ctx: DistContext, store, epoch: int, profile: Profile, members: tuple[int, ...],
                      timeout_s: float, build_timeout_s: float, bind_addr: str | None,
                      keys: LaneKeys | None = None) -> dict[tuple[int, ...], Lane]:
    """Collective over `members` (every member calls it with the same arguments): this epoch's lanes.
    Connecting all of them must finish within `build_timeout_s` (RuntimeError otherwise); collectives later
    time out after `timeout_s`.
    `keys`: the lanes' rendezvous keys carry a tag only members can compute, and their messages are sealed
    when `keys.sealed` (None: plain `epoch{n}/` keys, nothing sealed)."""
    lanes: dict[tuple[int, ...], Lane] = {}
    epoch_prefix = keys.prefix(epoch) if keys is not None else f"epoch{epoch}/"
    # One deadline for the whole epoch, not `build_timeout_s` per lane: with a member unreachable, each of
    # the up to 7 lanes that include it would wait it out in turn (29 s of a chaos run's rank 0, all requests
    # queued behind it, where 5 s was meant).
    deadline = time.monotonic() + build_timeout_s
    try:
        for ranks in candidate_subsets(profile, members):
            if ctx.group_rank not in ranks:
                lanes[ranks] = Lane(ranks, None, None)
                continue
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise RuntimeError(f"epoch {epoch}: lanes over {list(members)} did not connect within "
                                   f"{build_timeout_s:g} s ({len(lanes)} of them built)")
            prefix = dist.PrefixStore(f"{epoch_prefix}lane{'-'.join(map(str, ranks))}/", store)
            group = gloo_group(prefix, ranks.index(ctx.group_rank), len(ranks), remaining_s, bind_addr)
            group.set_timeout(timedelta(seconds=timeout_s))
            sub = sub_context(ctx, ranks, group, timeout_s)
            exchanger = Exchanger(sub)
            if keys is not None:
                exchanger.sealer = keys.sealer(epoch, ranks, sub.group_rank)
            lanes[ranks] = Lane(ranks, sub, exchanger)
    except BaseException:
        retire_lanes(lanes, timeout_s)
        raise
    return lanes


def retire_lanes(lanes: dict[tuple[int, ...], Lane], linger_s: float = 0.0, background: bool = True) -> None:
    """End the lanes' exchangers and keep their groups on a daemon thread for `linger_s` (the groups' timeout): a
    group's destructor waits for an operation stuck on a hung peer, and that wait must not fall on the
    thread that serves requests. After the timeout the stuck operation has failed and dropping is quick.
    `background=False` drops them here and now (closing with no request in flight). A group must not be
    destroyed on a daemon thread while the interpreter exits (the process aborts in its C++ destructor): at
    exit the thread stops freeing and keeps what it holds."""
    groups = [lane.ctx.group for lane in lanes.values() if lane.ctx is not None]
    for lane in lanes.values():
        if lane.exchanger is not None:
            lane.exchanger.close()  # its background thread would otherwise keep the group alive for good
    lanes.clear()
    if not groups:
        return
    # No `group.abort()` here: GLOO's abort closes the group's sockets and its destructor closes them again
    # later — by then the descriptor numbers may belong to other files of this process (seen as "Bad file
    # descriptor" on an unrelated pipe). The destructor alone waits out a stuck operation (the group's
    # timeout) on the daemon thread below and closes each socket once.

    if not background:
        time.sleep(linger_s)
        groups.clear()
        return
    exiting, freeing = threading.Event(), threading.Lock()

    def at_exit() -> None:
        # The interpreter is ending: a group destroyed on a daemon thread from now on dies in its C++
        # destructor (the thread is unwound when it next takes the GIL: "terminate called without an active
        # exception"). Stop the thread from freeing, and let a destruction already under way finish (quick:
        # it starts only after the linger, when no operation is stuck any more).
        exiting.set()
        if freeing.acquire(timeout=linger_s + 5.0):
            freeing.release()

    def drop(held=groups) -> None:
        exiting.wait(linger_s)
        with freeing:
            if not exiting.is_set():
                held.clear()
        atexit.unregister(at_exit)
        if exiting.is_set():
            threading.Event().wait()  # park with the groups: they go with the process

    atexit.register(at_exit)
    threading.Thread(target=drop, name="edgeprism-retire-groups", daemon=True).start()


__all__ = [
    "ALL_SUBSETS_UP_TO",
    "Lane",
    "LaneKeys",
    "RecordingStats",
    "build_epoch_lanes",
    "candidate_subsets",
    "default_store",
    "gloo_group",
    "make_control",
    "make_lanes",
    "retire_lanes",
    "start_digests",
    "start_recording",
    "verify_same_start",
    "weights_fingerprint",
]
