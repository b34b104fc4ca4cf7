"""An HTTP API over a running engine, in the ecosystem's conventions (docs/API.md).

    from edgeprism.api import ApiConfig, make_app, serve_http
    serve_http(engine, io, "127.0.0.1", 8000, ApiConfig(batch_window_s=0.005))   # until Ctrl-C

OpenAI-compatible /v1/embeddings, /v1/completions and /v1/models, /v1/classify for images, /infer for
tensor-JSON programs, /health, /metrics (Prometheus) and /v1/cluster, on Starlette + uvicorn with
dynamic batching on one engine thread. Needs the `serve` extra (starlette, uvicorn, python-multipart).

The names above are imported on first use, as the package root does with `edgeprism.Engine`: importing
`edgeprism.api.client` (standard library only, the client of a cluster and of the chaos run) loads
neither Starlette nor the model code.
"""

import importlib

_LAZY = {"ApiConfig": "edgeprism.api.config", "make_app": "edgeprism.api.app", "serve_http": "edgeprism.api.app",
         "ModelIOLike": "edgeprism.api.model_io"}


def __getattr__(name: str):
    if name in _LAZY:
        try:
            import starlette  # noqa: F401
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("edgeprism.api needs Starlette: pip install 'edgeprism[serve]'") from err
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgeprism.api' has no attribute {name!r}")


__all__ = ["ApiConfig", "ModelIOLike", "make_app", "serve_http"]
