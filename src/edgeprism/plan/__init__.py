"""Cost model and planner: pure functions of (profile, request, live link estimate, objective, limits) -> Plan."""

from edgeprism.plan.cost import apportion, predict, token_shares
from edgeprism.plan.planner import choose_plan, codec_exclusion, enumerate_candidates, static_plan
from edgeprism.plan.types import (
    DEFAULT_MAX_FIDELITY_LOSS,
    OBJECTIVES,
    Candidate,
    Limits,
    LinkEstimate,
    Objective,
    Plan,
    Prediction,
    Request,
)

__all__ = [
    "DEFAULT_MAX_FIDELITY_LOSS",
    "OBJECTIVES",
    "Candidate",
    "Limits",
    "LinkEstimate",
    "Objective",
    "Plan",
    "Prediction",
    "Request",
    "apportion",
    "choose_plan",
    "codec_exclusion",
    "enumerate_candidates",
    "predict",
    "static_plan",
    "token_shares",
]
