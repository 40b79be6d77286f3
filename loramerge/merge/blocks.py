"""Per-block LoRA strength: the block lists and presets of the LoRA Block Weight extension, and named rules.

Image users scale a LoRA block by block, as hako-mikan's sd-webui-lora-block-weight extension does at
inference (``<lora:name:1:lbw=OUTALL>``). A block weight multiplies the update of every module in
the block, ΔW ← w·ΔW (a scale on the :class:`~loramerge.core.adapter.LowRank`), so it is exact and
composes with every merge method: the sources are weighted before they are merged.

**Block lists** (the extension's, in its order; a vector has one entry per block):

=================  ==  ================================================================
SD 1.x/2.x LoRA    17  BASE IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03 … OUT11
SD 1.x/2.x full    26  BASE IN00 … IN11 M00 OUT00 … OUT11 (LyCORIS/LoCon order)
SDXL LoRA          12  BASE IN04 IN05 IN07 IN08 M00 OUT00 … OUT05
SDXL full          20  BASE IN00 … IN08 M00 OUT00 … OUT08 (LyCORIS/LoCon order)
Flux.1             61  CLIP T5 IN D00 … D18 S00 … S37 OUT
=================  ==  ================================================================

``BASE`` is the text encoder(s); ``INnn``, ``M00`` and ``OUTnn`` are the original (LDM/SGM)
``input_blocks.nn``, ``middle_block`` and ``output_blocks.nn`` of the UNet, whatever spelling the
file uses (module names are looked up in :mod:`loramerge.io.formats.sd_names`, which knows each
diffusers module's original path). The short lists hold the blocks a plain LoRA (attention and
projection layers) can touch; the full lists add the resnet, conv_in and down/upsampler blocks a
LoCon changes. For Flux, ``CLIP``/``T5`` are the two text encoders, ``IN`` the input embedders,
``Dnn`` the double blocks, ``Snn`` the single blocks and ``OUT`` the final layer. Modules outside
every block (the UNet's time and label embeddings and ``conv_out``) keep weight 1, as in the
extension, and a warning lists them.

**Presets** are the extension's standard ones: ``NONE``, ``ALL``, ``INS``, ``IND``, ``INALL``,
``MIDD``, ``OUTD``, ``OUTS``, ``OUTALL`` and ``ALL0.5`` (and ``FLUXALL`` for Flux). The extension
defines them as 17-entry SD vectors over five regions (shallow and deep input blocks, the middle,
deep and shallow output blocks, plus BASE); here they are defined by those regions, so they give
the extension's vectors exactly on the 17 SD blocks and carry over to the full lists and to SDXL
(where the shallow blocks are the 640-channel level and the deep ones the 1280-channel level).

**Rules** name blocks or modules: ``double_blocks.0-9=0.5``, ``single_transformer_blocks.20-37=0``,
``BASE=0``, ``IN04=0.3``. A rule is a recipe filter rule (:class:`~loramerge.merge.schedule.Rule`,
first match wins): its filter is a regular expression searched in each of the module's names —
its path (``transformer.transformer_blocks.3.attn.to_q``), its original checkpoint path
(``double_blocks.3.img_attn.qkv``, ``input_blocks.4.1.proj_in``) and its block (``D03``, ``IN04``)
— with two conveniences: a match starts at the beginning of a dotted segment (``transformer_blocks``
does not match ``single_transformer_blocks``), and a dotted segment of digits or a range ``N-M``
matches whole numbers only (``blocks.1`` is not ``blocks.12``). Rules work for every model family,
with or without a block table; rules come before a vector or preset, and a module no rule matches
takes the vector's weight (or 1).

Example:
    >>> import torch
    >>> from loramerge.core.adapter import Adapter, LowRank
    >>> lr = LowRank(torch.ones(1, 4), torch.ones(4, 1))
    >>> flux = Adapter({"transformer.transformer_blocks.3.attn.to_q": lr,
    ...                 "transformer.single_transformer_blocks.3.proj_out": lr}, config={"architectures": ["flux"]})
    >>> weighted = weigh_blocks([flux], BlockWeighting.parse(["double_blocks.0-9=0.5"]))[0]
    >>> [weighted[m].scale for m in weighted.modules]
    [0.5, 1.0]
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from loramerge.core.adapter import Adapter, LowRank
from loramerge.errors import InvalidParameter, LoramergeWarning, UnsupportedAdapter
from loramerge.io.formats.kohya.native import NATIVE_KEY, kept, scaled_native
from loramerge.io.formats.sd_names import ARCHITECTURES, Architecture, identify
from loramerge.merge.schedule import Rule


def _numbered(prefix: str, numbers: Iterable[int]) -> tuple[str, ...]:
    return tuple(f"{prefix}{i:02d}" for i in numbers)


# ------------------------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class BlockList:
    """One of the extension's block orders: a block vector has one weight per block, in this order."""

    label: str
    blocks: tuple[str, ...]


SD_LORA = BlockList("SD 1.x/2.x LoRA", ("BASE", *_numbered("IN", (1, 2, 4, 5, 7, 8)), "M00", *_numbered("OUT", range(3, 12))))
SD_FULL = BlockList("SD 1.x/2.x LyCORIS", ("BASE", *_numbered("IN", range(12)), "M00", *_numbered("OUT", range(12))))
SDXL_LORA = BlockList("SDXL LoRA", ("BASE", *_numbered("IN", (4, 5, 7, 8)), "M00", *_numbered("OUT", range(6))))
SDXL_FULL = BlockList("SDXL LyCORIS", ("BASE", *_numbered("IN", range(9)), "M00", *_numbered("OUT", range(9))))
FLUX_LIST = BlockList("Flux.1", ("CLIP", "T5", "IN", *_numbered("D", range(19)), *_numbered("S", range(38)), "OUT"))

# Preset regions: shallow and deep input blocks, the middle block, deep and shallow output blocks.
_SD_REGIONS = {"BASE": "BASE", **dict.fromkeys(_numbered("IN", range(5)), "INS"),
               **dict.fromkeys(_numbered("IN", range(5, 12)), "IND"), "M00": "MID",
               **dict.fromkeys(_numbered("OUT", range(7)), "OUTD"), **dict.fromkeys(_numbered("OUT", range(7, 12)), "OUTS")}
_SDXL_REGIONS = {"BASE": "BASE", **dict.fromkeys(_numbered("IN", range(7)), "INS"),
                 **dict.fromkeys(_numbered("IN", (7, 8)), "IND"), "M00": "MID",
                 **dict.fromkeys(_numbered("OUT", range(3)), "OUTD"), **dict.fromkeys(_numbered("OUT", range(3, 9)), "OUTS")}

# The extension's standard presets, by region (a region not named gets 0).
UNET_PRESETS: dict[str, dict[str, float]] = {
    "NONE": {},
    "ALL": dict.fromkeys(("BASE", "INS", "IND", "MID", "OUTD", "OUTS"), 1.0),
    "INS": {"BASE": 1.0, "INS": 1.0},
    "IND": {"BASE": 1.0, "IND": 1.0},
    "INALL": {"BASE": 1.0, "INS": 1.0, "IND": 1.0},
    "MIDD": {"BASE": 1.0, "IND": 1.0, "MID": 1.0, "OUTD": 1.0},
    "OUTD": {"BASE": 1.0, "OUTD": 1.0},
    "OUTS": {"BASE": 1.0, "OUTS": 1.0},
    "OUTALL": {"BASE": 1.0, "OUTD": 1.0, "OUTS": 1.0},
    "ALL0.5": dict.fromkeys(("BASE", "INS", "IND", "MID", "OUTD", "OUTS"), 0.5),
}
# Presets that weight every block alike, so they apply to every block table.
UNIFORM_PRESETS = {"NONE": 0.0, "ALL": 1.0, "ALL0.5": 0.5, "FLUXALL": 1.0}
PRESETS = (*UNET_PRESETS, "FLUXALL")

_UNET_BLOCK = re.compile(r"^(?:input_blocks\.(?P<inp>\d+)|middle_block|output_blocks\.(?P<out>\d+))\.")
_FLUX_BLOCK = re.compile(r"^(?:double_blocks\.(?P<double>\d+)|single_blocks\.(?P<single>\d+)|(?P<final>final_layer)"
                         r"|(?P<inp>img_in|txt_in|time_in|vector_in|guidance_in))(?:\.|$)")


@dataclass(frozen=True)
class BlockTable:
    """A model family's blocks: the vector orders it accepts and which block each module is in.

    Example:
        >>> BLOCK_TABLES["sdxl"].block_of("unet.down_blocks.1.attentions.0.proj_in", ARCHITECTURES["sdxl"])
        'IN04'
        >>> BLOCK_TABLES["flux"].block_of("transformer.single_transformer_blocks.7.attn.to_q", ARCHITECTURES["flux"])
        'S07'
    """

    family: str
    label: str
    architectures: tuple[str, ...]
    lists: tuple[BlockList, ...]
    regions: Mapping[str, str] = field(default_factory=dict)

    @property
    def full(self) -> BlockList:
        """The list with every block of the family (the last one)."""
        return self.lists[-1]

    def original_path(self, module: str, arch: Architecture) -> str | None:
        """The module's path in the original single-file checkpoint (LDM/SGM or BFL), where the tables know it."""
        return arch.original.get(module) or arch.fused_original.get(arch.preferred.get(module, ""))

    def block_of(self, module: str, arch: Architecture) -> str | None:
        """The block ``module`` is in, or None when it is in none (time embeddings, ``conv_out``)."""
        component = module.split(".", 1)[0]
        if component.startswith("text_encoder"):
            if self.family == "flux":
                return "CLIP" if component == "text_encoder" else "T5"
            return "BASE"
        original = self.original_path(module, arch)
        if original is None:
            return None
        if self.family == "flux":
            found = _FLUX_BLOCK.match(original)
            if found is None:
                return None
            if found["double"] is not None:
                return f"D{int(found['double']):02d}"
            if found["single"] is not None:
                return f"S{int(found['single']):02d}"
            return "OUT" if found["final"] else "IN"
        found = _UNET_BLOCK.match(original)
        if found is None:
            return None
        if found["inp"] is not None:
            return f"IN{int(found['inp']):02d}"
        if found["out"] is not None:
            return f"OUT{int(found['out']):02d}"
        return "M00"

    def preset(self, name: str) -> dict[str, float]:
        """The weight of every block of the full list under preset ``name``.

        Example:
            >>> w = BLOCK_TABLES["sd"].preset("OUTD")
            >>> [w[b] for b in SD_LORA.blocks]
            [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        """
        if name in UNIFORM_PRESETS and (name != "FLUXALL" or self.family == "flux"):
            return dict.fromkeys(self.full.blocks, UNIFORM_PRESETS[name])
        if name in UNET_PRESETS and self.regions:
            values = UNET_PRESETS[name]
            return {b: values.get(self.regions[b], 0.0) for b in self.full.blocks}
        usable = [p for p in PRESETS if (p in UNIFORM_PRESETS and (p != "FLUXALL" or self.family == "flux"))
                  or (p in UNET_PRESETS and self.regions)]
        raise InvalidParameter(f"block-weight preset {name} does not apply to {self.label}; its presets: "
                               f"{', '.join(usable)}", parameter="block_weights")


BLOCK_TABLES: dict[str, BlockTable] = {
    "sd": BlockTable("sd", "SD 1.x/2.x", ("sd1", "sd2"), (SD_LORA, SD_FULL), _SD_REGIONS),
    "sdxl": BlockTable("sdxl", "SDXL", ("sdxl",), (SDXL_LORA, SDXL_FULL), _SDXL_REGIONS),
    "flux": BlockTable("flux", "Flux.1", ("flux",), (FLUX_LIST,)),
}
VECTOR_LENGTHS = sorted(len(lst.blocks) for t in BLOCK_TABLES.values() for lst in t.lists)


def _table_of(architecture: str) -> BlockTable | None:
    return next((t for t in BLOCK_TABLES.values() if architecture in t.architectures), None)


# -------------------------------------------------------------------------------------------- rules

_SEGMENT_NUMBER = re.compile(r"(?:(?<=\.)|^)(\d+)(?:-(\d+))?(?=\.|$)")


def block_rule(filter_text: str, value: float) -> Rule:
    """A :class:`~loramerge.merge.schedule.Rule` from a block filter (see the module docstring); ``*`` matches all.

    Example:
        >>> rule = block_rule("double_blocks.0-9", 0.5)
        >>> rule.matches("double_blocks.3.img_attn.qkv"), rule.matches("double_blocks.13.img_attn.qkv")
        (True, False)
        >>> block_rule("transformer_blocks", 0.0).matches("transformer.single_transformer_blocks.0.proj_out")
        False
    """
    def numbers(found: re.Match[str]) -> str:
        low, high = int(found[1]), int(found[2] if found[2] is not None else found[1])
        if high < low:
            raise InvalidParameter(f"block rule {filter_text!r}: the range {found[0]} is empty", parameter="block_weights")
        return "(?:" + "|".join(str(i) for i in range(low, high + 1)) + ")(?![0-9])"

    if filter_text == "*":
        return Rule(None, float(value))
    if not filter_text:
        raise InvalidParameter("a block rule needs a filter before '=', e.g. double_blocks.0-9=0.5",
                               parameter="block_weights")
    body = _SEGMENT_NUMBER.sub(numbers, filter_text)
    try:
        pattern = re.compile(r"(?:^|(?<=\.))(?:" + body + ")")
    except re.error as exc:
        raise InvalidParameter(f"block rule {filter_text!r} is not a valid regular expression ({exc})",
                               parameter="block_weights") from None
    return Rule(pattern, float(value))


# ------------------------------------------------------------------------------------ specifications


@dataclass(frozen=True)
class BlockWeights:
    """One source's block weighting: a preset or a vector, and rules (which come first).

    Build it with :meth:`parse` from the command-line spellings, or directly. ``filters`` are the
    rules' filters as written (for reports and recipes).

    Example:
        >>> bw = BlockWeights.parse(["OUTALL", "BASE=0"])
        >>> bw.preset, bw.filters, bw.to_plain()
        ('OUTALL', ('BASE',), ['OUTALL', {'filter': 'BASE', 'value': 0.0}])
    """

    preset: str | None = None
    vector: tuple[float, ...] | None = None
    rules: tuple[Rule, ...] = ()
    filters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.preset is not None and self.vector is not None:
            raise InvalidParameter("give one block-weight preset or vector, not both", parameter="block_weights")
        if self.preset is not None and self.preset not in PRESETS:
            raise InvalidParameter(f"unknown block-weight preset {self.preset!r}; presets: {', '.join(PRESETS)} "
                                   "(or a vector of block weights, or rules such as double_blocks.0-9=0.5)",
                                   parameter="block_weights")
        if self.vector is not None and len(self.vector) not in VECTOR_LENGTHS:
            raise InvalidParameter(
                f"a block-weight vector has {_lengths_text()} entries, got {len(self.vector)}",
                parameter="block_weights")

    @classmethod
    def parse(cls, spellings: str | Sequence[str]) -> BlockWeights:
        """Combine spellings: a preset name, a comma-separated vector, or comma-separated ``FILTER=VALUE`` rules."""
        preset: str | None = None
        vector: tuple[float, ...] | None = None
        rules: list[Rule] = []
        filters: list[str] = []
        for text in [spellings] if isinstance(spellings, str) else spellings:
            text = text.strip()
            if "=" in text:
                for part in re.split(r",(?=[^,]*=)", text):
                    target, _, value = part.rpartition("=")
                    rules.append(block_rule(target.strip(), _number(value, part)))
                    filters.append(target.strip())
                continue
            if preset is not None or vector is not None:
                raise InvalidParameter(f"give one block-weight preset or vector per source, not also {text!r}",
                                       parameter="block_weights")
            if text.upper() in PRESETS:
                preset = text.upper()
            elif re.fullmatch(r"[-+0-9.eE,\s]+", text) and "," in text:
                vector = tuple(_number(v, text) for v in text.split(","))
            elif re.fullmatch(r"[-+0-9.eE]+", text):
                raise InvalidParameter(f"--block-weights {text}: one number is a source weight (--weights); block "
                                       "weights are a preset, a vector or rules", parameter="block_weights")
            else:
                preset = text  # refused with the list of presets
        return cls(preset, vector, tuple(rules), tuple(filters))

    @property
    def is_empty(self) -> bool:
        return self.preset is None and self.vector is None and not self.rules

    def to_plain(self) -> Any:
        """The recipe form: a preset name, a list of numbers, a list of ``{filter, value}`` rules, or a
        list that starts with the preset (or the vector, as text) followed by rules."""
        rules = [{"filter": f, "value": r.value} for f, r in zip(self.filters, self.rules)]
        head: list[Any] = []
        if self.preset is not None:
            head = [self.preset]
        elif self.vector is not None:
            if not rules:
                return list(self.vector)
            head = [",".join(f"{v:g}" for v in self.vector)]
        if not rules:
            return head[0] if head else []
        return head + rules

    def describe(self) -> str:
        """The command-line spelling, e.g. ``OUTALL; BASE=0``."""
        parts = [self.preset] if self.preset else [",".join(f"{v:g}" for v in self.vector)] if self.vector else []
        return "; ".join(parts + [f"{f}={r.value:g}" for f, r in zip(self.filters, self.rules)])


@dataclass(frozen=True)
class BlockWeighting:
    """Block weights for a merge's sources: ``shared`` for every source, ``sources`` per source (0-based).

    A source's own weighting replaces the shared one.

    Example:
        >>> bw = BlockWeighting.parse(["OUTALL", "2:INS"], sources=2)
        >>> bw.for_source(0).preset, bw.for_source(1).preset
        ('OUTALL', 'INS')
    """

    shared: BlockWeights | None = None
    sources: Mapping[int, BlockWeights] = field(default_factory=dict)

    @classmethod
    def parse(cls, values: BlockWeighting | str | Sequence[str] | None, *, sources: int | None = None) -> BlockWeighting:
        """``[N:]SPEC`` spellings (``N`` a 1-based source number) as ``--block-weights`` takes them."""
        if isinstance(values, BlockWeighting):
            weighting = values
        else:
            shared: list[str] = []
            own: dict[int, list[str]] = {}
            for text in [values] if isinstance(values, str) else values or []:
                found = re.match(r"\s*(\d+)\s*:(.*)$", text)
                if found is None:
                    shared.append(text)
                    continue
                number = int(found[1])
                if number < 1:
                    raise InvalidParameter(f"--block-weights {text!r}: sources are numbered from 1",
                                           parameter="block_weights")
                own.setdefault(number - 1, []).append(found[2])
            weighting = cls(BlockWeights.parse(shared) if shared else None,
                            {i: BlockWeights.parse(v) for i, v in own.items()})
        if sources is not None and weighting.sources and max(weighting.sources) >= sources:
            count = "only 1 source" if sources == 1 else f"{sources} sources"
            raise InvalidParameter(f"--block-weights names source {max(weighting.sources) + 1}, but there are {count}",
                                   parameter="block_weights")
        return weighting

    @property
    def is_empty(self) -> bool:
        return self.shared is None and not self.sources

    def for_source(self, index: int) -> BlockWeights | None:
        return self.sources.get(index, self.shared)


# -------------------------------------------------------------------------------------------- apply


def weigh_blocks(adapters: Sequence[Adapter], weighting: BlockWeighting | str | Sequence[str] | None) -> list[Adapter]:
    """``adapters`` with every module's update scaled by its block weight (each source its own weighting).

    A weighted adapter records its weighting in ``config["block_weights"]`` (the recipe form), so
    merge reports, fold records and saved recipes can say how it was weighted. Refused: a vector
    whose length fits no block list of the source's family, a preset or vector for a family
    without a block table, a vector that leaves a module's block out, and a rule that matches no
    module (of its source, or of any source for a shared rule).
    """
    weighting = BlockWeighting.parse(weighting, sources=len(adapters))
    if weighting.is_empty:
        return list(adapters)
    out = []
    shared_hits: set[int] = set()
    shared_used = False
    for i, adapter in enumerate(adapters):
        spec = weighting.for_source(i)
        if spec is None or spec.is_empty:
            out.append(adapter)
            continue
        where = adapter.source or f"source {i + 1}"
        weights, hits = module_block_weights(adapter, spec, where)
        if spec is weighting.shared:
            shared_hits |= hits
            shared_used = True
        else:
            _check_rules_matched(spec, hits, f"source {i + 1} ({where})")
        layers = {m: replace(lr, scale=lr.scale * weights[m]) if weights[m] != 1.0 else lr
                  for m, lr in adapter.layers.items()}
        out.append(adapter.with_layers(layers, config=_weighted_config(adapter, layers, weights, spec)))
    if weighting.shared is not None and shared_used:
        _check_rules_matched(weighting.shared, shared_hits, "any source")
    return out


def _weighted_config(adapter: Adapter, layers: Mapping[str, LowRank], weights: Mapping[str, float],
                     spec: BlockWeights) -> dict[str, Any]:
    """The weighted adapter's config: its weighting recorded, and LyCORIS modules still kept in their own
    factors (one factor scaled), so a LyCORIS writer stores a weighted LoHa or LoKr unexpanded."""
    config = {**adapter.config, "block_weights": spec.to_plain()}
    records = kept(adapter)
    if records:
        scaled = {m: scaled_native(r, weights[m], layers[m]) for m, r in records.items() if weights[m] != 1.0}
        config[NATIVE_KEY] = {**config[NATIVE_KEY], **{m: r for m, r in scaled.items() if r is not None}}
    return config


def module_block_weights(adapter: Adapter, spec: BlockWeights, where: str) -> tuple[dict[str, float], set[int]]:
    """Each module's block weight under ``spec``, and which rules (by index) matched some module."""
    by_block: dict[str, float] = {}
    listed: BlockList | None = None
    if spec.preset is not None or spec.vector is not None:
        table, arch = _resolve_table(adapter, spec, where)
        if spec.preset is not None:
            by_block = table.preset(spec.preset)
        else:
            listed = next(lst for lst in table.lists if len(lst.blocks) == len(spec.vector or ()))
            by_block = dict(zip(listed.blocks, spec.vector or ()))
    else:
        table, arch = _recorded_table(adapter)
    weights: dict[str, float] = {}
    hits: set[int] = set()
    outside: list[str] = []
    for module in adapter.modules:
        module_table, module_arch = (table, arch) if table is not None else _known_table(module)
        block = module_table.block_of(module, module_arch) if module_table is not None and module_arch else None
        names = _names(module, block, module_table, module_arch)
        chosen = None
        for k, rule in enumerate(spec.rules):
            if any(rule.matches(n) for n in names):
                hits.add(k)
                if chosen is None:
                    chosen = float(rule.value)
        if chosen is None and by_block:
            if block is None:
                outside.append(module)
            elif block in by_block:
                chosen = by_block[block]
            else:
                assert listed is not None and table is not None
                raise InvalidParameter(
                    f"{where}: module {module} is in block {block}, which the {len(listed.blocks)}-entry "
                    f"{listed.label} vector leaves out; give the {len(table.full.blocks)}-entry {table.full.label} "
                    f"vector ({_list_text(table.full)})", path=where, module=module, parameter="block_weights")
        weights[module] = 1.0 if chosen is None else chosen
    if outside:
        shown = ", ".join(outside[:3]) + (" …" if len(outside) > 3 else "")
        warnings.warn(f"{where}: {len(outside)} module(s) lie outside every block ({shown}); they keep weight 1, "
                      "as in the LoRA Block Weight extension", LoramergeWarning, stacklevel=3)
    return weights, hits


def _names(module: str, block: str | None, table: BlockTable | None, arch: Architecture | None) -> list[str]:
    """Every name a rule's filter is searched in: the path, the original checkpoint path and the block."""
    names = [module]
    original = table.original_path(module, arch) if table is not None and arch is not None else None
    if original:
        names.append(original)
    if block is not None:
        names += [block, "MID"] if block == "M00" else [block]
    return names


def _recorded_table(adapter: Adapter) -> tuple[BlockTable | None, Architecture | None]:
    """The block table of the first architecture the reader recorded that has one."""
    for name in adapter.config.get("architectures") or []:
        table = _table_of(name) if name in ARCHITECTURES else None
        if table is not None:
            return table, ARCHITECTURES[name]
    return None, None


def _known_table(module: str) -> tuple[BlockTable | None, Architecture | None]:
    """The block table of the first architecture whose name table holds ``module`` (rules on unrecorded files)."""
    for name in ARCHITECTURES:
        arch = ARCHITECTURES[name]
        if module in arch.shapes:
            return _table_of(name), arch
    return None, None


def _resolve_table(adapter: Adapter, spec: BlockWeights, where: str) -> tuple[BlockTable, Architecture]:
    """The block table a preset or vector refers to, from the architectures the reader recorded (or the names)."""
    recorded = [a for a in adapter.config.get("architectures") or [] if a in ARCHITECTURES]
    if not recorded:
        recorded = identify({m: tuple(lr.delta_shape) for m, lr in adapter.layers.items()}) if adapter.layers else []
    tables = list({t.family: t for t in (_table_of(a) for a in recorded) if t is not None}.values())
    what = spec.preset or f"a {len(spec.vector or ())}-entry vector"
    if not tables:
        family = "/".join(adapter.config.get("architectures") or []) or "a model family loramerge has no block table for"
        raise UnsupportedAdapter(
            f"{where}: block weights as {what} need a block table (SD 1.x/2.x, SDXL, Flux.1), and this LoRA is "
            f"for {family}; name blocks with rules instead, e.g. --block-weights 'blocks.0-9=0.5'",
            path=where, parameter="block_weights")
    if spec.vector is not None:
        fitting = [t for t in tables if any(len(lst.blocks) == len(spec.vector) for lst in t.lists)]
        if not fitting:
            accepted = "; ".join(f"{lst.label} takes {len(lst.blocks)} ({_list_text(lst)})"
                                 for t in tables for lst in t.lists)
            raise InvalidParameter(f"{where}: a block-weight vector of {len(spec.vector)} entries fits no block list "
                                   f"of this LoRA: {accepted}", path=where, parameter="block_weights")
        tables = fitting
    elif len(tables) > 1:
        raise InvalidParameter(f"{where}: cannot tell which block table preset {spec.preset} refers to (the modules "
                               f"fit {' and '.join(t.label for t in tables)}); give a block vector instead",
                               path=where, parameter="block_weights")
    table = tables[0]
    return table, ARCHITECTURES[next(a for a in recorded if a in table.architectures)]


def _check_rules_matched(spec: BlockWeights, hits: set[int], scope: str) -> None:
    for k, (text, rule) in enumerate(zip(spec.filters, spec.rules)):
        if k not in hits:
            raise InvalidParameter(f"block rule {text}={rule.value:g} matches no module of {scope}; a filter is "
                                   "searched in module paths, original checkpoint paths (double_blocks.N, "
                                   "input_blocks.N) and block names (BASE, IN04, M00, D03)", parameter="block_weights")


def _number(text: str, context: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidParameter(f"--block-weights {context!r}: {text.strip()!r} is not a number",
                               parameter="block_weights") from None


def _list_text(listed: BlockList) -> str:
    return " ".join(listed.blocks) if len(listed.blocks) <= 26 else f"{' '.join(listed.blocks[:5])} … {listed.blocks[-1]}"


def _lengths_text() -> str:
    return ", ".join(f"{len(lst.blocks)} ({lst.label})" for t in BLOCK_TABLES.values() for lst in t.lists)
