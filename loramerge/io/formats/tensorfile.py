"""Reading and writing tensor files safely: safetensors always, pickle only when asked.

Every failure becomes a :mod:`loramerge.errors` exception that names the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from loramerge.errors import CorruptFile, NonFiniteValues, PickleRefused, SourceNotFound, UnknownFormat

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


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor index (name → dtype, shape, offsets) and metadata of a safetensors file, reading only its header."""
    _require_file(path)
    try:
        with open(path, "rb") as fh:
            size_bytes = fh.read(8)
            if len(size_bytes) < 8:
                raise ValueError("header too small")
            (size,) = struct.unpack("<Q", size_bytes)
            if size > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(fh.read(size))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CorruptFile(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    if not isinstance(header, dict):
        raise CorruptFile(f"{path}: not a readable safetensors file (header is not an object)")
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata


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


def read_json_object(path: Path) -> dict:
    """The JSON object stored in ``path``, or :class:`CorruptFile` naming the file.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> p = Path(tempfile.mkdtemp()) / "c.json"
        >>> _ = p.write_text('{"r": 8}')
        >>> read_json_object(p)
        {'r': 8}
    """
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptFile(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CorruptFile(f"{path}: expected a JSON object")
    return value


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write contiguous, unaliased CPU copies of ``tensors`` with ``{"format": "pt"}`` plus ``metadata``."""
    prepared = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(prepared, str(path), metadata={"format": "pt", **(metadata or {})})


def check_finite(tensor: torch.Tensor, *, path: object, what: str) -> None:
    """Raise :class:`NonFiniteValues` naming ``path`` and ``what`` when ``tensor`` holds NaN or Inf."""
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
