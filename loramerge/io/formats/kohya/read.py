"""Reading a kohya/A1111 (or LyCORIS) LoRA file into an :class:`~loramerge.core.adapter.Adapter`.

The file's keys are grouped by module (:mod:`.keys`), named (:mod:`.names`), turned into
updates (:mod:`.update`) and, for fused modules, split (:mod:`.fused`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from loramerge.core.adapter import Adapter, LowRank
from loramerge.errors import CorruptFile, IncompatibleAdapters, UnknownFormat
from loramerge.io.formats.base_names import BaseNames
from loramerge.io.formats.kohya.fused import split_update
from loramerge.io.formats.kohya.keys import fits, flat_shape, group_keys
from loramerge.io.formats.kohya.names import resolve_names, shape_hint
from loramerge.io.formats.kohya.update import module_update
from loramerge.io.formats.sd_names import ARCHITECTURES
from loramerge.io.formats.tensorfile import read_tensor_file

NAME = "kohya"
_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")


def read(path: Path, *, allow_pickle: bool = False, base: str | Path | None = None,
         source_format: str = NAME) -> Adapter:
    """Read a kohya/A1111 (or LyCORIS) LoRA file into an :class:`Adapter` with canonical module names.

    ``base`` names a checkpoint whose weight names resolve the kohya names instead of the built-in
    tables. See the module docstring for keys, scales and names.
    """
    if path.is_dir():
        files = [p for p in sorted(path.iterdir()) if p.suffix in _FILE_SUFFIXES]
        if len(files) != 1:
            raise UnknownFormat(f"{path}: a kohya LoRA is one .safetensors file; this folder holds {len(files)}")
        path = files[0]
    tensors, metadata = read_tensor_file(path, allow_pickle=allow_pickle)
    groups = group_keys(tensors, origin=path)
    flat = {name: flat_shape(name, parts, path) for name, parts in groups.items()}
    base_names = BaseNames.from_path(base) if base is not None else None
    targets, architectures = resolve_names(flat, origin=path, base=base_names)
    arch = ARCHITECTURES[architectures[0]] if architectures and base_names is None else None
    base_shapes = base_names.modules if base_names is not None else {}

    layers: dict[str, LowRank] = {}
    algorithms: dict[str, str] = {}
    for name, parts in groups.items():
        target = targets[name]
        hint = shape_hint(target, arch, base_shapes)
        update, algorithm = module_update(name, parts, origin=path, shape_hint=hint)
        if base is not None and not fits(update.delta_shape, target.shape):
            raise IncompatibleAdapters(
                f"{path}: module {name} has an update of shape {tuple(update.delta_shape)} but the base "
                f"weight {target.pieces[0].module} is {tuple(target.shape)}"
            )
        for module, lowrank in split_update(update, target, origin=path).items():
            if module in layers:
                raise CorruptFile(f"{path}: module {module} is given twice (by {name} and another key)")
            layers[module] = lowrank
            algorithms[module] = algorithm
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point() and t.ndim > 0}
    config: dict[str, Any] = {"metadata": metadata, "algorithms": algorithms}
    if architectures:
        config["architectures"] = architectures
    return Adapter(
        layers, source_format=source_format, dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32,
        source=str(path), config=config,
    )


def read_lycoris(path: Path, *, allow_pickle: bool = False, base: str | Path | None = None) -> Adapter:
    """:func:`read` for LyCORIS files: the same names, ``source_format='lycoris'``."""
    return read(path, allow_pickle=allow_pickle, base=base, source_format="lycoris")
