"""Reading requests at the edge: bounded bodies, JSON objects, image uploads, typed fields.

Every mistake is an `ApiError` (4xx) naming what was wrong and the numbers: a body over the limit is
refused from its Content-Length before it is read, or as soon as the bytes read pass the limit.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from edgeprism.api.errors import ApiError, bad_request

IMAGE_TYPES = ("image/png", "image/jpeg")


async def read_body(request: Request, limit_bytes: int) -> bytes:
    """The request body, or 413 once it is known to exceed `limit_bytes`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise bad_request(f"Content-Length {declared!r} is not a number", "invalid_content_length") from None
        if declared_bytes > limit_bytes:
            raise _too_large(declared_bytes, limit_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit_bytes:
            raise _too_large(size, limit_bytes, at_least=True)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit_bytes: int, at_least: bool = False) -> ApiError:
    return ApiError(413, f"request body of {'at least ' if at_least else ''}{size:,} bytes exceeds the limit of "
                         f"{limit_bytes:,} bytes", "body_too_large")


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_json_object(request: Request, limit_bytes: int) -> dict[str, Any]:
    """A JSON object body sent as application/json (415 for another type, 400 for bad JSON)."""
    kind = media_type(request)
    if kind != "application/json":
        raise ApiError(415, f"send a JSON body with Content-Type: application/json (got {kind or 'none'!r})",
                       "unsupported_media_type")
    return parse_json_object(await read_body(request, limit_bytes))


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise bad_request(f"the body is not valid JSON: {err}", "invalid_json") from None
    except RecursionError:
        raise bad_request("the JSON body is nested too deeply", "invalid_json") from None
    if not isinstance(value, dict):
        raise bad_request(f"the body must be a JSON object, got {type(value).__name__}", "invalid_json")
    return value


async def read_images(request: Request, limit_bytes: int, max_files: int) -> tuple[list[bytes], dict[str, str]]:
    """Image bytes from a multipart upload (`file` parts; other plain fields returned) or a raw
    image/png or image/jpeg body."""
    kind = media_type(request)
    if kind in IMAGE_TYPES:
        body = await read_body(request, limit_bytes)
        if not body:
            raise bad_request(f"the {kind} body is empty", "invalid_image")
        return [body], dict(request.query_params)
    if kind != "multipart/form-data":
        raise ApiError(415, f"send images as multipart/form-data (one or more 'file' parts) or as a raw "
                            f"{' or '.join(IMAGE_TYPES)} body (got {kind or 'none'!r})", "unsupported_media_type")
    body = await read_body(request, limit_bytes)

    async def once():
        yield body
        yield b""

    parser = MultiPartParser(request.headers, once(), max_files=max_files, max_fields=16, max_part_size=limit_bytes)
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise bad_request(f"the multipart body could not be read: {err.message}", "invalid_multipart") from None
    blobs: list[bytes] = []
    fields: dict[str, str] = dict(request.query_params)
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name not in ("file", "files"):
                    raise bad_request(f"upload images in parts named 'file', got a file part named {name!r}",
                                      "invalid_multipart", param=name)
                blobs.append(await value.read())
            else:
                fields[name] = value
    finally:
        await form.close()
    if not blobs:
        raise bad_request("the multipart body has no 'file' part; attach one image per 'file' part",
                          "invalid_multipart", param="file")
    return blobs, fields


# --- typed fields of a JSON request ---
def check_keys(body: dict[str, Any], allowed: set[str], endpoint: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad_request(f"{endpoint} does not take {', '.join(map(repr, unknown))}; it takes "
                          f"{', '.join(sorted(allowed))}", "unknown_parameter", param=unknown[0])


def string_list(body: dict[str, Any], key: str, max_items: int) -> list[str]:
    """A required field that is a non-empty string or a list of 1..max_items non-empty strings."""
    if key not in body:
        raise bad_request(f"'{key}' is required", "missing_parameter", param=key)
    value = body[key]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        found = type(value).__name__ if not isinstance(value, list) else \
            next(type(i).__name__ for i in value if not isinstance(i, str))
        raise bad_request(f"'{key}' must be a string or a list of strings (token arrays are not taken), found "
                          f"{found}", "invalid_type", param=key)
    if not items:
        raise bad_request(f"'{key}' is an empty list; give 1 to {max_items} strings", "invalid_value", param=key)
    if len(items) > max_items:
        raise bad_request(f"'{key}' has {len(items)} items; this server takes at most {max_items} per request",
                          "too_many_inputs", param=key)
    empty = [i for i, item in enumerate(items) if not item.strip()]
    if empty:
        raise bad_request(f"'{key}' item {empty[0]} is empty", "invalid_value", param=key)
    return items


def integer(body: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = body.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{key}' must be an integer, got {value!r}", "invalid_type", param=key)
    if not low <= value <= high:
        raise bad_request(f"'{key}' {value} must be between {low} and {high}", "invalid_value", param=key)
    return value


def boolean(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{key}' must be true or false, got {value!r}", "invalid_type", param=key)
    return value


__all__ = [
    "IMAGE_TYPES",
    "boolean",
    "check_keys",
    "integer",
    "media_type",
    "parse_json_object",
    "read_body",
    "read_images",
    "read_json_object",
    "string_list",
]
