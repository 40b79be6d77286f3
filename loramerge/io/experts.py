"""Mixture-of-experts LoRAs: fused 3-D expert parameters, their per-expert names and the per-expert module layouts.

transformers 5 stores the experts of a MoE layer as 3-D parameters, ``experts.gate_up_proj`` and
``experts.down_proj`` of shape ``(experts, out, in)`` (gpt-oss and a few others store
``(experts, in, out)``: "transposed"). PEFT trains LoRA on them with ``target_parameters``. loramerge
reads such an adapter as one :class:`~loramerge.core.adapter.LowRank` per expert, named
``<module>.<parameter>[<expert>]`` (``model.layers.0.mlp.experts.gate_up_proj[3]``), so every merge
method works per expert and the fold adds each expert's update to its slice of the parameter.

Checkpoints of Mixtral, Qwen2/3-MoE, DeepSeek and others keep one module per expert on disk
(transformers fuses them when it loads); :data:`EXPERT_LAYOUTS` maps a fused parameter's rows to
those modules, so a fused-expert LoRA folds into such a checkpoint and converts to per-expert
modules (and back) exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch

from loramerge.core.adapter import Adapter, LowRank
from loramerge.errors import IncompatibleAdapters, UnsupportedAdapter
from loramerge.io.names import Target

# PEFT nests one ParamWrapper per targeted parameter of a module, in the order the module registers
# its parameters (innermost first). transformers' expert modules all register these in this order.
PARAM_ORDER = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")
# model types whose expert parameters are stored (experts, in, out) (``is_transposed`` in transformers)
TRANSPOSED_EXPERT_MODELS = frozenset({"gpt_oss", "openai_privacy_filter", "ergo"})
_EXPERT = re.compile(r"^(?P<module>.+)\.(?P<param>[A-Za-z_][A-Za-z0-9_]*)\[(?P<expert>\d+)\]$")


def expert_name(module: str, param: str, expert: int) -> str:
    """The canonical name of one expert's slice of a fused parameter.

    Example:
        >>> expert_name("model.layers.0.mlp.experts", "down_proj", 2)
        'model.layers.0.mlp.experts.down_proj[2]'
    """
    return f"{module}.{param}[{expert}]"


def parse_expert_name(name: str) -> tuple[str, str, int] | None:
    """``(module, parameter, expert)`` of an expert slice name, or None for an ordinary module.

    Example:
        >>> parse_expert_name("model.layers.0.mlp.experts.gate_up_proj[3]")
        ('model.layers.0.mlp.experts', 'gate_up_proj', 3)
        >>> parse_expert_name("model.layers.0.mlp.experts.3.gate_proj") is None
        True
    """
    found = _EXPERT.match(name)
    if found is None:
        return None
    return found["module"], found["param"], int(found["expert"])


def nesting_order(module: str, params: list[str], origin: object) -> list[str]:
    """The targeted parameters of one module from PEFT's innermost wrapper outwards."""
    if len(params) == 1:
        return params
    unknown = [p for p in params if p not in PARAM_ORDER]
    if unknown:
        raise UnsupportedAdapter(
            f"{origin}: module {module} has LoRA on several parameters ({', '.join(sorted(params))}) and the order "
            f"PEFT nested them in is known only for {', '.join(PARAM_ORDER)}"
        )
    return sorted(params, key=PARAM_ORDER.index)


def split_fused(A: torch.Tensor, B: torch.Tensor, experts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-expert ``(A_e, B_e)`` of a PEFT ParamWrapper's ``lora_A (r·E, in)`` and ``lora_B (out, r·E)``.

    PEFT stacks the experts' A rows expert by expert and interleaves B's columns rank by rank
    (column ``j·E + e`` is expert ``e``'s ``j``-th).

    Example:
        >>> A, B = torch.arange(8.0).reshape(4, 2), torch.arange(12.0).reshape(3, 4)
        >>> [(a.tolist(), b[:, 0].tolist()) for a, b in split_fused(A, B, 2)][1]
        ([[4.0, 5.0], [6.0, 7.0]], [1.0, 5.0, 9.0])
    """
    rank = A.shape[0] // experts
    return [(A[e * rank:(e + 1) * rank].contiguous(), B[:, e::experts].contiguous()) for e in range(experts)]


def join_fused(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`split_fused`: ``(lora_A, lora_B)`` of equal-rank per-expert factors."""
    experts = len(parts)
    A = torch.cat([a for a, _ in parts], dim=0)
    rank = parts[0][0].shape[0]
    B = torch.empty(parts[0][1].shape[0], rank * experts, dtype=parts[0][1].dtype)
    for e, (_, b) in enumerate(parts):
        B[:, e::experts] = b
    return A, B


@dataclass(frozen=True)
class ExpertLayout:
    """How a family of checkpoints names one module per expert.

    ``module`` turns the fused module path (``….mlp.experts``) into the per-expert prefix for expert
    ``{e}``; ``parts`` lists, per fused parameter, the per-expert modules whose weights are stacked
    along the output rows, in order.
    """

    name: str
    module: tuple[str, str]  # (pattern, replacement) applied to the fused module path; "{e}" is the expert
    parts: Mapping[str, tuple[str, ...]]

    def expert_prefix(self, module: str, expert: int) -> str:
        pattern, replacement = self.module
        return re.sub(pattern, replacement.replace("{e}", str(expert)), module)


EXPERT_LAYOUTS: dict[str, ExpertLayout] = {
    # Qwen2/3-MoE, DeepSeek-V2/V3, OLMoE, GLM-4.5 MoE ... (transformers' "qwen2_moe" conversion)
    "qwen2_moe": ExpertLayout("qwen2_moe", (r"\.experts$", r".experts.{e}"),
                              {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}),
    # Mixtral and MiniMax: block_sparse_moe.experts.N.w1 (gate), w3 (up), w2 (down)
    "mixtral": ExpertLayout("mixtral", (r"\.mlp\.experts$", r".block_sparse_moe.experts.{e}"),
                            {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}),
}


def split_rows(lowrank: LowRank, sizes: list[int]) -> list[LowRank]:
    """``lowrank`` cut along its output rows into consecutive pieces of ``sizes`` (exact: B's rows, same A)."""
    pieces, start = [], 0
    for size in sizes:
        pieces.append(LowRank(A=lowrank.A, B=lowrank.B[start:start + size].contiguous(), scale=lowrank.scale))
        start += size
    return pieces


def stack_rows(pieces: list[LowRank]) -> LowRank:
    """One update whose output rows are ``pieces`` in order: block-diagonal B over the stacked A (exact)."""
    baked = [p.baked() for p in pieces]
    A = torch.cat([p.A for p in baked], dim=0)
    B = torch.zeros(sum(p.out_features for p in baked), A.shape[0], dtype=baked[0].B.dtype)
    row = col = 0
    for p in baked:
        B[row:row + p.out_features, col:col + p.rank] = p.B
        row, col = row + p.out_features, col + p.rank
    return LowRank(A=A, B=B)


def to_per_expert(adapter: Adapter, layout: str) -> Adapter:
    """The adapter with every fused expert slice replaced by the per-expert modules of ``layout`` (exact).

    Example:
        >>> lr = LowRank(torch.ones(1, 3), torch.arange(4.0).reshape(4, 1))
        >>> out = to_per_expert(Adapter({"m.mlp.experts.gate_up_proj[1]": lr}), "mixtral")
        >>> {k: v.B.flatten().tolist() for k, v in out.items()}
        {'m.block_sparse_moe.experts.1.w1': [0.0, 1.0], 'm.block_sparse_moe.experts.1.w3': [2.0, 3.0]}
    """
    chosen = _layout(layout)
    layers: dict[str, LowRank] = {}
    for name, lowrank in adapter.items():
        parsed = parse_expert_name(name)
        if parsed is None:
            layers[name] = lowrank
            continue
        module, param, expert = parsed
        parts = chosen.parts.get(param)
        if parts is None or lowrank.out_features % len(parts):
            raise UnsupportedAdapter(f"{adapter.source or 'adapter'}: {name} has no per-expert modules in the "
                                     f"{chosen.name} layout (known parameters: {', '.join(chosen.parts)})")
        prefix = chosen.expert_prefix(module, expert)
        size = lowrank.out_features // len(parts)
        for part, piece in zip(parts, split_rows(lowrank, [size] * len(parts))):
            layers[f"{prefix}.{part}"] = piece
    return adapter.with_layers(layers)


def to_fused(adapter: Adapter, layout: str) -> Adapter:
    """The inverse of :func:`to_per_expert`: per-expert modules of ``layout`` become fused expert slices.

    Gate and up projections of one expert become one update of rank ``r_gate + r_up`` (exact).

    Example:
        >>> w1 = LowRank(torch.ones(1, 3), torch.ones(2, 1))
        >>> w3 = LowRank(2 * torch.ones(1, 3), torch.ones(2, 1))
        >>> out = to_fused(Adapter({"m.block_sparse_moe.experts.0.w1": w1, "m.block_sparse_moe.experts.0.w3": w3}), "mixtral")
        >>> list(out), out["m.mlp.experts.gate_up_proj[0]"].rank
        (['m.mlp.experts.gate_up_proj[0]'], 2)
    """
    chosen = _layout(layout)
    pattern, replacement = chosen.module
    per_part = {part: (param, index) for param, parts in chosen.parts.items() for index, part in enumerate(parts)}
    prefix_re = re.compile("^(?P<prefix>.+)" + re.escape(replacement.split("{e}")[0]) + r"(?P<e>\d+)\.(?P<part>\w+)$")
    groups: dict[str, dict[int, LowRank]] = {}
    layers: dict[str, LowRank] = {}
    for name, lowrank in adapter.items():
        found = prefix_re.match(name)
        if found is None or found["part"] not in per_part:
            layers[name] = lowrank
            continue
        param, index = per_part[found["part"]]
        fused_module = found["prefix"] + pattern.replace("\\", "").rstrip("$")
        groups.setdefault(expert_name(fused_module, param, int(found["e"])), {})[index] = lowrank
    for name, pieces in groups.items():
        _, param, _ = parse_expert_name(name)  # type: ignore[misc]
        needed = len(chosen.parts[param])
        if len(pieces) != needed:
            missing = [chosen.parts[param][i] for i in range(needed) if i not in pieces]
            raise IncompatibleAdapters(f"{adapter.source or 'adapter'}: {name} needs {', '.join(missing)} too, to be "
                                       "fused (give every projection of the expert, or convert without --experts)")
        layers[name] = pieces[0] if needed == 1 else stack_rows([pieces[i] for i in range(needed)])
    return adapter.with_layers(layers)


def _layout(name: str) -> ExpertLayout:
    try:
        return EXPERT_LAYOUTS[name]
    except KeyError:
        raise UnsupportedAdapter(f"unknown expert layout {name!r}; known: {', '.join(EXPERT_LAYOUTS)}") from None


@dataclass(frozen=True)
class FusedSlice:
    """An expert's update lands in slice ``expert`` of the 3-D tensor ``name`` (stored ``(in, out)`` if ``transposed``)."""

    name: str
    expert: int
    transposed: bool


def resolve_expert(module: str, names: Collection[str], shape_of: Callable[[str], tuple[int, ...]],
                   resolver: Callable[[str, Collection[str]], object], model_type: str | None,
                   out_in: tuple[int, int]) -> FusedSlice | list[Target] | None:
    """Where the expert slice ``module`` (``….experts.gate_up_proj[3]``) of shape ``out_in`` goes in a checkpoint.

    A 3-D tensor of that parameter's name (gpt-oss, or a checkpoint saved fused) gets the update in
    its expert's slice, transposed when the model stores experts ``(in, out)``; otherwise each
    :data:`EXPERT_LAYOUTS` layout is tried for per-expert modules, the fused rows split among them.
    Raises :class:`~loramerge.errors.IncompatibleAdapters` when a place is found but shapes disagree.

    Example:
        >>> shapes = {"m.experts.gate_up_proj": (4, 6, 3)}
        >>> resolve_expert("m.experts.gate_up_proj[1]", shapes, shapes.get, lambda p, n: p if p in n else None,
        ...                None, (6, 3))
        FusedSlice(name='m.experts.gate_up_proj', expert=1, transposed=False)
    """
    parsed = parse_expert_name(module)
    if parsed is None:
        return None
    base, param, expert = parsed
    fused = resolver(f"{base}.{param}", names)
    if isinstance(fused, str):
        shape = tuple(shape_of(fused))
        out, inputs = out_in
        fits = {"plain": shape[1:] == (out, inputs), "transposed": shape[1:] == (inputs, out)}
        if len(shape) != 3 or expert >= shape[0] or not any(fits.values()):
            raise IncompatibleAdapters(f"{module}: an expert update of shape {out_in} does not fit expert {expert} of "
                                       f"{fused} of shape {shape}")
        transposed = fits["transposed"] and (not fits["plain"] or model_type in TRANSPOSED_EXPERT_MODELS)
        return FusedSlice(fused, expert, transposed)
    for layout in EXPERT_LAYOUTS.values():
        parts = layout.parts.get(param)
        if not parts:
            continue
        prefix = layout.expert_prefix(base, expert)
        found = [resolver(f"{prefix}.{part}.weight", names) for part in parts]
        if not all(isinstance(f, str) for f in found):
            continue
        targets, source = [], 0
        for name in found:
            rows = shape_of(name)[0]  # type: ignore[arg-type]
            targets.append(Target(name, start=0, size=rows, source=source))  # type: ignore[arg-type]
            source += rows
        return targets
    return []
