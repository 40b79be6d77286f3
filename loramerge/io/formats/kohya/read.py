"""Reading a kohya/A1111 (or LyCORIS) LoRA file into an :class:`~loramerge.core.adapter.Adapter`.

The file's keys are grouped by module (:mod:`.keys`), named (:mod:`.names`), turned into
updates (:mod:`.update`) and, for fused modules, split (:mod:`.fused`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from loramerge.core.adapter import Adapter, LowRank
from loramerge.errors import CorruptFile, IncompatibleAdapters, UnknownFormat
from loramerge.io.factors import checked_tensors
from loramerge.io.formats.base_names import BaseNames
from loramerge.io.formats.converted import ProbeModule
from loramerge.io.formats.families import FAMILIES, architectures_of, family_modules
from loramerge.io.formats.kohya.fused import split_update
from loramerge.io.formats.kohya.keys import fits, flat_shape, group_keys, is_kohya_key
from loramerge.io.formats.kohya.names import resolve_names, shape_hint
from loramerge.io.formats.kohya.native import ALGORITHMS, NATIVE_KEY, NativeModule
from loramerge.io.formats.kohya.update import module_update
from loramerge.io.formats.sd_names import ARCHITECTURES
from loramerge.io.formats.tensorfile import read_tensor_file

NAME = "kohya"
_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")


def read(path: Path, *, allow_pickle: bool = False, base: str | Path | None = None,
         source_format: str = NAME, skip_unknown: bool = False) -> Adapter:
    """Read a kohya/A1111 (or LyCORIS) LoRA file into an :class:`Adapter` with canonical module names.

    ``base`` names a checkpoint whose weight names resolve the kohya names instead of the built-in
    tables. ``skip_unknown`` leaves out the modules nothing resolves and lists them in
    ``config["skipped"]``. See the package docstring for keys, scales and names.
    """
    path = single_file(path)
    tensors, metadata = read_tensor_file(path, allow_pickle=allow_pickle)
    tensors = checked_tensors(tensors, path)
    groups = group_keys(tensors, origin=path)
    probes = {name: ProbeModule(name, flat_shape(name, parts, path), f"{name}.lora_down.weight",
                                f"{name}.lora_up.weight", f"{name}.alpha" if "alpha" in parts else None)
              for name, parts in groups.items()}
    return assemble(groups, tensors, metadata, path=path, base=base, probes=probes, source_format=source_format,
                    skip_unknown=skip_unknown)


def single_file(path: Path) -> Path:
    """``path``, or the one LoRA file inside the folder ``path``."""
    if not path.is_dir():
        return path
    files = [p for p in sorted(path.iterdir()) if p.suffix in _FILE_SUFFIXES]
    if len(files) != 1:
        raise UnknownFormat(f"{path}: a LoRA in this layout is one .safetensors file; this folder holds {len(files)}")
    return files[0]


def assemble(groups: Mapping[str, Mapping[str, torch.Tensor]], tensors: Mapping[str, torch.Tensor],
             metadata: dict[str, str], *, path: Path, base: str | Path | None, probes: Mapping[str, ProbeModule],
             source_format: str, skip_unknown: bool = False, base_key: Callable[[str], str] | None = None) -> Adapter:
    """The :class:`Adapter` of a file's modules (``groups``: module name → kohya-suffixed tensors), named and split."""
    flat = {name: flat_shape(name, parts, path) for name, parts in groups.items()}
    base_names = BaseNames.from_path(base) if base is not None else None
    recorded = [f.name for f in FAMILIES.values() if f.converts and f.name not in ARCHITECTURES
                and f.base_model_version == metadata.get("ss_base_model_version")]
    resolved = resolve_names(flat, origin=path, base=base_names, probes=probes, base_key=base_key,
                             skip_unknown=skip_unknown, family=recorded[0] if recorded else None)
    architectures = resolved.architectures
    arch = ARCHITECTURES[architectures[0]] if architectures and architectures[0] in ARCHITECTURES \
        and base_names is None else None
    base_shapes = base_names.modules if base_names is not None else {}

    family_shapes = family_modules(architectures[0]) if architectures and architectures[0] in FAMILIES else {}
    layers: dict[str, LowRank] = {}
    algorithms: dict[str, str] = {}
    flattened: list[str] = []
    native: dict[str, NativeModule] = {}
    for name, parts in groups.items():
        target = resolved.targets.get(name)
        if target is None:
            continue
        hint = shape_hint(target, arch, base_shapes) or family_shapes.get(target.pieces[0].module)
        update, algorithm = module_update(name, parts, origin=path, shape_hint=hint)
        if algorithm in ("loha", "lokr") and update.A.ndim == 2 and hint is None:
            flattened.extend(p.module for p in target.pieces)  # LyCORIS stores conv kernels flattened
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
            if algorithm in ALGORITHMS and not target.fused:
                native[module] = NativeModule(lowrank, name if is_kohya_key(name + ".x") else None, dict(parts))
    if not layers:
        raise UnknownFormat(f"{path}: no module of this file is known; skipped {len(resolved.skipped)}")
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point() and t.ndim > 0}
    config: dict[str, Any] = {"metadata": metadata, "algorithms": algorithms}
    if architectures and not resolved.by_family and base_names is None:
        # Table names can fit a newer family too (SD3's diffusers names are a subset of Flux.1's).
        architectures = list(dict.fromkeys([*architectures, *architectures_of(
            {m: tuple(lr.delta_shape) for m, lr in layers.items()})]))
    if architectures:
        config["architectures"] = architectures
    if resolved.skipped:
        config["skipped"] = list(resolved.skipped)
    if flattened:
        config["flattened"] = flattened
    if native:
        config[NATIVE_KEY] = native
    config["keys"] = {name: target.pieces[0].module if len(target.pieces) == 1 else [p.module for p in target.pieces]
                      for name, target in resolved.targets.items()}
    return Adapter(
        layers, source_format=source_format, dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32,
        source=str(path), config=config,
    )


def read_lycoris(path: Path, *, allow_pickle: bool = False, base: str | Path | None = None,
                 skip_unknown: bool = False) -> Adapter:
    """:func:`read` for LyCORIS files: the same names, ``source_format='lycoris'``."""
    return read(path, allow_pickle=allow_pickle, base=base, source_format="lycoris", skip_unknown=skip_unknown)
