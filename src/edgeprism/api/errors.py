"""Errors the API answers with, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

A user's mistake is an `ApiError` with a 4xx status raised at the edge (while reading, decoding or
validating the request); the handler turns it into that JSON and the server serves the next request.
An engine failure is a 500 of type `server_error`.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse


class ApiError(Exception):
    """A request the API refuses. `status` is the HTTP status, `type` OpenAI's error type
    (invalid_request_error, not_found_error, server_error), `code` a stable machine-readable reason."""

    def __init__(self, status: int, message: str, code: str, type: str = "invalid_request_error",
                 param: str | None = None, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
        """The id the request named for itself (POST /infer answers with it), if it could be read."""
        self.status = status
        self.message = message
        self.code = code
        self.type = type
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, extra: dict[str, Any] | None = None) -> JSONResponse:
        return JSONResponse({**(extra or {}), **self.body()}, status_code=self.status)


def bad_request(message: str, code: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, code, param=param)


def engine_failure(err: BaseException) -> ApiError:
    """An engine call that failed for a reason other than the request (a lost worker, a bug): 500."""
    return ApiError(500, f"the engine failed to serve this request: {type(err).__name__}: {err}", "engine_error",
                    type="server_error")


__all__ = ["ApiError", "bad_request", "engine_failure"]
