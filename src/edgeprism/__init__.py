"""edgeprism: position-wise distributed Transformer inference across small edge devices."""

__version__ = "0.1.0"

_LAZY = {"Engine": "edgeprism.runtime", "EngineConfig": "edgeprism.runtime", "Result": "edgeprism.runtime",
         "MetricsRow": "edgeprism.runtime", "launch_local": "edgeprism.runtime"}


def __getattr__(name: str):
    """`edgeprism.Engine` etc. without importing torch at `import edgeprism` (no import side effects)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgeprism' has no attribute {name!r}")
