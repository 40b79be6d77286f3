"""Where each adapter module goes in a resident model: the same name resolution and orientation as ``fold``.

:func:`place_adapter` resolves every module of an adapter to a parameter of the model with the
resolver ``fold`` uses (:func:`~loramerge.io.names.hf_resolver` by default) and decides the
orientation with fold's own rule (shape first; GPT-2 Conv1D names for square weights), so what the
runtime applies in memory and what ``fold`` writes cannot disagree. A module that resolves to
nothing is an error naming the adapter, the module and the nearest parameter names.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loramerge.core.adapter import Adapter, ModuleKind
from loramerge.errors import IncompatibleAdapters, UnsupportedAdapter
from loramerge.fold.plan import _orientation as fold_orientation
from loramerge.io.names import Resolver, as_targets, hf_resolver, nearest

# The module classes each kind of update may sit on, by class name (transformers' GPT-2 Conv1D
# is a linear layer that stores its weight transposed).
_CLASSES: dict[str, tuple[str, ...]] = {
    "linear": ("Linear", "Conv1D", "NonDynamicallyQuantizableLinear", "LazyLinear"),
    "embedding": ("Embedding",),
    "conv": ("Conv1d", "Conv2d", "Conv3d"),
}


@dataclass(frozen=True)
class Placement:
    """One adapter module resolved onto the model.

    ``target`` is the model's module path and ``parameter`` its weight's name; ``transposed``
    says the weight stores the update as ``(in, out)`` (GPT-2 Conv1D, embeddings); ``tied`` that
    the weight is shared with another module (a tied ``lm_head``), so it must never be patched.
    """

    module: str
    target: str
    parameter: str
    kind: ModuleKind
    transposed: bool
    shape: tuple[int, ...]
    tied: bool = False


def module_kind(module: nn.Module) -> ModuleKind | None:
    """The update kind a module of this class takes, or None for a class the runtime does not adapt.

    Example:
        >>> module_kind(nn.Linear(2, 3)), module_kind(nn.Embedding(4, 2)), module_kind(nn.ReLU())
        ('linear', 'embedding', None)
    """
    name = type(module).__name__
    for kind, classes in _CLASSES.items():
        if name in classes:
            return kind  # type: ignore[return-value]
    return None


def shared_parameters(model: nn.Module) -> set[str]:
    """Names of parameters whose tensor is also registered under another name (tied weights).

    Example:
        >>> net = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
        >>> net[1].weight = net[0].weight
        >>> sorted(shared_parameters(net))
        ['0.weight', '1.weight']
    """
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    return {name for names in owners.values() if len(names) > 1 for name in names}


def place_adapter(adapter: Adapter, model: nn.Module, *, config: Mapping[str, Any] | None = None,
                  resolver: Resolver = hf_resolver, parameters: Collection[str] | None = None,
                  modules: Mapping[str, nn.Module] | None = None, tied: Collection[str] = (),
                  label: str | None = None) -> dict[str, Placement]:
    """Resolve every LoRA module of ``adapter`` onto ``model``; an unmatched module is an error.

    ``parameters`` are the model's parameter names (by default all of them, tied copies
    included), ``modules`` its modules by name, and ``config`` its configuration dict
    (orientation of square GPT-2 weights).

    Example:
        >>> from loramerge.core.adapter import LowRank
        >>> net = nn.Sequential()
        >>> net.add_module("fc", nn.Linear(3, 4))
        >>> ad = Adapter({"fc": LowRank(torch.ones(2, 3), torch.ones(4, 2))})
        >>> place_adapter(ad, net)["fc"].parameter
        'fc.weight'
    """
    label = label or adapter.source or "adapter"
    names = set(parameters) if parameters is not None else {n for n, _ in model.named_parameters(remove_duplicate=False)}
    if modules is None:
        modules = dict(model.named_modules(remove_duplicate=False))
    config = dict(config or {})
    placed = {}
    for module, lowrank in adapter.layers.items():
        if lowrank.magnitude is not None:
            raise UnsupportedAdapter(f"{label}: module {module} is DoRA, which the runtime does not apply in memory; "
                                     "fold it into the base model and check the fold with `loramerge verify --folded`")
        parameter = resolve_parameter(f"{module}.weight", names, resolver, label, module)
        target = parameter.removesuffix(".weight")
        base_module = modules.get(target)
        if base_module is None:
            raise IncompatibleAdapters(f"{label}: module {module} resolves to {parameter}, which is not a module's weight")
        kind = module_kind(base_module)
        if kind != lowrank.kind:
            raise IncompatibleAdapters(
                f"{label}: module {module} holds a {lowrank.kind} update but {target} is a "
                f"{type(base_module).__name__}"
            )
        shape = tuple(base_module.weight.shape)
        transposed = fold_orientation(parameter, shape, lowrank, config, label, module)
        placed[module] = Placement(module, target, parameter, kind, transposed, shape, parameter in tied)
        if lowrank.bias is not None:
            bias = getattr(base_module, "bias", None)
            if bias is None or tuple(bias.shape) != (lowrank.out_features,):
                raise IncompatibleAdapters(f"{label}: module {module} has a lora_B bias but {target} has no bias "
                                           f"of {lowrank.out_features} entries")
    return placed


def resolve_parameter(path: str, names: Collection[str], resolver: Resolver, label: str, module: str) -> str:
    """The parameter name ``resolver`` gives for ``path``; a miss (or a row slice) is an error."""
    targets = as_targets(resolver(path, names))
    if targets is None or targets[0].name not in names:
        close = nearest(path, names)
        hint = f"; nearest: {', '.join(close)}" if close else ""
        raise IncompatibleAdapters(f"{label}: module {module} not found in the base model (no parameter {path}){hint}")
    if len(targets) > 1 or targets[0].size is not None or targets[0].start or targets[0].transposed:
        raise UnsupportedAdapter(f"{label}: module {module} maps onto part of a fused tensor ({targets[0].name}); "
                                 "the runtime applies whole-weight updates only")
    return targets[0].name


def check_full_weight(key: str, value: torch.Tensor, parameters: Mapping[str, torch.Tensor], resolver: Resolver,
                      label: str) -> str:
    """The parameter a full replacement weight (``modules_to_save``) overwrites, shape checked."""
    parameter = resolve_parameter(key, parameters, resolver, label, key)
    if tuple(parameters[parameter].shape) != tuple(value.shape):
        raise IncompatibleAdapters(f"{label}: full weight {key} has shape {tuple(value.shape)} but {parameter} has "
                                   f"shape {tuple(parameters[parameter].shape)}")
    return parameter
