"""Cost model and planner: pure functions of (profile, request, live link estimate, objective, limits) -> Plan."""

from edgeprism.plan.cost import apportion, predict, token_shares
from edgeprism.plan.planner import choose_plan, codec_exclusion, enumerate_candidates, static_plan
from edgeprism.plan.types import OBJECTIVES, Candidate, LinkEstimate, Limits, Objective, Plan, Prediction, Request

__all__ = [
    "apportion", "predict", "token_shares", "choose_plan", "codec_exclusion", "enumerate_candidates", "static_plan",
    "OBJECTIVES", "Candidate", "LinkEstimate", "Limits", "Objective", "Plan", "Prediction", "Request",
]
