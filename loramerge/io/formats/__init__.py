"""Adapter formats: detection, reading and writing. One module per format; one line registers it.

Example:
    >>> [f.name for f in FORMATS]
    ['peft', 'lycoris', 'kohya', 'comfyui', 'diffusers']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from loramerge.core.adapter import Adapter, install_output_hook
from loramerge.core.devices import parse_dtype
from loramerge.errors import ConfigNotFound, InvalidParameter, SourceNotFound, UnknownFormat
from loramerge.io.formats import comfyui, diffusers, kohya, peft
from loramerge.io.formats.component import for_component, recorded_component
from loramerge.io.output import atomic_output


@dataclass(frozen=True)
class AdapterFormat:
    """A registered format. ``single_file`` formats write one file at the output path, others a folder."""

    name: str
    detect: Callable[[Path], bool]
    read: Callable[..., Adapter]
    write: Callable[..., None] | None
    single_file: bool = False


FORMATS: tuple[AdapterFormat, ...] = (
    AdapterFormat("peft", peft.detect, peft.read, peft.write),
    # LyCORIS files share kohya's names; LoHa/LoKr/full modules read from one are written back unexpanded.
    AdapterFormat("lycoris", kohya.detect_lycoris, kohya.read_lycoris, kohya.write_lycoris, single_file=True),
    AdapterFormat("kohya", kohya.detect, kohya.read, kohya.write, single_file=True),
    # Original-checkpoint names (ComfyUI, AI-Toolkit, DiffSynth, XLabs), resolved by diffusers' converters.
    AdapterFormat("comfyui", comfyui.detect, comfyui.read, comfyui.write, single_file=True),
    AdapterFormat("diffusers", diffusers.detect, diffusers.read, diffusers.write),
)
# Formats whose module names may need a base checkpoint to resolve (``--base``).
NAME_RESOLVING = ("kohya", "lycoris", "comfyui")


def get_format(name: str) -> AdapterFormat:
    """The format called ``name``, or :class:`InvalidParameter` listing the known ones."""
    for fmt in FORMATS:
        if fmt.name == name.lower():
            return fmt
    raise InvalidParameter(f"unknown format {name!r}; known formats: {', '.join(f.name for f in FORMATS)}")


def detect_format(path: Path) -> AdapterFormat:
    """The first format whose detector accepts ``path``, or a clear error."""
    for fmt in FORMATS:
        if fmt.detect(path):
            return fmt
    if path.is_dir() and any((path / n).exists() for n in (peft.WEIGHTS_NAME, peft.PICKLE_WEIGHTS_NAME)):
        raise ConfigNotFound(f"{path}: no {peft.CONFIG_NAME}; it gives the rank and alpha the weights need")
    if path.is_file() and path.name in (peft.WEIGHTS_NAME, peft.PICKLE_WEIGHTS_NAME):
        raise ConfigNotFound(f"{path}: no {peft.CONFIG_NAME} beside it; it gives the rank and alpha the weights need")
    raise UnknownFormat(
        f"{path}: not an adapter in any known format ({', '.join(f.name for f in FORMATS)}){_first_keys(path)}"
    )


def _first_keys(path: Path, count: int = 5) -> str:
    keys = kohya.header_keys(path)
    if not keys:
        return ""
    return f"; first keys: {', '.join(keys[:count])}" + (" ..." if len(keys) > count else "")


def read_adapter(path: str | Path, *, format: str | None = None, allow_pickle: bool = False,
                 base: str | Path | None = None, skip_unknown: bool = False, component: str | None = None) -> Adapter:
    """Read the adapter at a local ``path``, detecting its format unless ``format`` is given.

    ``base`` (a checkpoint file or folder) resolves kohya and original-checkpoint module names
    from its weight names; other formats already name modules by path and ignore it. A module
    whose name resolves to nothing is an error, unless ``skip_unknown``: then it is left out and
    listed in the adapter's ``config["skipped"]``. ``component`` names the denoiser the file is
    for (Wan 2.2's second expert: ``transformer_2``), else the file's header record, else
    ``transformer`` (:mod:`loramerge.io.formats.component`).
    """
    path = Path(path)
    if not path.exists():
        raise SourceNotFound(f"{path}: no such file or folder")
    fmt = get_format(format) if format else detect_format(path)
    if fmt.name in NAME_RESOLVING:
        adapter = fmt.read(path, allow_pickle=allow_pickle, base=base, skip_unknown=skip_unknown)
    else:
        adapter = fmt.read(path, allow_pickle=allow_pickle)
    component = component or recorded_component(adapter.config.get("metadata"))
    return for_component(adapter, component) if component else adapter


def write_adapter(adapter: Adapter, path: str | Path, *, format: str | None = None,
                  dtype: torch.dtype | str | None = None, force: bool = False) -> Path:
    """Write ``adapter`` atomically to ``path`` in ``format`` (default: the adapter's own, else PEFT)."""
    fmt = get_format(format) if format else _default_output_format(adapter)
    if fmt.write is None:
        raise InvalidParameter(f"format {fmt.name!r} can be read but not written")
    out_dtype = parse_dtype(dtype) or adapter.dtype or torch.float32
    path = Path(path)
    if fmt.single_file and path.suffix != ".safetensors":
        raise InvalidParameter(f"{path}: a {fmt.name} LoRA is one safetensors file and loramerge reads it back by its "
                               f".safetensors suffix; name the output {path.name}.safetensors")
    with atomic_output(path, force=force, directory=not fmt.single_file) as tmp:
        fmt.write(adapter, tmp, dtype=out_dtype)
    return path


def _default_output_format(adapter: Adapter) -> AdapterFormat:
    for fmt in FORMATS:
        if fmt.name == adapter.source_format and fmt.write is not None:
            return fmt
    return FORMATS[0]


install_output_hook("save", write_adapter)
