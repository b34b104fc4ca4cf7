"""Row fields: the measured latency beside the physical limit of its plan (`plan.limit`), and the plan's label."""

from __future__ import annotations

from typing import Any

from edgeprism.plan.limit import split_limit
from edgeprism.plan.types import LinkEstimate, Plan, Request


def limit_fields(profile, request: Request, plan: dict[str, Any], link: LinkEstimate, latency_s: float) -> dict:
    """{limit_s, sequential_limit_s, limit_compute_s, limit_wire_s, limit_latency_s, compute_to_comm,
    achieved_over_limit} for a row served by the engine with `plan` (its dict) at `latency_s`."""
    limit = split_limit(profile, request, Plan.from_dict(plan), link)
    return {"limit_s": limit.limit_s, "sequential_limit_s": limit.sequential_limit_s,
            "limit_compute_s": limit.compute_s, "limit_wire_s": limit.wire_s, "limit_latency_s": limit.latency_s,
            "compute_to_comm": limit.compute_to_comm,
            "achieved_over_limit": limit.limit_s / latency_s if latency_s > 0 else None}


def plan_label(plan: dict[str, Any]) -> str:
    """A served plan (its dict) in a row: "local", or "<codec> x<ranks>" with " mb<m>" where it ran its batch as
    m > 1 micro-batches (plan/micro.py)."""
    if plan.get("mode") == "local":
        return "local"
    micro = int(plan.get("micro_batches") or 1)
    return f"{plan.get('codec')} x{len(plan.get('ranks') or [])}" + (f" mb{micro}" if micro > 1 else "")


__all__ = ["limit_fields", "plan_label"]
