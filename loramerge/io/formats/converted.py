"""Module names of trainer layouts resolved by the family's own diffusers converter.

Each diffusers pipeline class converts the layouts its family's trainers write (kohya and
musubi-tuner ``lora_unet_…``, ComfyUI and AI-Toolkit ``diffusion_model.…``, XLabs, DiffSynth …)
to diffusers module names in its public ``lora_state_dict``. loramerge uses that conversion as
a *name oracle* rather than for the numbers: it feeds the converter a probe with the file's own
keys, rank 1, ``A`` all ones and each row of ``B`` holding a unique id, and reads back where
every row went. That gives, for every module of the file, the diffusers modules and row ranges
it becomes (a fused ``qkv`` splits into three pieces), while loramerge still does all the
arithmetic itself, so nothing the converter does not carry is lost (DoRA magnitudes, LyCORIS
LoHa/LoKr, conv kernels, exact scales). A module the converter drops, or turns into nothing,
is reported by name instead of vanishing.

Example:
    >>> probe, starts = probe_state_dict([ProbeModule("m", (3, 2), "m.lora_down.weight", "m.lora_up.weight")])
    >>> probe["m.lora_up.weight"].flatten().tolist(), probe["m.lora_down.weight"].tolist()
    ([1.0, 2.0, 3.0], [[1.0, 1.0]])
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from loramerge.errors import UnknownFormat
from loramerge.io.formats.base_names import BaseNames
from loramerge.io.formats.families import (
    FAMILIES,
    candidates_by_markers,
    families_of,
    family_modules,
    pipeline_class,
)
from loramerge.io.formats.sd_names import KohyaTarget, Piece, Shape

_FACTOR_SUFFIXES = {
    "lora_A.weight": "A", "lora_B.weight": "B", "lora_down.weight": "A", "lora_up.weight": "B",
    "lora_A.default.weight": "A", "lora_B.default.weight": "B",
}
_COMPONENT_HEADS = ("transformer", "transformer_2", "text_encoder", "text_encoder_2", "text_encoder_3", "unet")


@dataclass(frozen=True)
class ProbeModule:
    """One module of a file: its name, update shape, and the keys its A, B (and alpha) have in that file."""

    name: str
    shape: Shape
    down_key: str
    up_key: str
    alpha_key: str | None = None
    rank: int = 1  # 2 for converters that chunk lora_A too (HunyuanVideo's final adaLN_modulation): copies of A


@dataclass
class Resolution:
    """What the converter made of a file: each module's target, the family, and the modules it dropped.

    ``also`` lists other families whose converters place every module the same way (a file whose
    names several families share).
    """

    targets: dict[str, KohyaTarget]
    family: str
    unmapped: list[str]
    also: list[str] = field(default_factory=list)


def probe_state_dict(modules: Sequence[ProbeModule]) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The probe: rank-1 factors under the file's keys, ``A`` all ones, ``B`` rows numbered 1, 2, … across modules.

    A module of ``rank`` r > 1 repeats that ``A`` r times, with zero columns of ``B`` (and alpha r) for the
    copies: the same update for a converter that splits ``A`` along its rank as for one that keeps it.
    Returns the probe and the first row id of each module (ids are exact in float64).
    """
    probe: dict[str, torch.Tensor] = {}
    starts = []
    next_id = 1
    for module in modules:
        out = int(module.shape[0])
        kernel = [1] * (len(module.shape) - 2)
        probe[module.down_key] = torch.ones(module.rank, *module.shape[1:], dtype=torch.float64)
        up = torch.zeros(out, module.rank, *kernel, dtype=torch.float64)
        up[:, 0] = torch.arange(next_id, next_id + out, dtype=torch.float64).reshape(out, *kernel)
        probe[module.up_key] = up
        if module.alpha_key is not None:
            probe[module.alpha_key] = torch.tensor(float(module.rank), dtype=torch.float64)
        starts.append(next_id)
        next_id += out
    return probe, starts


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    # The converters log per key (dropped DoRA scales, unsupported keys); loramerge reports those itself.
    loggers = [logging.getLogger(n) for n in ("diffusers", "diffusers.loaders")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def run_converter(family: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` converted to diffusers names by the family's pipeline ``lora_state_dict``."""
    cls = pipeline_class(FAMILIES[family])
    with _quiet_diffusers():
        result = cls.lora_state_dict(dict(state_dict))
    if isinstance(result, tuple):
        result = result[0]
    return dict(result)


def factor_of(key: str) -> tuple[str, str] | None:
    """``(module, "A" | "B")`` for a LoRA factor key in any of the spellings converters emit, else None.

    Example:
        >>> factor_of("transformer.blocks.0.attn1.to_q.lora_B.weight")
        ('transformer.blocks.0.attn1.to_q', 'B')
    """
    for suffix, factor in _FACTOR_SUFFIXES.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], factor
    return None


def read_probe(converted: Mapping[str, torch.Tensor], modules: Sequence[ProbeModule],
               starts: Sequence[int]) -> tuple[dict[str, KohyaTarget], list[str]]:
    """Each probed module's target (its rows' places among the diffusers modules) and the modules that went nowhere.

    A diffusers module whose rows do not come back as whole ids (the converter mixed rows or
    changed the inputs) makes the probe unreadable: UnknownFormat.
    """
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in converted.items():
        found = factor_of(key)
        if found is not None:
            factors.setdefault(found[0], {})[found[1]] = tensor
    places: dict[int, list[Piece]] = {}  # module index -> runs of its rows in the diffusers modules
    rows_of: dict[str, int] = {}
    bounds = torch.tensor(starts, dtype=torch.float64)
    for out_module, pair in factors.items():
        if "B" not in pair or "A" not in pair:
            continue
        B = pair["B"].reshape(pair["B"].shape[0], -1).to(torch.float64)
        A = pair["A"].reshape(pair["A"].shape[0], -1).to(torch.float64)
        if B.shape[1] != A.shape[0] or ((A != 0) & (A != 1)).any() or ((B != 0).sum(1) > 1).any():
            raise UnknownFormat(f"the converter changed the probe of {out_module} in a way loramerge cannot follow")
        ids = B.sum(1)
        if (ids != ids.round()).any():
            raise UnknownFormat(f"the converter changed the probe of {out_module} in a way loramerge cannot follow")
        name = out_module if out_module.split(".", 1)[0] in _COMPONENT_HEADS else f"transformer.{out_module}"
        rows_of[name] = int(B.shape[0])
        dst = torch.nonzero(ids).flatten()
        if not len(dst):
            continue
        value = ids[dst]
        index = torch.searchsorted(bounds, value, right=True) - 1
        src = value - bounds[index]
        # a run ends where the next row is not the next row of the same module in both places
        breaks = torch.ones(len(dst), dtype=torch.bool)
        breaks[1:] = (index[1:] != index[:-1]) | (src[1:] != src[:-1] + 1) | (dst[1:] != dst[:-1] + 1)
        firsts = torch.nonzero(breaks).flatten().tolist()
        for begin, end in zip(firsts, [*firsts[1:], len(dst)]):
            places.setdefault(int(index[begin]), []).append(
                Piece(name, int(src[begin]), int(dst[begin]), end - begin))
    targets: dict[str, KohyaTarget] = {}
    unmapped = []
    for index, module in enumerate(modules):
        rows = places.get(index)
        if not rows:
            unmapped.append(module.name)
            continue
        pieces = tuple(sorted(rows, key=lambda p: (p.src, p.module, p.dst)))
        targets[module.name] = KohyaTarget(module.name, tuple(module.shape), pieces,
                                           rows={p.module: rows_of[p.module] for p in pieces}, copies=module.rank)
    return targets, unmapped


def resolve(modules: Sequence[ProbeModule], *, origin: Path | str, family: str | None = None) -> Resolution:
    """Resolve ``modules`` (a file's modules, in its own key spelling) through the family converters.

    The family is ``family`` or, when not given, one (ordered by name markers) whose converter
    maps the modules onto modules its denoiser has. Among the families with markers in the file
    whose converters place every module (Flux.1 and Flux.2 share most original names), the one
    whose shapes agree best with its released model wins (:func:`shape_agreement`), the marker
    order breaking ties; failing that, the converter that maps the most. No family at all:
    UnknownFormat naming a few modules.
    """
    names = [m.name for m in modules]
    candidates = [family] if family else candidates_by_markers(names)
    marked = set(candidates_by_markers(names, hits_only=True))
    best: Resolution | None = None
    complete: list[Resolution] = []
    for position, name in enumerate(candidates):
        if complete and name not in marked:
            break
        attempt = convert_probe(name, modules)
        if attempt is None and (position == 0 or name in marked) and len(modules) > 1:
            # The converters work on whole files and refuse one they cannot finish: one stray key
            # would hide every other module. The families the names point to get them one at a time.
            attempt = _convert_each(name, modules)
        if attempt is None:
            continue
        targets, unmapped = attempt
        found = Resolution(targets, name, unmapped)
        if not unmapped:
            complete.append(found)
        elif best is None or len(unmapped) < len(best.unmapped):
            best = found
    if complete:
        scores = [shape_agreement(r) for r in complete]
        winner = complete[scores.index(max(scores))]
        winner.also = [r.family for r, score in zip(complete, scores)
                       if r is not winner and score == max(scores) and r.targets == winner.targets]
        return winner
    if best is None:
        shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
        tried = ", ".join(FAMILIES[c].label for c in candidates)
        raise UnknownFormat(f"{origin}: no model family's diffusers converter ({tried}) knows these modules: {shown}")
    return best


def shape_agreement(found: Resolution) -> int:
    """How many modules ``found`` produces whose update has the aspect ratio (out : in) of the family's
    released module of that name.

    The ratio does not depend on the model's width, so it tells apart families that name modules
    alike but size them differently, at any width: Flux.1's MLP maps ``h → 4h`` (GELU), Flux.2's
    ``h → 6h`` (SwiGLU), Flux.1's ``linear2`` takes ``5h``, Flux.2's ``4h``.
    """
    released = family_modules(found.family)
    return sum(len(_agreeing(target, released)) for target in found.targets.values())


def modules_agreeing(found: Resolution) -> int:
    """How many of the file's modules have every diffusers module they become at the released aspect ratio
    (:func:`shape_agreement` counted per file module, to weigh against a name table's reading)."""
    released = family_modules(found.family)
    return sum(len(_agreeing(t, released)) == len({p.module for p in t.pieces}) for t in found.targets.values())


def _agreeing(target: KohyaTarget, released: Mapping[str, Shape]) -> list[str]:
    inputs = math.prod(target.shape[1:])
    agree = []
    for module in {p.module for p in target.pieces}:
        shape = released.get("transformer." + module.split(".", 1)[1])
        rows = (target.rows or {}).get(module, sum(p.size for p in target.pieces if p.module == module))
        if shape is not None and rows * math.prod(shape[1:]) == shape[0] * inputs:
            agree.append(module)
    return agree


def _spellings(modules: Sequence[ProbeModule], repeat_a: bool = True) -> list[list[ProbeModule]]:
    """The probe as the file spells it, without alphas, and with PEFT's ``lora_A``/``lora_B`` spelled
    ``lora_down``/``lora_up``.

    The alphas only steer some converters to the right layout; a converter that chokes on one
    (Wan's rejects an alpha on ``head.head``) gets the probe without them. ComfyUI reads both
    spellings of a factor alike; some converters know only one (diffusers' Flux.1 converter reads
    ``diffusion_model.…`` files with kohya's suffixes only).
    """
    variants = [list(modules)]
    if any(m.alpha_key for m in modules):
        variants.append([replace(m, alpha_key=None) for m in modules])
    respelled = [replace(m, down_key=_kohya_suffix(m.down_key), up_key=_kohya_suffix(m.up_key)) for m in modules]
    if respelled != list(modules):
        variants.append(respelled)
    if repeat_a and all(m.rank == 1 for m in modules):
        variants.append([replace(m, rank=2) for m in modules])  # a converter that halves lora_A fails on rank 1
    return variants


def _kohya_suffix(key: str) -> str:
    for peft_suffix, kohya in (("lora_A.default.weight", "lora_down.weight"), ("lora_B.default.weight", "lora_up.weight"),
                               ("lora_A.weight", "lora_down.weight"), ("lora_B.weight", "lora_up.weight")):
        if key.endswith("." + peft_suffix):
            return key[: -len(peft_suffix)] + kohya
    return key


def convert_probe(family: str, modules: Sequence[ProbeModule], *,
                  repeat_a: bool = True) -> tuple[dict[str, KohyaTarget], list[str]] | None:
    """The probe of ``modules`` through ``family``'s converter, as one file: each module's target and the
    modules that went nowhere; None when the converter refuses every spelling of the file
    (:func:`_spellings`; ``repeat_a=False`` leaves out the one with ``A`` repeated) or places a module on
    none of the family's modules."""
    for variant in _spellings(modules, repeat_a):
        probe, starts = probe_state_dict(variant)
        try:
            targets, unmapped = read_probe(run_converter(family, probe), variant, starts)
        except Exception:  # a converter that does not know this layout fails in its own ways
            continue
        produced = sorted({p.module for t in targets.values() for p in t.pieces})
        if targets and families_of(produced, [family]):
            return targets, unmapped
    return None


def _convert_each(family: str, modules: Sequence[ProbeModule]) -> tuple[dict[str, KohyaTarget], list[str]] | None:
    targets: dict[str, KohyaTarget] = {}
    failed: list[ProbeModule] = []
    for module in modules:
        attempt = convert_probe(family, [module])
        if attempt is None or not attempt[0]:
            failed.append(module)
        else:
            targets.update(attempt[0])
    unmapped = []
    factors = _width_factors(family, targets.values())
    for module in failed:
        found = next((t for f in factors if (t := _widened(family, module, f)) is not None), None)
        if found is None:
            unmapped.append(module.name)
        else:
            targets[module.name] = found
    return (targets, unmapped) if targets else None


def _width_factors(family: str, targets: Iterable[KohyaTarget]) -> list[int]:
    """How many times wider the released model is than the file, from the inputs of the modules that converted,
    most frequent first (a converter with the released widths written in needs the file at that width)."""
    released = family_modules(family)
    counts: dict[int, int] = {}
    for target in targets:
        for module in {p.module for p in target.pieces}:
            shape = released.get("transformer." + module.split(".", 1)[1])
            inputs = math.prod(target.shape[1:])
            if shape is not None and math.prod(shape[1:]) % inputs == 0 and math.prod(shape[1:]) > inputs:
                factor = math.prod(shape[1:]) // inputs
                counts[factor] = counts.get(factor, 0) + 1
    return sorted(counts, key=lambda f: -counts[f])


def _widened(family: str, module: ProbeModule, factor: int) -> KohyaTarget | None:
    """``module`` probed ``factor`` times wider (both ways) and its rows scaled back: the split points of a fused
    module scale with the model's width (Flux.1's ``linear1``: q, k, v of h rows each, then 4h for the MLP).
    Kept only when every part lands whole and at its released module's aspect ratio."""
    wide = replace(module, shape=(module.shape[0] * factor, module.shape[1] * factor, *module.shape[2:]))
    attempt = convert_probe(family, [wide])
    target = attempt[0].get(module.name) if attempt is not None else None
    if target is None or any(v % factor for p in target.pieces for v in (p.src, p.dst, p.size)) \
            or any(r % factor for r in (target.rows or {}).values()):
        return None
    scaled = KohyaTarget(module.name, tuple(module.shape), tuple(
        Piece(p.module, p.src // factor, p.dst // factor, p.size // factor) for p in target.pieces),
        rows={m: r // factor for m, r in (target.rows or {}).items()}, copies=target.copies)
    parts = {p.module for p in scaled.pieces}
    return scaled if len(_agreeing(scaled, family_modules(family))) == len(parts) else None


def resolve_flattened(names: Sequence[str]) -> tuple[str, dict[str, str]] | None:
    """``(family, {name: module})`` when every kohya-style name flattens a module of one family's denoiser.

    This is how OneTrainer (``lora_transformer_``) and SimpleTuner's LyCORIS (``lycoris_``) name
    modules: behind a prefix, the diffusers path with its dots turned into underscores. Names that
    are not kohya-style give None at once.
    """
    if not all(n.startswith(("lora_transformer_", "lycoris_")) for n in names):
        return None
    for family in candidates_by_markers(list(names), converting=False):
        index = BaseNames(family_modules(family), origin=FAMILIES[family].label)
        found = {n: index.lookup(n) for n in names}
        if all(found.values()):
            return family, {n: m for n, m in found.items() if m is not None}
    return None
