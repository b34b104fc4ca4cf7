"""One strict JSON <-> frozen-dataclass conversion for the data files (profiles, plans).

`to_json_dict(obj)` is `dataclasses.asdict`; `from_json_dict(cls, data, where)` builds `cls` back from
parsed JSON, refusing unknown fields, missing required ones and values of the wrong type, with the
path in the message. A field the class derives itself (`init=False`, e.g. `Plan.token_ranges`) may be
absent (older files); where present it must equal what the class derives. Profile (`profile/schema.py`)
and Plan (`plan/types.py`) both use it. `read_data_file(path, what)` reads such a file's text with the
user's error (missing, unreadable) naming it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

T = typing.TypeVar("T")


def to_json_dict(obj: Any) -> dict[str, Any]:
    """A dataclass instance as plain JSON-ready data (tuples become lists when dumped)."""
    return dataclasses.asdict(obj)


def read_data_file(path: Path, what: str, how_to_make: str = "") -> str:
    """The text of `path`; a ValueError naming `what` and the path when it is missing (with `how_to_make`, a
    hint appended to the message) or unreadable."""
    try:
        return path.read_text()
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist{how_to_make}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {what} {path}: {err}") from None


def from_json_dict(cls: Any, data: Any, where: str) -> Any:
    """`cls(**data)`, strictly: unknown or missing fields and values of the wrong JSON type are a ValueError
    naming the path (`profile.codecs[2].cr must be an integer, got 1.5`); nested dataclasses, tuples,
    Literals and optional fields are converted by the type hints."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {unknown}")
    kwargs, derived = {}, {}
    for f in dataclasses.fields(cls):
        if not f.init:
            if f.name in data:
                derived[f.name] = _convert(hints[f.name], data[f.name], f"{where}.{f.name}")
            continue
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where} is missing field {f.name!r}")
            continue
        kwargs[f.name] = _convert(hints[f.name], data[f.name], f"{where}.{f.name}")
    try:
        obj = cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"{where}: {err}") from None
    for name, value in derived.items():
        if getattr(obj, name) != value:
            raise ValueError(f"{where}.{name} {value!r} disagrees with the rest of it, which gives "
                             f"{getattr(obj, name)!r}")
    return obj


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):  # tuple[X, Y]: one value per position
            raise ValueError(f"{where} must hold {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(tp):
        return from_json_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    raise AssertionError(f"no JSON conversion for {tp!r} at {where}")


__all__ = ["from_json_dict", "read_data_file", "to_json_dict"]
