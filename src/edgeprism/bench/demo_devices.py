"""The demo's strategies over devices of different speeds and counts (issue 17), beside `bench.demo`.

* `equal_split`: every device, equal token shares, with the codec the planner would pick for the whole group.
* `split:a/b/...`: the same with fixed shares in steps of `share_step` (percent per rank), for the oracle.
* `world:k` (2 <= k < P): the planner's best plan over exactly k devices — rank 0 and the k - 1 fastest others,
  balanced shares, the best admissible codec — so that the oracle is the best over every world size 1..P
  (`local` is k = 1; `equal_split`, the sweep and the adaptive plan's own choice cover k = P).
* `fast_alone` (derived): the `local` rows, which run on the fastest device (rank 0).

**Faithful codecs only.** With devices (`speeds`), the demo's plans use codecs that send every token
(`cr == 1`: the lossless float wires, and per-value quantisers where their loss was measured within the
budget or opted in with `--allow-unmeasured-codecs`); Segment Means (`cr > 1`) stays a labelled baseline.
Each row carries `codec_class` saying which kind of answer it gave.
"""

from __future__ import annotations

from edgeprism.compress.registry import is_lossless
from edgeprism.partition.ranges import apportion
from edgeprism.plan import static_plan
from edgeprism.plan.planner import codec_exclusion
from edgeprism.plan.types import Limits, Plan, Request
from edgeprism.profile.schema import Profile


def share_sweep(world_size: int, step: float) -> tuple[str, ...]:
    """`split:a/b/...` labels (percent per rank) of every split in steps of `step` (none for step 0)."""
    if step <= 0:
        return ()
    units = round(1 / step)
    out: list[str] = []

    def rec(prefix: list[int], left: int, slots: int) -> None:
        if slots == 1:
            out.append("split:" + "/".join(str(round(u * step * 100)) for u in (*prefix, left)))
            return
        for u in range(1, left - slots + 2):
            rec([*prefix, u], left - u, slots - 1)

    rec([], units, world_size)
    return tuple(out)


def world_sizes(world_size: int) -> tuple[str, ...]:
    """`world:k` labels for the group sizes strictly between one device and all of them."""
    return tuple(f"world:{k}" for k in range(2, world_size))


def device_codecs(profile: Profile, codecs: tuple[str, ...], speeds: tuple[float, ...]) -> tuple[str, ...] | None:
    """The demo's codec allow-list (`Limits.codecs`): `codecs` when given; with devices (`speeds`) the profile's
    codecs that send every token (no Segment Means); else None (any, under the fidelity rules)."""
    if codecs:
        unknown = sorted(set(codecs) - {c.codec for c in profile.codecs})
        if unknown:
            raise ValueError(f"codecs {unknown} are not in the profile (it has {[c.codec for c in profile.codecs]})")
        return tuple(codecs)
    if speeds:
        return tuple(c.codec for c in profile.codecs if c.cr == 1)
    return None


def group_of(profile: Profile, link, size: int) -> tuple[int, ...]:
    """Rank 0 and the `size` - 1 fastest other devices at their live speeds (the planner's group of that size)."""
    speeds = link.effective_speeds(profile.device_speeds)
    others = sorted(range(1, profile.world_size), key=lambda r: (-speeds[r], r))[:size - 1]
    return tuple(sorted((0, *others)))


def subset_plan(profile: Profile, request: Request, link, ranks: tuple[int, ...], objective: str,
                limits: Limits, token_counts: tuple[int, ...] | None = None) -> Plan | None:
    """The best plan over exactly `ranks` (the planner's split, or `token_counts`) with any codec `limits`
    admit, by predicted latency; None when no codec is admitted."""
    best = None
    for codec in profile.codecs:
        if codec_exclusion(codec, limits) is not None:
            continue
        plan = static_plan(profile, request, link, "distributed", codec.codec, ranks, objective,
                           token_counts=token_counts)
        if best is None or plan.predicted_latency_s < best.predicted_latency_s:
            best = plan
    return best


def device_plan(profile: Profile, request: Request, link, strategy: str, objective: str,
                limits: Limits) -> Plan | None:
    """The static plan of a device strategy (`equal_split`, `split:...`, `world:k`); None: nothing admitted."""
    world = profile.world_size
    if strategy.startswith("world:"):
        return subset_plan(profile, request, link, group_of(profile, link, int(strategy[6:])), objective, limits)
    weights = [1.0] * world if strategy == "equal_split" else [float(x) for x in strategy[6:].split("/")]
    counts = apportion(request.num_tokens, weights)
    return subset_plan(profile, request, link, tuple(range(world)), objective, limits, token_counts=counts)


def add_fast_alone(rows: list[dict], speeds: tuple[float, ...]) -> list[dict]:
    """The fastest device alone: the `local` rows (rank 0 is the fastest), labelled as such."""
    if not speeds:
        return list(rows)
    label = f"local on rank 0 ({speeds[0]:g} core, the fastest)"
    return [*rows, *({**r, "strategy": "fast_alone", "plan": label} for r in rows if r["strategy"] == "local")]


def codec_class(plan: dict, fidelity_loss: float | None, max_fidelity_loss: float | None) -> str:
    """What kind of answer a row's plan gives: exact, lossless, measured faithful, measured over budget,
    unmeasured (opted in), or a Segment Means baseline."""
    codec = plan.get("codec") or ""
    if plan.get("mode") == "local" or codec == "fp32":
        return "exact"
    if is_lossless(codec):
        return "lossless"
    if fidelity_loss is None:
        return "segment-means (unmeasured)" if int(plan.get("cr", 1)) > 1 else "unmeasured (opted in)"
    within = max_fidelity_loss is None or fidelity_loss <= max_fidelity_loss
    return "measured faithful" if within else "measured over budget"


__all__ = ["add_fast_alone", "codec_class", "device_codecs", "device_plan", "group_of", "share_sweep",
           "subset_plan", "world_sizes"]
