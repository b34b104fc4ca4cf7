"""Offline profiling of compute, staging, link and energy, and the versioned profile file."""

from edgeprism.profile.schema import (
    SCHEMA_VERSION,
    CodecFidelity,
    ComputeSample,
    ComputeTable,
    EnergyModel,
    HostFacts,
    LinkMeasurement,
    Profile,
    StagingSample,
    StagingTable,
)

__all__ = [
    "SCHEMA_VERSION", "CodecFidelity", "ComputeSample", "ComputeTable", "EnergyModel", "HostFacts",
    "LinkMeasurement", "Profile", "StagingSample", "StagingTable",
]
