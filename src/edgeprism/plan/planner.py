"""The planner: for one request, run locally or distributed, over which ranks, with which codec.

Pure: the decision is a function of (profile, request, live link estimate, objective, limits) only.

Faithful by default: `Limits()` admits only codecs whose loss for this model was measured within 1 %
(lossless float wires count as 0); a codec of unmeasured fidelity needs `allow_unmeasured_codecs`. A loss
measured by a metric no budget applies to (a decoder's perplexity: its budget is on next-token agreement,
`evaluate.metrics`) counts as unmeasured, and the plan's reason says so.

Candidates are local, and for every group size k = 2..healthy ranks and every profiled codec the runtime can
run (kv-share codecs only on an encoder's overlapped path: `path_exclusion`), the
distributed plan over rank 0 plus the k-1 fastest other healthy ranks, each with the token splits of
`plan.shares.candidate_splits` (balanced to the devices' speeds, and blends towards equal shares). Speeds
are the profile's times the live per-device scale (`LinkEstimate.device_speed_scale`: a straggler slowed
since profiling counts at its measured speed), so a slow device gets a small share, or is left out when
the groups without it score better. Other subsets of the same size are never better under the cost
model: the compute term falls as the group's total speed rises, and the link terms depend on k and the
codec only (one power model per profile). Ties keep the earlier candidate: local, then smaller groups,
then codecs lightest on the wire first (profile order among equals), then the balanced split.

Speed (< 100 µs a call for a few ranks and codecs of equal speed; devices of different speeds cost
more: `scripts/bench_planner.py` at load ~7 on this 2-core VM, 60-85 µs over 2 ranks, 150-430 µs over 4,
0.4-1.2 ms over 8, 3-5x the equal-speed figures): tables that depend on the profile alone (rank order,
the codecs no other codec dominates, the cost constants, the balanced splits of recent requests) are
derived once per profile instance; a rank group, or a codec within it, whose lower bound cannot beat
the best so far is skipped; only the best codec of a group tries the blends towards equal shares.
"""

from __future__ import annotations

from collections.abc import Sequence

from edgeprism.plan.constants import request_constants
from edgeprism.plan.cost import (
    CodecTerms,
    CostConstants,
    GroupTerms,
    codec_terms,
    distributed_prediction,
    distributed_terms,
    group_bound,
    group_terms,
    local_prediction,
    local_terms,
    objective_score,
    profile_constants,
)
from edgeprism.plan.micro import best_over_micro_batches
from edgeprism.plan.shares import SplitCache, candidate_splits
from edgeprism.plan.types import OBJECTIVES, Candidate, Limits, LinkEstimate, Plan, Request
from edgeprism.profile.schema import CodecFidelity, Profile

_DEFAULT_LIMITS = Limits()
_INF = float("inf")


def _check(profile: Profile, request: Request, objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if request.model_name != profile.model.name:
        raise ValueError(f"request is for model {request.model_name}, the profile for {profile.model.name}")


def _rank_order(profile: Profile) -> tuple[int, ...]:
    """Ranks other than 0, fastest first (lowest rank on ties)."""
    speeds = profile.device_speeds
    return tuple(sorted(range(1, profile.world_size), key=lambda r: (-speeds[r], r)))


def _groups(profile: Profile, link: LinkEstimate) -> list[tuple[int, ...]]:
    """Rank groups to consider, one per size >= 2: rank 0 plus the fastest other healthy ranks (at their
    live speeds)."""
    if link.device_speed_scale is None:
        order = profile.derived("plan.rank_order", _rank_order)
    else:
        speeds = link.effective_speeds(profile.device_speeds)
        order = tuple(sorted(range(1, profile.world_size), key=lambda r: (-speeds[r], r)))
    if link.healthy_ranks is not None:
        healthy = set(link.healthy_ranks)
        order = tuple(r for r in order if r in healthy)
    return [tuple(sorted((0, *order[:size]))) for size in range(1, len(order) + 1)]


def _dominates(a: CodecFidelity, b: CodecFidelity) -> bool:
    """`a` costs no more than `b` in every term of the cost model (fewer or equal vectors, bytes and codec
    seconds per vector, the same kv share) and loses no more fidelity, so whenever `b` is admissible `a` is too
    and predicts no worse."""
    loss_a = _INF if a.fidelity_loss is None else a.fidelity_loss
    loss_b = _INF if b.fidelity_loss is None else b.fidelity_loss
    return (a.cr >= b.cr and a.extra_vectors_per_row <= b.extra_vectors_per_row
            and a.kv_share == b.kv_share  # a kv share trades wire bytes for compute: the same share only
            and (not a.kv_share or a.kv_tokens(100) == b.kv_tokens(100))
            and a.wire_bytes_per_token <= b.wire_bytes_per_token and a.wire_bytes_per_row <= b.wire_bytes_per_row
            and a.encode_s_per_vector <= b.encode_s_per_vector and a.decode_s_per_vector <= b.decode_s_per_vector
            and loss_a <= loss_b)


def _undominated_codecs(profile: Profile) -> tuple[CodecFidelity, ...]:
    return _undominated(profile.codecs)


def _undominated(codecs: Sequence[CodecFidelity]) -> tuple[CodecFidelity, ...]:
    """Codecs worth evaluating in `choose_plan`: a codec dominated by another is dropped (between two
    that cost and lose the same, the one listed first stays). Ordered lightest on the wire first so
    that the best is found early and the bounds prune the rest (ties: profile order)."""
    keep = []
    for j, b in enumerate(codecs):
        if not any(_dominates(a, b) and (i < j or not _dominates(b, a)) for i, a in enumerate(codecs) if i != j):
            keep.append((b.wire_bytes_per_token, j, b))
    return tuple(b for _, _, b in sorted(keep, key=lambda t: t[:2]))


def codec_exclusion(codec: CodecFidelity, limits: Limits) -> str | None:
    """Why `codec` may not be used under `limits`, or None if it may."""
    loss = codec.fidelity_loss
    if limits.allows(codec.codec, loss):
        return None
    if limits.codecs is not None and codec.codec not in limits.codecs:
        return f"{codec.codec}: not among the allowed codecs ({', '.join(limits.codecs)})"
    if loss is None and codec.report_only_metric:
        return (f"{codec.codec}: measured by {codec.report_only_metric} only ({codec.loss:.2%} loss), which no "
                f"budget applies to: a decoder's budget is on next-token agreement (measure it with `edgeprism eval "
                f"--out`, import with `edgeprism profile --fidelity`, or opt in with --allow-unmeasured-codecs)")
    if loss is None:
        return (f"{codec.codec}: fidelity not measured for this model (measure it with `edgeprism profile`, "
                f"or opt in with --allow-unmeasured-codecs)")
    return (f"{codec.codec}: {codec.metric or 'metric'} loss {loss:.2%} exceeds the budget "
            f"{limits.max_fidelity_loss:.2%}")


def path_exclusion(codec: CodecFidelity, constants: CostConstants) -> str | None:
    """Why the runtime cannot run `codec` the way it will run this plan (`CostConstants.kv_share`), or None."""
    if codec.kv_share and not constants.kv_share:
        return (f"{codec.codec}: keys and values travel only on an encoder's overlapped path (overlap on; "
                f"partition.kvwire.kv_share_refusal)")
    return None


def _plan(profile: Profile, objective: str, ranks: tuple[int, ...], counts: tuple[int, ...],
          codec: CodecFidelity | None, latency_s: float, energy_j: float, reason: str, within: bool = True) -> Plan:
    if codec is None:
        return Plan(mode="local", ranks=(0,), token_shares=(1.0,), token_counts=counts, codec="", cr=1, wire_dtype="",
                    predicted_latency_s=latency_s, predicted_energy_j=energy_j, energy_source=profile.energy.source,
                    objective=objective, reason=reason, within_limits=within,  # type: ignore[arg-type]
                    profile_hash=profile.profile_hash(), fidelity_loss=0.0)
    shares = tuple(n / sum(counts) for n in counts)
    return Plan(mode="distributed", ranks=ranks, token_shares=shares, token_counts=counts, codec=codec.codec,
                cr=codec.cr, wire_dtype=codec.wire_dtype, predicted_latency_s=latency_s, predicted_energy_j=energy_j,
                energy_source=profile.energy.source, objective=objective, reason=reason,  # type: ignore[arg-type]
                within_limits=within, profile_hash=profile.profile_hash(), fidelity_loss=codec.fidelity_loss)


def _describe(ranks: tuple[int, ...], codec: CodecFidelity | None) -> str:
    return "local" if codec is None else f"{codec.codec} over ranks {list(ranks)}"


def choose_plan(profile: Profile, request: Request, live_link_estimate: LinkEstimate,
                objective: str = "latency", limits: Limits = _DEFAULT_LIMITS) -> Plan:
    """The best plan for `request` under `objective` within `limits`, with its prediction and reason.

    If no candidate meets `limits.max_latency_s`, the fastest fidelity-admissible one is returned with
    `within_limits=False` (local is always admissible: it is the exact reference). Tables derived from
    the profile alone are computed on the first call and kept on the profile instance. Where the link
    estimate offers several micro-batch counts, the plan is chosen at each and the best kept (plan/micro.py)."""
    return best_over_micro_batches(lambda link: _choose_at(profile, request, link, objective, limits),
                                   live_link_estimate, request.batch, profile.model.causal, objective)


def _choose_at(profile: Profile, request: Request, live_link_estimate: LinkEstimate, objective: str,
               limits: Limits) -> Plan:
    """`choose_plan` at the link estimate's one micro-batch count."""
    _check(profile, request, objective)
    batch, num_tokens = request.batch, request.num_tokens
    bandwidth_bps, link_latency_s = live_link_estimate.bandwidth_bps, live_link_estimate.latency_s
    ceiling = limits.max_latency_s
    budget = limits.max_fidelity_loss
    listed = profile.codecs if limits.codecs is None else [c for c in profile.codecs if c.codec in limits.codecs]
    # Dominance is taken among the listed codecs only: an unlisted codec must not hide a listed one it dominates.
    candidates = (profile.derived("plan.undominated_codecs", _undominated_codecs) if limits.codecs is None
                  else _undominated(listed))
    constants = _constants(profile, live_link_estimate, request)
    codecs = tuple(c for c in candidates if limits.admits(c.fidelity_loss) and not path_exclusion(c, constants))
    num_unlisted = len(profile.codecs) - len(listed)
    losses = [c.fidelity_loss for c in listed]
    num_over_budget = sum(1 for loss in losses if loss is not None and not limits.admits(loss))
    num_unmeasured = sum(1 for loss in losses if loss is None and not limits.admits(None))
    report_only = sorted({f"{c.codec} ({c.report_only_metric})" for c in listed
                          if c.fidelity_loss is None and c.report_only_metric and not limits.admits(None)})
    num_off_path = sum(1 for c in listed if limits.admits(c.fidelity_loss) and path_exclusion(c, constants))
    num_fidelity_excluded = num_over_budget + num_unmeasured + num_unlisted
    num_admissible = len(profile.codecs) - num_fidelity_excluded - num_off_path

    local_s, local_j = local_terms(profile, batch, num_tokens, _local_scale(profile, live_link_estimate))
    # An option: (score, latency_s, energy_j, ranks, counts, codec or None for local).
    best: tuple[float, float, float, tuple[int, ...], tuple[int, ...], CodecFidelity | None] | None = None
    fastest: tuple[float, float, tuple[int, ...], tuple[int, ...], CodecFidelity | None] = (
        local_s, local_j, (0,), (num_tokens,), None)
    num_weighed = 1
    num_over_ceiling = 0
    if ceiling is None or local_s <= ceiling:
        best = (objective_score(objective, local_s, local_j), local_s, local_j, (0,), (num_tokens,), None)
    else:
        num_over_ceiling += 1
    speeds_all = live_link_estimate.effective_speeds(profile.device_speeds)
    ends_memo = profile.derived(f"plan.split_ends.{_mode_key(live_link_estimate)}", _new_memo)
    for ranks in _groups(profile, live_link_estimate):
        if num_tokens < len(ranks):
            break
        num_weighed += num_admissible
        if not codecs:
            continue
        speeds = [speeds_all[r] for r in ranks]
        if best is not None and objective_score(
                objective, *group_bound(constants, batch, num_tokens, speeds, link_latency_s)) >= best[0]:
            continue  # even a perfect split and a free link could not beat the best so far
        cache = SplitCache(ends_memo=ends_memo)
        split_terms: dict[tuple[int, ...], GroupTerms] = {}
        # Every codec at the balanced split first; then the blends towards equal shares for the codec
        # that did best in this group only (the blends trade compute balance for a smaller padded
        # message, the same trade for every codec: weighing them for all codecs costs 3x for no gain seen).
        group_best: CodecFidelity | None = None
        group_score = _INF
        rounds = [(codec, 0) for codec in codecs]
        while rounds:
            codec, first_split = rounds.pop(0)
            splits = candidate_splits(constants, batch, speeds, num_tokens, codec, cache, blends=first_split > 0)
            for counts in splits[first_split:]:
                group = split_terms.get(counts)
                if group is None:
                    group = split_terms[counts] = group_terms(constants, batch, speeds, counts, bandwidth_bps,
                                                              link_latency_s, codecs)
                if best is not None and objective_score(objective, group.min_total_s, group.min_energy_j) >= best[0]:
                    continue  # every term is at least its lower bound for this split
                terms = codec_terms(constants, group, batch, codec, bandwidth_bps, objective,
                                    _INF if best is None else best[0])
                if terms is None:
                    continue  # its lower bound cannot beat the best so far
                energy_j = terms.energy_j
                total_s = terms.compute_s + terms.staging_s + terms.network_s + terms.latency_s
                if total_s < fastest[0]:
                    fastest = (total_s, energy_j, ranks, counts, codec)
                if ceiling is not None and total_s > ceiling:
                    num_over_ceiling += 1
                    continue
                score = objective_score(objective, total_s, energy_j)
                if score < group_score:
                    group_best, group_score = codec, score
                if best is None or score < best[0]:
                    best = (score, total_s, energy_j, ranks, counts, codec)
            if not rounds and first_split == 0 and group_best is not None:
                rounds.append((group_best, 1))

    notes = []
    if num_over_budget:
        notes.append(f"{num_over_budget} codec(s) over the {budget:.2%} fidelity budget")
    if num_unlisted:
        notes.append(f"{num_unlisted} codec(s) not among the allowed ones")
    if num_unmeasured:
        notes.append(f"{num_unmeasured} codec(s) of unmeasured fidelity (no --allow-unmeasured-codecs)")
    if report_only:
        notes.append(f"of them measured only by a metric no budget applies to: {', '.join(report_only)} (a "
                     f"decoder's budget is on next-token agreement; measure it with `edgeprism eval --out`)")
    if num_off_path:
        notes.append(f"{num_off_path} kv-share codec(s) (keys and values travel only on an encoder's overlapped path)")
    if num_over_ceiling:
        notes.append(f"some over the {ceiling * 1e3:.1f} ms ceiling")  # type: ignore[operator]
    tail = f"; excluded: {', '.join(notes)}" if notes else ""
    if best is None:
        latency_s, energy_j, ranks, counts, chosen = fastest
        reason = (f"no candidate meets the {ceiling * 1e3:.1f} ms ceiling; fastest of {num_weighed} taken "  # type: ignore[operator]
                  f"({_describe(ranks, chosen)}){tail}")
        return _plan(profile, objective, ranks, counts, chosen, latency_s, energy_j, reason, within=False)
    _, latency_s, energy_j, ranks, counts, chosen = best
    versus = "" if chosen is None else f" vs local {local_s * 1e3:.1f} ms, {local_j:.2f} J"
    reason = f"best {objective} of {num_weighed} candidates ({_describe(ranks, chosen)}){versus}{tail}"
    return _plan(profile, objective, ranks, counts, chosen, latency_s, energy_j, reason)


def enumerate_candidates(profile: Profile, request: Request, live_link_estimate: LinkEstimate,
                         objective: str = "latency", limits: Limits = _DEFAULT_LIMITS) -> list[Candidate]:
    """Every candidate with its prediction, including excluded ones and why (for `edgeprism plan`).
    Slower than `choose_plan` (it builds every Plan); the winner is the same."""
    _check(profile, request, objective)
    batch, num_tokens = request.batch, request.num_tokens
    source = profile.energy.source
    ceiling = limits.max_latency_s
    out: list[Candidate] = []

    def over_ceiling(latency_s: float) -> str | None:
        if ceiling is not None and latency_s > ceiling:
            return f"predicted {latency_s * 1e3:.1f} ms exceeds the {ceiling * 1e3:.1f} ms ceiling"
        return None

    local_s, local_j = local_terms(profile, batch, num_tokens, _local_scale(profile, live_link_estimate))
    out.append(Candidate(_plan(profile, objective, (0,), (num_tokens,), None, local_s, local_j, "local reference"),
                         local_prediction(local_s, local_j, source), over_ceiling(local_s)))
    speeds_all = live_link_estimate.effective_speeds(profile.device_speeds)
    constants = _constants(profile, live_link_estimate, request)
    for ranks in _groups(profile, live_link_estimate):
        speeds = [speeds_all[r] for r in ranks]
        if num_tokens < len(ranks):
            why = f"{num_tokens} tokens cannot give {len(ranks)} ranks one token each"
            for codec in profile.codecs:
                out.append(Candidate(_plan(profile, objective, ranks, (), codec, 0.0, 0.0, why), None, why))
            continue
        for codec in profile.codecs:
            counts, terms = best_split(constants, batch, speeds, num_tokens, codec, live_link_estimate, objective)
            prediction = distributed_prediction(terms, profile)
            plan = _plan(profile, objective, ranks, counts, codec, prediction.total_s, prediction.energy_j,
                         prediction.explain())
            out.append(Candidate(plan, prediction, codec_exclusion(codec, limits) or path_exclusion(codec, constants)
                                 or over_ceiling(prediction.total_s)))
    return out


def _new_memo(_profile: Profile) -> dict:
    return {}


def _local_scale(profile: Profile, link: LinkEstimate) -> float:
    """How much slower than profiled rank 0 runs alone: the live local bias over rank 0's live speed scale."""
    scale = link.device_speed_scale
    return link.local_compute_scale / (1.0 if scale is None else scale[0])


def _mode_key(link: LinkEstimate) -> str:
    return f"sealed={link.sealed},overlap={link.overlap},micro_batches={link.micro_batches}"


def _constants(profile: Profile, link: LinkEstimate, request: Request) -> CostConstants:
    """The profile's cost constants, memoised per profile, sealing (sealed lanes add bytes and time) and how the
    runtime hides the exchange (overlap, micro-batches); with the request's own scatter bytes where it has them."""
    return request_constants(profile.derived(f"plan.constants.{_mode_key(link)}",
                                             lambda p: profile_constants(p, link.sealed, link.overlap,
                                                                         link.micro_batches)),
                             request.input_bytes_per_token)


def best_split(constants: CostConstants, batch: int, speeds: list[float], num_tokens: int, codec: CodecFidelity,
               link: LinkEstimate, objective: str) -> tuple[tuple[int, ...], CodecTerms]:
    """The candidate split (`plan.shares.candidate_splits`) of one group and codec that scores best under
    `objective`, with its terms (the balanced split on ties)."""
    best: tuple[float, tuple[int, ...], CodecTerms] | None = None
    for counts in candidate_splits(constants, batch, speeds, num_tokens, codec):
        group = group_terms(constants, batch, speeds, counts, link.bandwidth_bps, link.latency_s)
        terms = codec_terms(constants, group, batch, codec, link.bandwidth_bps)
        assert terms is not None  # no objective, no pruning
        score = objective_score(objective, terms.compute_s + terms.staging_s + terms.network_s + terms.latency_s,
                                terms.energy_j)
        if best is None or score < best[0]:
            best = (score, counts, terms)
    assert best is not None
    return best[1], best[2]


__all__ = ["best_split", "choose_plan", "codec_exclusion", "enumerate_candidates", "path_exclusion"]


def static_plan(profile: Profile, request: Request, live_link_estimate: LinkEstimate, mode: str,
                codec: str | None = None, ranks: tuple[int, ...] | None = None, objective: str = "latency",
                token_counts: tuple[int, ...] | None = None) -> Plan:
    """The plan a *static* strategy would run (local, or distributed with a fixed codec over fixed ranks,
    split as the planner would or as `token_counts` says), with the cost model's prediction — for
    baselines in the demo and benchmarks, not for serving. Micro-batches as `choose_plan` picks them."""
    return best_over_micro_batches(
        lambda link: _static_at(profile, request, link, mode, codec, ranks, objective, token_counts),
        live_link_estimate, request.batch, profile.model.causal, objective)


def _static_at(profile: Profile, request: Request, live_link_estimate: LinkEstimate, mode: str,
               codec: str | None, ranks: tuple[int, ...] | None, objective: str,
               token_counts: tuple[int, ...] | None) -> Plan:
    if mode not in ("local", "distributed"):
        raise ValueError(f"mode {mode!r} must be 'local' or 'distributed'")
    wanted_ranks = tuple(ranks) if ranks is not None else tuple(range(profile.world_size))
    if mode == "distributed" and token_counts is not None:
        return _fixed_split_plan(profile, request, live_link_estimate, codec or "", wanted_ranks,
                                 tuple(token_counts), objective)
    for candidate in enumerate_candidates(profile, request, live_link_estimate, objective):
        plan = candidate.plan
        if mode == "local" and plan.mode == "local":
            return plan
        if mode == "distributed" and plan.mode == "distributed" and plan.codec == codec \
                and tuple(plan.ranks) == wanted_ranks:
            return plan
    known = sorted({c.codec for c in profile.codecs})
    raise ValueError(f"no {mode} plan with codec {codec!r} over ranks {list(wanted_ranks)} in this profile; "
                     f"profiled codecs: {', '.join(known)}")


def _fixed_split_plan(profile: Profile, request: Request, link: LinkEstimate, codec_name: str,
                      ranks: tuple[int, ...], counts: tuple[int, ...], objective: str) -> Plan:
    if len(counts) != len(ranks) or sum(counts) != request.num_tokens or min(counts) < 1:
        raise ValueError(f"token counts {list(counts)} must give each of ranks {list(ranks)} at least one of the "
                         f"request's {request.num_tokens} tokens")
    if not ranks or ranks[0] != 0 or any(not 0 <= r < profile.world_size for r in ranks):
        raise ValueError(f"ranks {list(ranks)} must start with rank 0 and lie in the profile's {profile.world_size}")
    codec = profile.codec(codec_name)
    speeds = link.effective_speeds(profile.device_speeds)
    terms = distributed_terms(profile, request.batch, [speeds[r] for r in ranks], counts, codec,
                              link.bandwidth_bps, link.latency_s, link.sealed, link.overlap, link.micro_batches,
                              request.input_bytes_per_token)
    prediction = distributed_prediction(terms, profile)
    return _plan(profile, objective, ranks, counts, codec, prediction.total_s, prediction.energy_j,
                 f"static split {list(counts)}: {prediction.explain()}")
