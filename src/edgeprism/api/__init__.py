"""An HTTP API over a running engine, in the ecosystem's conventions (docs/API.md).

    from edgeprism.api import ApiConfig, make_app, serve_http
    serve_http(engine, io, "127.0.0.1", 8000, ApiConfig(batch_window_s=0.005))   # until Ctrl-C

OpenAI-compatible /v1/embeddings, /v1/completions and /v1/models, /v1/classify for images, /infer for
tensor-JSON programs, /health, /metrics (Prometheus) and /v1/cluster, on Starlette + uvicorn with
dynamic batching on one engine thread. Needs the `serve` extra (starlette, uvicorn, python-multipart).
"""

try:
    import starlette  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("edgeprism.api needs Starlette: pip install 'edgeprism[serve]'") from err

from edgeprism.api.app import make_app, serve_http
from edgeprism.api.config import ApiConfig
from edgeprism.api.model_io import ModelIOLike

__all__ = ["ApiConfig", "ModelIOLike", "make_app", "serve_http"]
