"""The adaptive runtime: an engine per rank that plans every request and serves it per plan.

    from edgeprism.runtime import launch_local
    with launch_local(2, "vit-tiny-test", "profile.json") as engine:
        result = engine.infer(batch)          # result.outputs, result.metrics (a MetricsRow)
"""

from edgeprism.runtime.cluster import launch_engine, launch_local
from edgeprism.runtime.engine import Engine, EngineConfig
from edgeprism.runtime.link_estimate import LinkObservation, OnlineLinkEstimator
from edgeprism.runtime.metrics import MetricsRow, Result
from edgeprism.runtime.requests import ParsedRequest, check_inputs, parse_request

__all__ = [
           "Engine",
           "EngineConfig",
           "LinkObservation",
           "MetricsRow",
           "OnlineLinkEstimator",
           "ParsedRequest",
           "Result",
           "check_inputs",
           "launch_engine",
           "launch_local",
           "parse_request",
]
