"""The calibrated codec's state as a file every rank reads: `$EDGEPRISM_HOME/codecs/<sha256>.safetensors`.

The codec's name ("tc:" + 12 hex digits of the hash of its state, `compress.calibrated.state_digest`) is
how a profile, a plan and every rank refer to it; `load_calibrated` finds the file by that prefix and
refuses a file whose content does not hash to its name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from edgeprism.compress.calibrated import (
    DIGEST_CHARS,
    MAX_BITS,
    NAME_PREFIX,
    LayerTransform,
    TransformCodec,
    state_digest,
)
from edgeprism.home import home_dir


def calibration_dir() -> Path:
    """`$EDGEPRISM_HOME/codecs` or `~/.cache/edgeprism/codecs` (`edgeprism.home.home_dir`, as the assets cache)."""
    return home_dir() / "codecs"


def save(codec: TransformCodec, folder: str | Path | None = None) -> Path:
    """Write the codec's state to `folder/<digest>.safetensors` (default `calibration_dir()`); return the path."""
    from safetensors.torch import save_file

    folder = Path(folder) if folder is not None else calibration_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, layer in enumerate(codec.layers):
        tensors[f"{i}.mean"], tensors[f"{i}.basis"] = layer.mean.contiguous(), layer.basis.contiguous()
        tensors[f"{i}.sigma"] = layer.sigma.contiguous()
        tensors[f"{i}.bits"] = torch.tensor(layer.bits, dtype=torch.uint8)
        tensors[f"{i}.outliers"] = torch.tensor([layer.outliers], dtype=torch.int32)
        if layer.inverse is not None:
            tensors[f"{i}.inverse"] = layer.inverse.contiguous()
        for j, levels in enumerate(layer.levels):
            tensors[f"{i}.levels.{j}"] = levels.contiguous()
    path = folder / f"{codec.digest}.safetensors"
    save_file(tensors, str(path), metadata={"layers": str(len(codec.layers)), "digest": codec.digest,
                                            "delta": "1" if codec.delta else "0",
                                            "description": json.dumps(codec.description)})
    return path


def state_path(name: str, folder: str | Path | None = None) -> Path:
    """The state file of the codec named "tc:<12 hex>" in `folder` (default `calibration_dir()`); ValueError
    naming the digest and how to get the file when there is not exactly one."""
    prefix = name[len(NAME_PREFIX):].strip().lower() if name.lower().startswith(NAME_PREFIX) else name.strip().lower()
    base = Path(folder) if folder is not None else calibration_dir()
    matches = sorted(base.glob(f"{prefix}*.safetensors")) if len(prefix) >= DIGEST_CHARS else []
    if len(matches) != 1:
        raise ValueError(f"codec {name!r}: {len(matches)} calibration files {base}/{prefix}*.safetensors; "
                         f"copy the file from the machine that calibrated it (scripts/bench_fidelity_calibrated.py "
                         f"writes it; a coordinator ships it to the devices that join) or set EDGEPRISM_HOME")
    return matches[0]


def install_state(digest: str, body: bytes, folder: str | Path | None = None) -> Path:
    """Write a state file received from another machine (`body`: the bytes of `<digest>.safetensors`) into
    `folder` (default `calibration_dir()`) after checking that its content hashes to `digest`; ValueError
    otherwise (nothing is written). Returns the path."""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"calibrated state digest {digest[:80]!r} is not 64 lowercase hex digits")
    base = Path(folder) if folder is not None else calibration_dir()
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".incoming-", dir=base) as incoming:
        path = Path(incoming) / f"{digest}.safetensors"
        path.write_bytes(body)
        try:
            load_calibrated(path)  # ValueError unless the content hashes to the name
        except ValueError:
            raise
        except Exception as err:  # not a safetensors file of this layout (safetensors raises its own errors)
            raise ValueError(f"calibrated state {digest[:DIGEST_CHARS]} ({len(body)} bytes) is not a state file: "
                             f"{type(err).__name__}: {err}") from None
        os.replace(path, base / path.name)
    return base / path.name


def load_calibrated(name_or_path: str | Path, folder: str | Path | None = None) -> TransformCodec:
    """The codec named "tc:<12 hex>" (its file in `folder`, default `calibration_dir()`) or stored at a path.
    ValueError when the file is missing or its content does not hash to its name."""
    from safetensors import safe_open

    text = str(name_or_path)
    path = state_path(text, folder) if text.lower().startswith(NAME_PREFIX) else Path(text)
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        keys = set(handle.keys())
        layers = []
        for i in range(int(meta.get("layers", "0"))):
            bits = tuple(int(b) for b in handle.get_tensor(f"{i}.bits"))
            levels = tuple(handle.get_tensor(f"{i}.levels.{j}") for j in range(sum(f"{i}.levels.{j}" in keys
                                                                                   for j in range(MAX_BITS))))
            outliers = int(handle.get_tensor(f"{i}.outliers")[0])
            inverse = handle.get_tensor(f"{i}.inverse") if f"{i}.inverse" in keys else None
            layers.append(LayerTransform(handle.get_tensor(f"{i}.mean"), handle.get_tensor(f"{i}.basis"),
                                         handle.get_tensor(f"{i}.sigma"), bits, levels, outliers, inverse))
    delta = meta.get("delta") == "1"
    digest = state_digest(tuple(layers), delta)
    if digest != path.stem:
        raise ValueError(f"calibration file {path} hashes to {digest[:DIGEST_CHARS]}, not its name "
                         f"{path.stem[:DIGEST_CHARS]}: the file was changed or truncated")
    return TransformCodec(digest, tuple(layers), delta, json.loads(meta.get("description", '""')))
