"""The fold plan: which base tensor each adapter module changes, and how.

:func:`plan_fold` resolves every module of every adapter to a tensor of the base checkpoint
(through a :data:`~loramerge.io.names.Resolver`), decides the orientation of each update (GPT-2's
Conv1D and embeddings store the weight transposed), checks shapes, DoRA magnitudes, dtypes and
tied embeddings, and returns a :class:`FoldPlan`. Only headers are read; every refusal happens
here, before any output exists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from loramerge.core.adapter import Adapter, LowRank
from loramerge.errors import IncompatibleAdapters, InvalidParameter, UnsupportedAdapter
from loramerge.io.checkpoint import FLOAT_CODES, Checkpoint
from loramerge.io.experts import FusedSlice, parse_expert_name, resolve_expert
from loramerge.io.names import (
    Resolver,
    Target,
    as_targets,
    hf_resolver,
    nearest,
    stored_transposed,
    tied_embeddings,
)

TIED_MODES = ("refuse", "untie", "shared")
FLUX_INPUT_CHANNELS = 64  # Flux.1's latent channels × its 2×2 patches: what x_embedder (img_in) takes

UpdateKind = Literal["lora", "dora", "bias", "replace"]
Rows = tuple[int, int, int]  # (source, start, size): update rows → tensor rows
Placement = tuple[str, Rows | None, bool]  # (tensor, rows or None for the whole tensor, transposed)


@dataclass
class Update:
    """One contribution to one base tensor, in the order it is applied."""

    kind: UpdateKind
    source: str
    module: str
    weight: float = 1.0
    lowrank: LowRank | None = None
    transposed: bool = False
    tensor: torch.Tensor | None = None
    rows: Rows | None = None  # None: the whole tensor
    expert: int | None = None  # a fused 3-D expert tensor: the update is this expert's slice


@dataclass
class FoldPlan:
    """Every base tensor to change, with its updates in order; extra tensors an untie adds."""

    updates: dict[str, list[Update]]
    extra: dict[str, str]
    untie: bool
    module_count: int
    notes: list[str] = field(default_factory=list)
    widened: dict[str, tuple[int, ...]] = field(default_factory=dict)  # tensor → its wider output shape
    config: dict[str, Any] = field(default_factory=dict)  # what the output's config.json must say instead


@dataclass(frozen=True)
class _Base:
    """What placement consults: the checkpoint, its resolver, the names it may answer, and the tie."""

    ckpt: Checkpoint
    resolver: Resolver
    lookup: set[str]
    tie: tuple[str, str] | None

    def shape(self, tensor: str) -> tuple[int, ...]:
        """A tensor's shape; a tied ``lm_head`` the checkpoint does not store has its embedding's."""
        if tensor in self.ckpt.tensors:
            return self.ckpt.tensors[tensor].shape
        assert self.tie is not None
        return self.ckpt.tensors[self.tie[0]].shape


@dataclass(frozen=True)
class _Subject:
    """Who asks for a place, as the error messages name it: the adapter, the module and what it is."""

    label: str
    module: str
    what: str


def plan_fold(ckpt: Checkpoint, units: Sequence[tuple[Adapter, float]], *, resolver: Resolver = hf_resolver,
              tied_mode: str = "refuse") -> FoldPlan:
    """Resolve every adapter module to a base tensor and check shapes, orientation, dtypes and ties.

    Nothing is read but headers; every refusal happens here, before any output exists.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from loramerge.io.checkpoint import open_checkpoint
        >>> from loramerge.io.formats.tensorfile import write_safetensors
        >>> folder = Path(tempfile.mkdtemp())
        >>> write_safetensors({"model.fc.weight": torch.zeros(4, 3)}, folder / "model.safetensors")
        >>> ad = Adapter({"fc": LowRank(torch.ones(2, 3), torch.ones(4, 2))})
        >>> plan = plan_fold(open_checkpoint(folder), [(ad, 1.0)])
        >>> [(name, [u.kind for u in ups]) for name, ups in plan.updates.items()]
        [('model.fc.weight', ['lora'])]
    """
    names = set(ckpt.tensors)
    tie = tied_embeddings(ckpt.config, names)
    virtual = {tie[1]} if tie and tie[1] not in names else set()
    base = _Base(ckpt, resolver, names | virtual, tie)
    updates: dict[str, list[Update]] = {}
    widened: dict[str, tuple[int, ...]] = {}
    count = 0
    for adapter, weight in units:
        # Full weights first: PEFT loads them into the base layers before it merges the LoRA updates
        # (an adapter that targets lm_head saves the base lm_head weight itself).
        count += _plan_full_weights(base, adapter, weight, updates)
        count += _plan_layers(base, adapter, weight, updates, widened)
    _check_float(ckpt, updates, tie)
    plan = FoldPlan(updates, {}, False, count, widened=widened, config=_widened_config(ckpt, updates, widened))
    if tie is not None:
        _apply_tie(plan, tie, names, tied_mode, ckpt)
    return plan


def _plan_full_weights(base: _Base, adapter: Adapter, weight: float, updates: dict[str, list[Update]]) -> int:
    """Add the adapter's full weights (``modules_to_save``, trained biases) as replacements."""
    label = adapter.source or "adapter"
    for key, value in adapter.full_weights.items():
        _check_weight_for_full(weight, label, key, "a full replacement weight")
        subject = _Subject(label, key, "full weight (modules_to_save / bias)")
        for tensor, rows, _ in _place(base, key, tuple(value.shape), False, subject):
            owners = [u.source for u in updates.get(tensor, []) if u.kind == "replace" and u.rows == rows
                      and u.tensor is not None and not torch.equal(u.tensor, value)]
            if owners:
                raise IncompatibleAdapters(
                    f"{label} and {owners[0]} both replace {tensor} (modules_to_save); fold them one at a time"
                )
            updates.setdefault(tensor, []).append(Update("replace", label, key, weight, tensor=value, rows=rows))
    return len(adapter.full_weights)


def _plan_layers(base: _Base, adapter: Adapter, weight: float, updates: dict[str, list[Update]],
                 widened: dict[str, tuple[int, ...]]) -> int:
    """Add the adapter's LoRA and DoRA updates, and each ``lora_bias`` as a bias update; a Flux control
    LoRA's ``x_embedder`` update widens its tensor (recorded in ``widened``)."""
    label = adapter.source or "adapter"
    bias_base = _Base(base.ckpt, base.resolver, set(base.ckpt.tensors), None)
    for module, lr in adapter.layers.items():
        wider = _flux_input_widening(base, module, lr)
        if wider is not None:
            tensor, shape = wider
            widened[tensor] = shape
            updates.setdefault(tensor, []).append(Update("lora", label, module, weight, lr))
            continue
        kind: UpdateKind = "dora" if lr.magnitude is not None else "lora"
        if kind == "dora":
            _check_weight_for_full(weight, label, module, "a DoRA update")
        subject = _Subject(label, module, "module")
        fused = _place_expert(base, module, lr, label)
        if fused is not None:
            updates.setdefault(fused.name, []).append(Update("lora", label, module, weight, lr, fused.transposed,
                                                             expert=fused.expert))
            continue
        for tensor, rows, transposed in _place(base, f"{module}.weight", lr, lr.kind == "linear", subject):
            if kind == "dora":
                _check_magnitude(lr, transposed, tensor, label, module)
            updates.setdefault(tensor, []).append(Update(kind, label, module, weight, lr, transposed, rows=rows))
        if lr.bias is not None:
            bias = lr.bias.float() * lr.scale
            subject = _Subject(label, module, "bias (lora_bias)")
            for tensor, rows, _ in _place(bias_base, f"{module}.bias", tuple(bias.shape), False, subject):
                updates.setdefault(tensor, []).append(Update("bias", label, module, weight, tensor=bias, rows=rows))
    return len(adapter.layers)


def _flux_input_widening(base: _Base, module: str, lr: LowRank) -> tuple[str, tuple[int, int]] | None:
    """The tensor and its new shape when ``module`` is Flux.1's input embedder (diffusers' ``x_embedder``, BFL's
    ``img_in``, 64 channels) and the LoRA's input is a multiple of it: a BFL control LoRA (Canny, Depth) takes
    the control latents beside the image latents. As diffusers' loader does, the base weight gets zero columns
    for the new inputs, ``[W, 0] + s·B·A``; every other shape mismatch stays an error."""
    if lr.kind != "linear" or lr.magnitude is not None or lr.bias is not None or len(lr.delta_shape) != 2:
        return None
    out, wide = lr.delta_shape
    flux1 = getattr(base.resolver, "family", None) == "flux" or \
        base.ckpt.config.get("_class_name") == "FluxTransformer2DModel"
    if not flux1 or wide <= FLUX_INPUT_CHANNELS or wide % FLUX_INPUT_CHANNELS:
        return None
    targets = as_targets(base.resolver(f"{module}.weight", base.lookup)) or []
    if len(targets) != 1 or targets[0] != Target(targets[0].name) or targets[0].name not in base.ckpt.tensors:
        return None
    name = targets[0].name
    if name.rsplit(".", 2)[-2] not in ("x_embedder", "img_in") or \
            tuple(base.shape(name)) != (out, FLUX_INPUT_CHANNELS):
        return None
    return name, (out, wide)


def _widened_config(ckpt: Checkpoint, updates: dict[str, list[Update]],
                    widened: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The config a widened Flux.1 transformer folder needs: diffusers' loader sets ``in_channels`` to the new
    input width; ``out_channels`` is written too, since the model takes a missing one from ``in_channels``.
    Nothing else may touch a widened tensor: another LoRA's update would be for the narrow layer."""
    for tensor, shape in widened.items():
        if len(updates[tensor]) > 1:
            sources = sorted({u.source for u in updates[tensor]})
            raise IncompatibleAdapters(
                f"{', '.join(sources)}: {tensor} is widened from {FLUX_INPUT_CHANNELS} to {shape[1]} inputs by a Flux "
                "control LoRA and changed by another update; fold the control LoRA on its own, then the others"
            )
    if not widened or ckpt.config.get("_class_name") != "FluxTransformer2DModel":
        return {}
    (wide,) = {shape[1] for shape in widened.values()}
    return {"in_channels": wide, "out_channels": ckpt.config.get("out_channels") or ckpt.config.get("in_channels")}


def _check_float(ckpt: Checkpoint, updates: dict[str, list[Update]], tie: tuple[str, str] | None) -> None:
    for tensor in updates:
        info = ckpt.tensors.get(tensor) or ckpt.tensors[tie[0]]  # type: ignore[index]
        if info.dtype not in FLOAT_CODES:
            raise UnsupportedAdapter(
                f"{ckpt.folder}: tensor {tensor} is stored as {info.dtype}; folding into quantized or integer "
                "weights is not supported (dequantize the base model first)"
            )


def _place_expert(base: _Base, module: str, lr: LowRank, label: str) -> FusedSlice | None:
    """The slice of a fused 3-D expert tensor an expert update (``….experts.down_proj[3]``) goes to, if the base
    stores that parameter fused; per-expert modules on disk are placed by :func:`_place` as row slices."""
    if parse_expert_name(module) is None:
        return None
    if lr.magnitude is not None or lr.bias is not None or lr.kind != "linear":
        raise UnsupportedAdapter(f"{label}: expert update {module} must be a plain linear LoRA")
    found = resolve_expert(module, base.lookup, base.shape, base.resolver, base.ckpt.config.get("model_type"),
                           lr.matrix_shape)
    return found if isinstance(found, FusedSlice) else None


def _place(base: _Base, path: str, update: LowRank | tuple[int, ...], may_transpose: bool,
           subject: _Subject) -> list[Placement]:
    """Where ``update`` (a LoRA, or a tensor of the given shape) goes: ``(tensor, rows, transposed)`` per target.

    ``rows`` is ``(source, start, size)`` for a row slice (q/k/v inside a fused weight), None for
    the whole tensor. A plain tensor name from the resolver is checked against the shape, with the
    orientation decided as for Hugging Face checkpoints; :class:`~loramerge.io.names.Target` answers
    say it themselves. The slices must cover every row of the update.
    """
    module = path.removesuffix(".weight")
    if parse_expert_name(module) is not None and isinstance(update, LowRank):
        found = resolve_expert(module, base.lookup, base.shape, base.resolver, base.ckpt.config.get("model_type"),
                               update.matrix_shape) or None  # per-expert modules on disk: row slices
    else:
        found = base.resolver(path, base.lookup)
    targets = _found_targets(base, path, found, subject)
    lowrank = update if isinstance(update, LowRank) else None
    shape_of_update = tuple(lowrank.delta_shape) if lowrank is not None else tuple(update)  # type: ignore[arg-type]
    if isinstance(found, str):
        shape = base.shape(found)
        if lowrank is None:
            _check_shape(shape, shape_of_update, subject.label, subject.module, found)
            return [(found, None, False)]
        return [(found, None, _orientation(found, shape, lowrank, base.ckpt.config, subject.label, subject.module))]
    return _place_slices(base, targets, lowrank, shape_of_update, may_transpose, subject)


def _found_targets(base: _Base, path: str, found: Any, subject: _Subject) -> list[Target]:
    """The resolver's answer as targets, or the error that names the nearest tensors."""
    targets = as_targets(found)
    missing = [t.name for t in targets or [] if t.name not in base.lookup]
    if targets is not None and not missing:
        return targets
    suggest = getattr(base.resolver, "nearest", None)
    close = (suggest(path) if suggest is not None and not missing else []) or \
        nearest(missing[0] if missing else path, base.lookup)
    hint = f"; nearest: {', '.join(close)}" if close else ""
    raise IncompatibleAdapters(f"{subject.label}: {subject.what} {subject.module} not found in the base model "
                               f"(no tensor {missing[0] if missing else path}){hint}")


def _place_slices(base: _Base, targets: list[Target], lowrank: LowRank | None, shape_of_update: tuple[int, ...],
                  may_transpose: bool, subject: _Subject) -> list[Placement]:
    """Placements for :class:`~loramerge.io.names.Target` answers, which must cover every row of the update."""
    out = shape_of_update[0] if shape_of_update else 1
    kind = f"a {lowrank.kind} update" if lowrank is not None else "a tensor"
    placed: list[Placement] = []
    places = []
    covered = 0
    for target in targets:
        shape = base.shape(target.name)
        source, start, size = target.rows(out)
        whole = target.start == 0 and target.source == 0 and target.size is None
        flip = target.transposed != (lowrank is not None and lowrank.transposed_in_base)
        where = "" if whole else f" (rows {start}:{start + size} for this module)"
        if not _fits(target, shape, lowrank, shape_of_update, may_transpose, flip):
            raise IncompatibleAdapters(f"{subject.label}: {subject.what} {subject.module} has {kind} of shape "
                                       f"{shape_of_update} but base tensor {target.name} has shape {tuple(shape)}{where}"
                                       f"{_widening_hint(shape, shape_of_update)}")
        rows = None if flip or (source == 0 and start == 0 and size == out == shape[0]) else (source, start, size)
        placed.append((target.name, rows, flip))
        places.append(f"{target.name} of shape {tuple(shape)}{where}")
        covered += size
    if covered != out:
        raise IncompatibleAdapters(f"{subject.label}: {subject.what} {subject.module} has {kind} of shape "
                                   f"{shape_of_update} but its place in the base model holds {covered} of its {out} "
                                   f"rows: {'; '.join(places)}")
    return placed


def _fits(target: Target, shape: tuple[int, ...], lowrank: LowRank | None, shape_of_update: tuple[int, ...],
          may_transpose: bool, flip: bool) -> bool:
    """Whether the update's rows fit the target's rows (or, flipped, the whole transposed tensor)."""
    out = shape_of_update[0] if shape_of_update else 1
    source, start, size = target.rows(out)
    whole = target.start == 0 and target.source == 0 and target.size is None
    if flip:
        return (may_transpose or (lowrank is not None and lowrank.transposed_in_base)) and whole and \
            len(shape) == 2 and lowrank is not None and tuple(shape) == lowrank.matrix_shape[::-1]
    return (source >= 0 and start >= 0 and size > 0 and source + size <= out and len(shape) >= 1
            and start + size <= shape[0] and (not whole or out == shape[0])
            and _same_trailing(tuple(shape[1:]), shape_of_update[1:]))


def _orientation(tensor: str, shape: tuple[int, ...], lr: LowRank, config: dict[str, Any], label: str,
                 module: str) -> bool:
    if lr.kind == "linear" and len(shape) == 2:
        flipped = stored_transposed(tensor, shape, lr.matrix_shape, config, lr.fan_in_fan_out)
        if flipped is not None:
            return flipped
    elif tuple(shape) == tuple(lr.base_shape):
        return lr.transposed_in_base
    elif _flattened_conv(shape, lr.delta_shape):
        return False
    raise IncompatibleAdapters(
        f"{label}: module {module} has a {lr.kind} update of shape {tuple(lr.base_shape)} but base tensor "
        f"{tensor} has shape {tuple(shape)}{_widening_hint(shape, tuple(lr.base_shape))}"
    )


def _same_trailing(base: tuple[int, ...], update: tuple[int, ...]) -> bool:
    # A Linear update fits a 1×1 convolution and the other way round; other kernels must match.
    def core(dims: tuple[int, ...]) -> tuple[int, ...]:
        while len(dims) > 1 and dims[-1] == 1:
            dims = dims[:-1]
        return dims

    return base == update or core(base) == core(update) or _flattened_conv((1, *base), (1, *update))


def _flattened_conv(base: tuple[int, ...], update: tuple[int, ...]) -> bool:
    """A conv update stored as a matrix ``(out, in·kh·kw)`` (LyCORIS LoHa/LoKr) for a conv weight of that size.

    The base weight gives the kernel, so the update folds exactly (ComfyUI reshapes the same way).
    """
    return len(update) == 2 and len(base) > 2 and base[0] == update[0] and math.prod(base[1:]) == update[1]


def dora_axis(lr: LowRank) -> Literal["out", "in"] | None:
    """Which axis a DoRA magnitude normalises, as the adapter declares it (:attr:`LowRank.magnitude_axis`):
    ``out`` (PEFT: ``(out,)``, or ``(1, out, 1, 1)`` for a conv) or ``in`` (LyCORIS ``wd_on_output=False``:
    ``(1, in[, 1, 1])``); None when the magnitude's size does not fit that axis.

    Example:
        >>> lr = LowRank(torch.ones(1, 3), torch.ones(4, 1), magnitude=torch.ones(1, 3), magnitude_axis="in")
        >>> dora_axis(lr), dora_axis(LowRank(torch.ones(1, 3), torch.ones(4, 1), magnitude=torch.ones(4)))
        ('in', 'out')
    """
    magnitude = lr.magnitude
    if magnitude is None:
        return None
    if lr.magnitude_axis == "in":
        inputs = lr.delta_shape[1] if len(lr.delta_shape) > 1 else 0
        return "in" if magnitude.numel() == inputs else None
    return "out" if magnitude.numel() == lr.delta_shape[0] else None


def _check_magnitude(lr: LowRank, transposed: bool, tensor: str, label: str, module: str) -> None:
    axis = dora_axis(lr)
    if axis == "out" or (axis == "in" and not transposed):
        return
    assert lr.magnitude is not None
    raise IncompatibleAdapters(
        f"{label}: module {module} has a DoRA magnitude of shape {tuple(lr.magnitude.shape)}, which fits neither the "
        f"output nor the input channels of its {tuple(lr.delta_shape)} update to {tensor}"
    )


def _widening_hint(base: Sequence[int], update: tuple[int, ...]) -> str:
    """What to do with an update that widens a layer's input (a Flux control LoRA's ``x_embedder``)."""
    if len(base) != 2 or len(update) != 2 or update[0] != base[0] or update[1] <= base[1]:
        return ""
    return (f"; the LoRA widens the layer's input from {base[1]} to {update[1]}: fold widens only Flux.1's "
            f"x_embedder ({FLUX_INPUT_CHANNELS} channels) for a Flux control LoRA such as Canny or Depth; write it "
            "with `loramerge convert --to diffusers` and load it with diffusers' FluxControlPipeline")


def _check_shape(base: tuple[int, ...], got: tuple[int, ...], label: str, key: str, tensor: str) -> None:
    if tuple(base) != tuple(got):
        raise IncompatibleAdapters(f"{label}: {key} has shape {tuple(got)} but base tensor {tensor} has shape {tuple(base)}")


def _check_weight_for_full(weight: float, label: str, module: str, what: str) -> None:
    if weight < 0:
        raise InvalidParameter(
            f"{label}: module {module} is {what}, which is not additive and cannot be subtracted (weight {weight})"
        )


def _apply_tie(plan: FoldPlan, tie: tuple[str, str], names: set[str], mode: str, ckpt: Checkpoint) -> None:
    source, head = tie
    touched = [n for n in (source, head) if n in plan.updates]
    if not touched:
        return
    modules = sorted({u.module for n in touched for u in plan.updates[n]})
    if mode == "refuse":
        raise UnsupportedAdapter(
            f"{ckpt.folder}: {source} and {head} are tied (tie_word_embeddings) and the adapter changes "
            f"{', '.join(modules)}; pass --tied-embeddings untie to write both (the adapted model exactly, with "
            "tie_word_embeddings false) or --tied-embeddings shared to fold into the shared matrix as PEFT does"
        )
    if mode == "shared":
        combined = plan.updates.pop(source, []) + plan.updates.pop(head, [])
        for update in combined:
            if update.kind == "lora" and update.lowrank is not None and update.lowrank.kind == "linear":
                update.transposed = False  # lm_head is (vocab, dim), the embedding's own layout
        plan.updates[source] = combined
        if head in names:
            plan.updates[head] = list(combined)
        plan.notes.append(f"folded {', '.join(modules)} into the shared {source} (tie kept)")
        return
    plan.untie = True
    if head not in names:
        plan.extra[head] = source
        plan.updates.setdefault(head, [])
    plan.notes.append(f"untied {source} and {head}: the output stores both and sets tie_word_embeddings false")
