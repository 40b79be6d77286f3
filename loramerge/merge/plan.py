"""Aligning sources before a merge: the union of their modules, shape and base-model checks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from loramerge.core.adapter import Adapter, LowRank
from loramerge.errors import IncompatibleAdapters, UnsupportedAdapter


@dataclass(frozen=True)
class MergePlan:
    """The modules to produce, in first-seen order, and each source's update for each (None if absent)."""

    modules: list[str]
    terms: dict[str, list[LowRank | None]]
    base_model: str | None
    task_type: str | None
    architectures: list[str] | None = None


def plan_merge(adapters: Sequence[Adapter], *, ignore_base_mismatch: bool = False) -> MergePlan:
    """Check that ``adapters`` can be merged and align their modules.

    Example:
        >>> import torch
        >>> a = Adapter({"x": LowRank(torch.ones(1, 2), torch.ones(3, 1))})
        >>> b = Adapter({"y": LowRank(torch.ones(1, 2), torch.ones(3, 1))})
        >>> plan_merge([a, b]).terms["y"][0] is None
        True
    """
    for adapter in adapters:
        _refuse_unmergeable(adapter)
    base_model = _common_value(adapters, "base_model", ignore_base_mismatch)
    task_types = {a.task_type for a in adapters if a.task_type}
    task_type = next((a.task_type for a in adapters if a.task_type), None)
    if len(task_types) > 1 and not ignore_base_mismatch:
        raise IncompatibleAdapters(
            f"sources were trained for different task types ({', '.join(sorted(task_types))}); "
            "pass --ignore-base-mismatch to merge them anyway"
        )
    architectures = _common_architectures(adapters, ignore_base_mismatch)
    modules = list(dict.fromkeys(m for adapter in adapters for m in adapter.modules))
    terms: dict[str, list[LowRank | None]] = {}
    for module in modules:
        row = [a.layers.get(module) for a in adapters]
        _check_shapes(module, row, adapters)
        terms[module] = row
    return MergePlan(modules=modules, terms=terms, base_model=base_model, task_type=task_type,
                     architectures=architectures)


def _refuse_unmergeable(adapter: Adapter) -> None:
    where = adapter.source or "adapter"
    for name, lr in adapter.layers.items():
        if lr.magnitude is not None:
            raise UnsupportedAdapter(
                f"{where}: module {name} is DoRA; its magnitude vector is not additive, so it cannot be merged "
                "(fold it into the base model instead)", path=adapter.source, module=name,
            )
        if lr.bias is not None:
            raise UnsupportedAdapter(
                f"{where}: module {name} has a lora_B bias (lora_bias=True), which a LoRA merge cannot carry",
                path=adapter.source, module=name,
            )
    if adapter.full_weights:
        names = sorted(adapter.full_weights)
        shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
        raise UnsupportedAdapter(
            f"{where}: holds full replacement weights ({shown}; modules_to_save, trained biases or a Flux control "
            "LoRA's norm scales) that cannot "
            "be weighted in a merge", path=adapter.source,
        )


def _common_architectures(adapters: Sequence[Adapter], ignore_mismatch: bool) -> list[str] | None:
    """The model architectures (``sd1``, ``sdxl``, ``flux`` …) every source fits, from what readers recorded.

    A source that recorded none (a PEFT adapter of a language model, say) must still fit the
    others' architecture by its module names, or the merge is refused: the union of an SD 1.x
    LoRA and a Llama LoRA is no model's adapter.
    """
    from loramerge.io.formats.sd_names import ARCHITECTURES, identify

    common: list[str] | None = None
    seen: list[tuple[str, list[str]]] = []
    for a in adapters:
        found = a.config.get("architectures")
        if not found:
            continue
        seen.append((a.source or "adapter", list(found)))
        common = list(found) if common is None else [x for x in common if x in found]
    if common == [] and not ignore_mismatch:
        listed = "; ".join(f"{src}: {'/'.join(archs)}" for src, archs in seen)
        raise IncompatibleAdapters(
            f"sources are LoRAs for different model architectures ({listed}); pass --ignore-base-mismatch "
            "(ignore_base_mismatch=True) to merge them anyway"
        )
    if common and not ignore_mismatch:
        for a in adapters:
            if a.config.get("architectures"):
                continue
            fits = identify({m: tuple(lr.delta_shape) for m, lr in a.layers.items()})
            if not set(fits) & set(common):
                label = "/".join(ARCHITECTURES[x].label if x in ARCHITECTURES else x for x in common)
                example = next(iter(a.layers), "")
                raise IncompatibleAdapters(
                    f"{a.source or 'adapter'} is not a LoRA for {label} like {seen[0][0]} (its module {example} is "
                    "not part of that model); adapters for different architectures cannot be merged; pass "
                    "--ignore-base-mismatch (ignore_base_mismatch=True) to merge them anyway"
                )
    return common or None


def _common_value(adapters: Sequence[Adapter], attribute: str, ignore_mismatch: bool) -> str | None:
    values = {}
    for a in adapters:
        value = getattr(a, attribute)
        if value:
            values.setdefault(str(value).rstrip("/"), a.source or "adapter")
    if len(values) > 1 and not ignore_mismatch:
        listed = "; ".join(f"{src}: {val}" for val, src in values.items())
        raise IncompatibleAdapters(
            f"sources were trained on different base models ({listed}); pass --ignore-base-mismatch "
            "(ignore_base_mismatch=True) to merge them anyway"
        )
    return next(iter(values), None)


def _check_shapes(module: str, row: list[LowRank | None], adapters: Sequence[Adapter]) -> None:
    first: tuple[int, LowRank] | None = None
    for i, lr in enumerate(row):
        if lr is None:
            continue
        if first is None:
            first = (i, lr)
            continue
        j, ref = first
        if (lr.kind, lr.delta_shape, lr.transposed_in_base) != (ref.kind, ref.delta_shape, ref.transposed_in_base):
            raise IncompatibleAdapters(
                f"module {module}: {adapters[j].source or f'source {j + 1}'} has a {ref.kind} update of shape "
                f"{tuple(ref.base_shape)} but {adapters[i].source or f'source {i + 1}'} has a {lr.kind} update "
                f"of shape {tuple(lr.base_shape)}", path=adapters[i].source, module=module,
            )
