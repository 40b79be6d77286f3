"""Reading and writing tensor files safely: safetensors always, pickle only when asked.

Every failure becomes a :mod:`loramerge.errors` exception that names the file.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from loramerge.errors import CorruptFile, NonFiniteValues, PickleRefused, SourceNotFound, UnknownFormat
from loramerge.io.structured import Spec, parse_json, read_json, special_file_reason

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a safetensors file (on the CPU) and its header metadata.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> p = Path(tempfile.mkdtemp()) / "t.safetensors"
        >>> write_safetensors({"x": torch.zeros(2)}, p)
        >>> read_safetensors(p)[0]["x"].shape
        torch.Size([2])
    """
    _require_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptFile(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    return tensors, metadata


# Bits per element of every safetensors dtype code (sub-byte float formats included).
SAFETENSORS_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
_MAX_HEADER = 100_000_000


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor index (name → dtype, shape, offsets) and metadata of a safetensors file, reading only its header.

    The header is validated as safetensors itself does before anything is built from it: known
    dtypes, non-negative integer shapes, byte ranges that match the shapes and tile the data
    exactly, string-to-string metadata.

    Example:
        >>> import tempfile, torch
        >>> p = Path(tempfile.mkdtemp()) / "t.safetensors"
        >>> write_safetensors({"x": torch.zeros(2, 3)}, p)
        >>> read_safetensors_header(p)[0]["x"]["shape"]
        [2, 3]
    """
    _require_file(path)
    reason = special_file_reason(path)
    if reason is not None:
        raise CorruptFile(f"{path}: {reason}")
    try:
        with open(path, "rb") as fh:
            size_bytes = fh.read(8)
            if len(size_bytes) < 8:
                raise ValueError("file too small")
            (size,) = struct.unpack("<Q", size_bytes)
            file_size = os.fstat(fh.fileno()).st_size
            if size > _MAX_HEADER or 8 + size > file_size:
                raise ValueError("header too large" if size > _MAX_HEADER else "header longer than the file")
            raw = fh.read(size)
    except (OSError, ValueError) as exc:
        raise CorruptFile(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    if not raw.lstrip().startswith(b"{"):
        raise CorruptFile(f"{path}: not a readable safetensors file (the header is not a JSON object)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptFile(f"{path}: not a readable safetensors file (the header is not UTF-8)") from None
    header = parse_json(text, name=f"{path}: safetensors header", want_object=True)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptFile(f"{path}: not a readable safetensors file (__metadata__ must map strings to strings)")
    _check_entries(path, header, file_size - 8 - size)
    return header, metadata


def _check_entries(path: Path, header: dict[str, Any], data_size: int) -> None:
    """Every entry as safetensors requires: dtype, shape and offsets agree, and the ranges tile the data."""
    ranges = []
    for name, entry in header.items():
        def bad(what: str, name: str = name) -> CorruptFile:
            return CorruptFile(f"{path}: not a readable safetensors file (tensor {name} {what})")

        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise bad("has a malformed header entry")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if code not in SAFETENSORS_BITS:
            raise bad(f"has unknown dtype {code!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise bad(f"has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise bad(f"has invalid data offsets {offsets!r}")
        bits = math.prod(shape) * SAFETENSORS_BITS[code]
        if bits % 8 or offsets[1] - offsets[0] != bits // 8:
            raise bad("has a byte range that does not match its shape and dtype")
        ranges.append((offsets[0], offsets[1], name))
    end = 0
    for start, stop, name in sorted(ranges):
        if start != end:
            raise CorruptFile(f"{path}: not a readable safetensors file (tensor {name} overlaps another or "
                              "leaves a gap)")
        end = stop
    if end != data_size:
        what = "is truncated" if end > data_size else "has bytes that belong to no tensor"
        raise CorruptFile(f"{path}: not a readable safetensors file (the data {what})")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_pickle(path: Path, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Tensors of a torch pickle, loaded with ``weights_only=True``, only when ``allow_pickle`` is set."""
    _require_file(path)
    if not allow_pickle:
        raise PickleRefused(
            f"{path}: pickle checkpoints can run code when loaded; pass --allow-pickle (allow_pickle=True) "
            "to read it with torch.load(weights_only=True), or convert it to safetensors"
        )
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise CorruptFile(f"{path}: not a readable torch checkpoint ({_first_line(exc)})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CorruptFile(f"{path}: expected a mapping of names to tensors")
    return dict(state)


def read_tensor_file(path: Path, *, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors or (with ``allow_pickle``) pickle file's tensors and metadata."""
    if path.suffix in PICKLE_SUFFIXES:
        return read_pickle(path, allow_pickle=allow_pickle), {}
    return read_safetensors(path)


def read_json_object(path: Path, schema: Mapping[str, Spec] | None = None) -> dict:
    """The JSON object stored in ``path``, or :class:`CorruptFile` naming the file (see :mod:`loramerge.io.structured`).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> p = Path(tempfile.mkdtemp()) / "c.json"
        >>> _ = p.write_text('{"r": 8}')
        >>> read_json_object(p)
        {'r': 8}
    """
    return read_json(path, schema=schema)


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write contiguous, unaliased CPU copies of ``tensors`` with ``{"format": "pt"}`` plus ``metadata``."""
    prepared = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    # Serialised in memory and written by Python, so a full disk is an OSError the output layer translates.
    data = save(prepared, metadata={"format": "pt", **(metadata or {})})
    with open(path, "wb") as fh:
        fh.write(data)


def check_finite(tensor: torch.Tensor, *, path: object, what: str) -> None:
    """Raise :class:`NonFiniteValues` naming ``path`` and ``what`` when ``tensor`` holds NaN or Inf."""
    if tensor.is_floating_point() and tensor.element_size() == 1:
        tensor = tensor.float()  # float8: torch has no reductions for it
    # A finite sum proves every entry finite, at a sixth of the cost of isfinite; only then scan.
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteValues(f"{path}: {what} holds {bad} NaN/Inf value(s)")


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise SourceNotFound(f"{path}: no such file")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_keys(path: Path | str, unknown: list[str], *, found: bool, layout: str) -> None:
    """Refuse a file with keys in no ``layout`` (naming the first few), or with no LoRA tensors at all.

    Example:
        >>> check_keys("f.safetensors", [], found=True, layout="LoRA")
        >>> check_keys("f.safetensors", ["x.y"], found=True, layout="LoRA")
        Traceback (most recent call last):
        ...
        loramerge.errors.UnknownFormat: f.safetensors: 1 key(s) in no LoRA layout: x.y
    """
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise UnknownFormat(f"{path}: {len(unknown)} key(s) in no {layout} layout: {shown}")
    if not found:
        raise CorruptFile(f"{path}: no LoRA tensors found")
