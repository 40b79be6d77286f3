"""kohya module names ↔ canonical module paths, in both directions.

Reading: :func:`resolve_names` looks each kohya name up in the built-in tables of
:mod:`loramerge.io.formats.sd_names` (SD 1.x, SD 2.x, SDXL, Flux.1) or, given a base
checkpoint, among its flattened weight names (:mod:`loramerge.io.formats.base_names`). A file
none of whose names is known keeps its kohya names as opaque module names (enough to merge such
files with each other and write them back).

Writing: :func:`kohya_name` spells a canonical module the way the architecture's trainers do.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from loramerge.core.adapter import Adapter
from loramerge.errors import IncompatibleAdapters, UnknownFormat
from loramerge.io.formats.base_names import BaseNames
from loramerge.io.formats.converted import ProbeModule, modules_agreeing, resolve_flattened
from loramerge.io.formats.converted import resolve as resolve_by_converter
from loramerge.io.formats.families import FAMILIES, candidates_by_markers, compatible, diffusers_available
from loramerge.io.formats.kohya.keys import fits
from loramerge.io.formats.sd_names import (
    ARCHITECTURES,
    KOHYA_PREFIXES,
    Architecture,
    KohyaTarget,
    Piece,
    Shape,
    architectures_for_kohya,
    flatten,
    identify,
)
from loramerge.io.names import nearest

# Where canonical components go when no table names the module.
_DEFAULT_COMPONENT_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_",
                             "text_encoder_3": "lora_te3_", "transformer": "lora_transformer_"}
_ORIGINAL_CONTAINERS = {"model.diffusion_model.": "lora_unet_", "diffusion_model.": "lora_unet_",
                        "cond_stage_model.transformer.": "lora_te_", "cond_stage_model.": "lora_te_",
                        "conditioner.embedders.0.transformer.": "lora_te1_",
                        "conditioner.embedders.1.model.": "lora_te2_"}


@dataclass
class Resolved:
    """Where a file's modules go: each one's :class:`KohyaTarget`, the architectures or family that fit
    (best first), and the modules skipped as unknown (``skip_unknown``)."""

    targets: dict[str, KohyaTarget]
    architectures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    by_family: bool = False  # resolved by a diffusers family (its converter or module list), not a table


def resolve_names(flat: Mapping[str, Shape], *, origin: Path | str,
                  base: BaseNames | str | Path | None = None, probes: Mapping[str, ProbeModule] | None = None,
                  base_key: Callable[[str], str] | None = None, skip_unknown: bool = False,
                  family: str | None = None) -> Resolved:
    """Each module's :class:`KohyaTarget` and the architectures that fit, best first.

    With ``base`` the names (spelled for the lookup by ``base_key``) are looked up among the
    base checkpoint's weights; otherwise in the built-in tables and then, when diffusers is
    installed, through the model families' own converters (``probes`` gives each module's keys,
    see :mod:`loramerge.io.formats.converted`). A file none of whose names anything knows keeps
    its names (opaque). An unknown name among known ones is an error naming it (and, with a base,
    the nearest base names) unless ``skip_unknown``, which leaves it out and lists it.

    Example:
        >>> found = resolve_names({"lora_unet_input_blocks_4_1_proj_in": (640, 640)}, origin="f")
        >>> found.targets["lora_unet_input_blocks_4_1_proj_in"].pieces[0].module, found.architectures
        ('unet.down_blocks.1.attentions.0.proj_in', ['sdxl'])
    """
    names = list(flat)
    if base is not None:
        base_names = base if isinstance(base, BaseNames) else BaseNames.from_path(base)
        targets: dict[str, KohyaTarget] = {}
        unresolved = []
        for name in names:
            module = base_names.lookup(base_key(name) if base_key else name)
            if module is None:
                unresolved.append(name)
                continue
            shape = base_names.modules[module]
            targets[name] = KohyaTarget(name, shape, (Piece(module, 0, 0, shape[0]),))
        architectures = identify({t.pieces[0].module: t.shape for t in targets.values()})
        if unresolved and probes is not None and diffusers_available():
            # Original-checkpoint names against a diffusers-named base: the family converter names them.
            with contextlib.suppress(UnknownFormat):
                found = _family_resolved({n: flat[n] for n in unresolved}, probes, origin, skip_unknown=True)
                targets.update(found.targets)
                unresolved = found.skipped
                architectures = found.architectures
        if unresolved and not skip_unknown:
            near = nearest(base_key(unresolved[0]) if base_key else unresolved[0], base_names.index_names())
            hint = f"; nearest base names: {', '.join(near)}" if near else ""
            raise UnknownFormat(
                f"{origin}: {len(unresolved)} module name(s) match no weight of the base {base_names.origin}: "
                f"{first_names(unresolved)}{hint} (--skip-unknown leaves them out)"
            )
        return Resolved(targets, architectures, unresolved)

    if family is not None and probes is not None and diffusers_available():
        # The file names its family (loramerge writes ss_base_model_version): Flux.2's names are mostly Flux.1's.
        with contextlib.suppress(UnknownFormat):
            return _family_resolved(flat, probes, origin, skip_unknown=skip_unknown, family=family)
    found = architectures_for_kohya(names)
    unknown = [n for n in names if not found[n]]
    if unknown and probes is not None and diffusers_available():
        # A newer family whose names the SD/Flux.1 tables do not know (or know only a few of by chance).
        by_family = None
        with contextlib.suppress(UnknownFormat):
            by_family = _family_resolved(flat, probes, origin, skip_unknown=True)
        if by_family is not None and len(by_family.skipped) < len(unknown):
            if by_family.skipped and not skip_unknown:  # outside the suppress: the modules must be named
                raise UnknownFormat(_unmapped(origin, by_family.architectures[0], by_family.skipped))
            return by_family
    if len(unknown) == len(names):  # nothing knows them: they stay opaque
        return Resolved({n: KohyaTarget(n, flat[n], (Piece(n, 0, 0, flat[n][0]),)) for n in names})
    if unknown and not skip_unknown:
        raise UnknownFormat(
            f"{origin}: {len(unknown)} module name(s) match no SD 1.x/SD 2.x/SDXL/Flux module: {first_names(unknown)}; "
            "pass --base CHECKPOINT (base=...) to resolve names from the model's own weights, "
            "or --skip-unknown to leave them out"
        )
    known = [n for n in names if found[n]]
    common = set.intersection(*(found[n] for n in known))
    if not common:
        examples = {}
        for n in known:
            examples.setdefault(frozenset(found[n]), n)
        shown = "; ".join(f"{n} is {'/'.join(ARCHITECTURES[a].label for a in sorted(s))}" for s, n in examples.items())
        raise IncompatibleAdapters(f"{origin}: modules of different architectures in one file ({shown})")
    candidates = [a for a in ARCHITECTURES if a in common]
    exact = [a for a in candidates if all(flat[n] == ARCHITECTURES[a].kohya[n].shape for n in known)]
    fitting = [a for a in candidates if all(fits(flat[n], ARCHITECTURES[a].kohya[n].shape) for n in known)]
    architectures = exact or fitting or candidates
    table = ARCHITECTURES[architectures[0]]
    if table.name in FAMILIES and probes is not None and diffusers_available():
        rival = _rival_family(flat, known, table, probes, origin)
        if isinstance(rival, Resolved):
            if rival.skipped and not skip_unknown:
                raise UnknownFormat(_unmapped(origin, rival.architectures[0], rival.skipped))
            return rival
        architectures = list(dict.fromkeys([architectures[0], *rival, *architectures]))
    return Resolved({n: _scaled_target(table.kohya[n], flat[n], origin) for n in known}, architectures, unknown)


def _rival_family(flat: Mapping[str, Shape], known: list[str], table: Architecture,
                  probes: Mapping[str, ProbeModule], origin: Path | str) -> Resolved | list[str]:
    """Another family that writes the table's names (Flux.2's original names are mostly Flux.1's): its reading
    when its released modules have the aspect ratio (out : in) of more of the file's modules than the table's
    have (Flux.1's MLP maps h → 4h, Flux.2's h → 6h); else the families that read every module as the table
    does (a file on attention alone fits both), to record after it."""
    def agrees(shape: Shape, released: Shape) -> bool:
        return shape[0] * math.prod(released[1:]) == released[0] * math.prod(shape[1:])

    score = sum(agrees(flat[n], table.kohya[n].shape) for n in known)
    best: tuple[int, Resolved] | None = None
    alike = []
    for family in candidates_by_markers(list(flat), hits_only=True):
        if compatible({family}, {table.name}):
            continue
        try:
            found = resolve_by_converter([probes[n] for n in flat], origin=origin, family=family)
        except UnknownFormat:
            continue
        theirs = modules_agreeing(found)
        if theirs > score and (best is None or theirs > best[0]):
            best = theirs, Resolved(found.targets, [family], found.unmapped, by_family=True)
        elif theirs == score and not found.unmapped and all(
                {p.module for p in found.targets[n].pieces} == {p.module for p in table.kohya[n].pieces} for n in known):
            alike.append(family)
    return best[1] if best is not None else alike


def _unmapped(origin: Path | str, family: str, names: list[str]) -> str:
    return (f"{origin}: {len(names)} module(s) that diffusers' {FAMILIES[family].label} converter maps to no module: "
            f"{first_names(names)} (--skip-unknown leaves them out)")


def _family_resolved(flat: Mapping[str, Shape], probes: Mapping[str, ProbeModule], origin: Path | str,
                     skip_unknown: bool, family: str | None = None) -> Resolved:
    """Names no built-in table knows, resolved by a model family's module list or its diffusers converter."""
    names = list(flat)
    flattened = resolve_flattened(names)
    if flattened is not None:
        family, modules = flattened
        targets = {n: KohyaTarget(n, flat[n], (Piece(m, 0, 0, int(flat[n][0])),)) for n, m in modules.items()}
        return Resolved(targets, [family], by_family=True)
    found = resolve_by_converter([probes[n] for n in names], origin=origin, family=family)
    if found.unmapped and not skip_unknown:
        raise UnknownFormat(_unmapped(origin, found.family, found.unmapped))
    return Resolved(found.targets, [found.family, *found.also], found.unmapped, by_family=True)


def first_names(names: list[str], count: int = 5) -> str:
    return ", ".join(names[:count]) + (" ..." if len(names) > count else "")


def _scaled_target(target: KohyaTarget, shape: Shape, origin: Path | str) -> KohyaTarget:
    """``target`` for a model of another width: fused pieces shrink in proportion (tiny test models)."""
    rows = int(shape[0])
    if not target.fused or rows == target.shape[0]:
        return target
    factor, rest = divmod(target.shape[0], rows)
    if rest or any(v % factor for p in target.pieces for v in (p.src, p.dst, p.size)):
        raise IncompatibleAdapters(
            f"{origin}: fused module {target.name} has {rows} output rows; its parts need a multiple of "
            f"{target.shape[0] // math.gcd(*(p.size for p in target.pieces))}"
        )
    pieces = tuple(Piece(p.module, p.src // factor, p.dst // factor, p.size // factor) for p in target.pieces)
    return KohyaTarget(target.name, (rows, *shape[1:]), pieces)


def shape_hint(target: KohyaTarget, arch: Architecture | None, base_shapes: Mapping[str, Shape]) -> Shape | None:
    """The full (unflattened) shape of the kohya module's update when a table or the base knows it."""
    if base_shapes:
        return base_shapes.get(target.pieces[0].module)
    if arch is not None and target.name in arch.kohya:
        return arch.kohya[target.name].shape
    return None



def choose_architecture(adapter: Adapter) -> Architecture | None:
    """The architecture whose names the writer uses: the adapter's own record, narrowed by its modules."""
    shapes = {m: tuple(lr.delta_shape) for m, lr in adapter.layers.items()}
    found = identify(shapes)
    recorded = adapter.config.get("architectures") or []
    if recorded and recorded[0] not in ARCHITECTURES:
        return None  # read as a newer family (SD3, Wan …): its own names, not a table's
    preferred = [a for a in recorded if a in found] or found
    return ARCHITECTURES[preferred[0]] if preferred else None


def kohya_name(module: str, arch: Architecture | None) -> str:
    """The kohya module name a canonical module is written under.

    Example:
        >>> kohya_name("unet.down_blocks.0.resnets.0.conv1", ARCHITECTURES["sd1"])
        'lora_unet_down_blocks_0_resnets_0_conv1'
        >>> kohya_name("model.diffusion_model.input_blocks.1.1.proj_in", None)
        'lora_unet_input_blocks_1_1_proj_in'
    """
    if arch is not None and module in arch.preferred:
        return arch.preferred[module]
    if module.startswith(KOHYA_PREFIXES):
        return module
    for container, prefix in _ORIGINAL_CONTAINERS.items():
        if module.startswith(container):
            return prefix + flatten(module[len(container):])
    component, _, rest = module.partition(".")
    if rest and component in _DEFAULT_COMPONENT_PREFIX:
        prefixes = dict(_DEFAULT_COMPONENT_PREFIX)
        if arch is not None:
            prefixes.update(arch.te_prefixes)
        return prefixes[component] + flatten(rest)
    return "lora_unet_" + flatten(module)
