"""A base model kept resident, with adapters swapped in memory: :class:`Runtime`.

Two ways to apply an adapter, both exact to float rounding:

- ``patch`` (the default): W ← W₀ + Σ wᵢ·sᵢ·Bᵢ Aᵢ, computed in float32 from a copy of W₀ and
  written over the weight; :meth:`Runtime.restore` copies W₀ back. A swap costs one pass over
  the adapted weights, and the forward pass costs what the plain model costs.
- ``hooks``: a forward hook adds x·Aᵀ·Bᵀ·s to each adapted module's output (in float32, like
  PEFT's unmerged ``PeftModel``); nothing is written, so a swap is free, but every forward pass
  pays for the extra products.

``benchmarks/eval.py`` measures both; patching is the default because an evaluation runs many
forward passes per swap (see the README for the figures). A weight shared by two modules (a tied
``lm_head``) is always hooked, so the other module keeps its own weight, as in PEFT.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from loramerge.core.adapter import Adapter, LowRank
from loramerge.errors import InvalidParameter, NonFiniteValues, UnsupportedModel
from loramerge.io.names import Resolver, hf_resolver
from loramerge.io.sources import load
from loramerge.runtime.data import Task
from loramerge.runtime.encoding import context_length, encode_task
from loramerge.runtime.loading import ModelKind, load_model, load_tokenizer, model_kind
from loramerge.runtime.placement import (
    Placement,
    check_full_weight,
    module_kind,
    place_adapter,
    shared_parameters,
)
from loramerge.runtime.scoring import ScoreFunction, TaskScore, forward_logits, score_sequences, task_score

Mode = Literal["patch", "hooks"]
MODES: tuple[str, ...] = ("patch", "hooks")
AdapterLike = Adapter | str | Path


@dataclass
class _Term:
    """One module's factors from one adapter, ``weight·scale`` already folded into ``B``."""

    B: torch.Tensor  # (out, r)
    A: torch.Tensor  # (r, in·k)


class Runtime:
    """A model held in memory, to which adapters are applied and removed without reloading it.

    ``model`` is any torch module (a transformers model from :meth:`load`, or your own);
    adapter module paths are resolved on it with ``resolver`` (fold's
    :func:`~loramerge.io.names.hf_resolver` by default). ``mode`` is ``patch`` or ``hooks``
    (see the module docstring).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential()
        >>> net.add_module("fc", nn.Linear(3, 2, bias=False))
        >>> ad = Adapter({"fc": LowRank(torch.ones(1, 3), torch.ones(2, 1), scale=0.5)})
        >>> rt = Runtime(net)
        >>> before = net.fc.weight.clone()
        >>> with rt.applied(ad):
        ...     bool(torch.allclose(net.fc.weight, before + 0.5))
        True
        >>> bool(torch.equal(net.fc.weight, before))
        True
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, mode: Mode = "patch",
                 resolver: Resolver = hf_resolver, config: dict[str, Any] | None = None,
                 kind: ModelKind | None = None, folder: Path | None = None) -> None:
        if mode not in MODES:
            raise InvalidParameter(f"unknown runtime mode {mode!r}; use one of {', '.join(MODES)}")
        self.model = model.eval().requires_grad_(False)
        self.mode: Mode = mode
        self.resolver = resolver
        hf_config = getattr(model, "config", None)
        self.config: dict[str, Any] = dict(config) if config is not None else (
            hf_config.to_dict() if hasattr(hf_config, "to_dict") else {})
        if kind is None and hf_config is not None and getattr(hf_config, "model_type", None):
            kind = model_kind(hf_config, type(model).__name__)
        self.kind: ModelKind | None = kind
        self.folder = folder
        self._tokenizer = tokenizer
        self._parameters = dict(model.named_parameters(remove_duplicate=False))
        self._modules = dict(model.named_modules(remove_duplicate=False))
        self._tied = shared_parameters(model)
        self._originals: dict[str, torch.Tensor] = {}
        self._patched: set[str] = set()
        self._hooks: list[RemovableHandle] = []
        self._applied: list[tuple[Adapter, float]] = []

    # ------------------------------------------------------------------------------ construction

    @classmethod
    def load(cls, base: str | Path, *, device: str | torch.device = "auto", dtype: str | torch.dtype | None = None,
             mode: Mode = "patch", allow_pickle: bool = False, resolver: Resolver = hf_resolver) -> Runtime:
        """Load the transformers model at ``base`` once (see :func:`~loramerge.runtime.loading.load_model`).

        The tokenizer is loaded on first use of :attr:`tokenizer`.
        """
        loaded = load_model(base, device=device, dtype=dtype, allow_pickle=allow_pickle)
        return cls(loaded.model, mode=mode, resolver=resolver, config=loaded.config, kind=loaded.kind,
                   folder=loaded.folder)

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, loaded from its folder on first use."""
        if self._tokenizer is None:
            if self.folder is None:
                raise UnsupportedModel("this runtime was built from a module without a tokenizer; pass tokenizer=")
            self._tokenizer = load_tokenizer(self.folder)
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        first = next(iter(self._parameters.values()), None)
        return first.device if first is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's floating-point weights (the first one found)."""
        for p in self._parameters.values():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    @property
    def compute_dtype(self) -> torch.dtype:
        """float32, or float64 for a float64 model: the precision of every update's maths."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    @property
    def applied_adapters(self) -> list[tuple[Adapter, float]]:
        """The ``(adapter, weight)`` pairs applied now (empty: the base model)."""
        return list(self._applied)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    # ------------------------------------------------------------------------------ placement

    def placements(self, adapter: Adapter) -> dict[str, Placement]:
        """Where each module of ``adapter`` goes in this model; an unmatched module is an error."""
        return place_adapter(adapter, self.model, config=self.config, resolver=self.resolver,
                             parameters=self._parameters, modules=self._modules, tied=self._tied)

    def adaptable_modules(self, kinds: Sequence[str] = ("linear", "conv", "embedding")) -> dict[str, str]:
        """``{module path: kind}`` of every module of ``kinds`` in the model (what a LoRA could target)."""
        out = {}
        for name, module in self._modules.items():
            kind = module_kind(module)
            if kind in kinds and name:
                out[name] = kind
        return out

    # ------------------------------------------------------------------------------ swapping

    def apply(self, adapters: AdapterLike | Sequence[AdapterLike], weights: Sequence[float] | None = None, *,
              modules: Sequence[str] | None = None, mode: Mode | None = None) -> None:
        """Apply the weighted sum of ``adapters`` in place of whatever is applied now.

        ``weights`` (default 1 each) scale each adapter. ``modules`` limits the update to those
        module paths (of the adapters); ``mode`` overrides the runtime's mode for this call.
        Every module is resolved (and every refusal raised) before the model is touched.
        """
        units = _units(adapters, weights)
        use = mode or self.mode
        if use not in MODES:
            raise InvalidParameter(f"unknown runtime mode {use!r}; use one of {', '.join(MODES)}")
        wanted = set(modules) if modules is not None else None
        grouped: dict[str, tuple[Placement, LowRank, list[_Term]]] = {}
        replacements: dict[str, list[tuple[torch.Tensor, float]]] = {}
        biases: dict[str, list[torch.Tensor]] = {}
        for adapter, weight in units:
            placed = self.placements(adapter)
            label = adapter.source or "adapter"
            for module, lowrank in adapter.layers.items():
                if wanted is not None and module not in wanted:
                    continue
                placement = placed[module]
                terms = grouped.setdefault(placement.target, (placement, lowrank, []))[2]
                if weight != 0.0:
                    terms.append(self._term(lowrank, weight))
                if lowrank.bias is not None and weight != 0.0:
                    biases.setdefault(f"{placement.target}.bias", []).append(lowrank.bias * (lowrank.scale * weight))
            for key, value in adapter.full_weights.items():
                if wanted is None or key.rsplit(".", 1)[0] in wanted:
                    parameter = check_full_weight(key, value, self._parameters, self.resolver, label)
                    replacements.setdefault(parameter, []).append((value, weight))
        overwritten = {p.parameter for p, _, terms in grouped.values() if terms and use == "patch" and not p.tied}
        # A weight patched again is rewritten from its saved original, so it need not be copied back first:
        # a swap between adapters of the same modules is one pass over their weights.
        self._restore(keep=overwritten | set(replacements) | set(biases))
        try:
            # Full weights first, as PEFT loads them before it adds the LoRA updates: they become W₀.
            bases = {parameter: self._replaced(parameter, values) for parameter, values in replacements.items()}
            for placement, template, terms in grouped.values():
                if not terms:
                    continue
                if use == "hooks" or placement.tied:
                    self._hook(placement, template, terms)
                else:
                    self._patch(placement, terms, bases.pop(placement.parameter, None))
            for parameter, value in bases.items():
                self._write(parameter, value)
            for parameter, vectors in biases.items():
                self._add_bias(parameter, vectors)
        except BaseException:
            self.restore()
            raise
        self._applied = list(units)

    def restore(self) -> None:
        """Put the base model back: original weights copied in, hooks removed."""
        self._restore()

    def _restore(self, keep: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        with torch.no_grad():
            for name in self._patched - keep:
                self._parameters[name].copy_(self._originals[name])
        self._patched &= keep
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._applied = []

    @contextmanager
    def applied(self, adapters: AdapterLike | Sequence[AdapterLike], weights: Sequence[float] | None = None, *,
                modules: Sequence[str] | None = None, mode: Mode | None = None) -> Iterator[Runtime]:
        """:meth:`apply` for the duration of a ``with`` block, then :meth:`restore`."""
        self.apply(adapters, weights, modules=modules, mode=mode)
        try:
            yield self
        finally:
            self.restore()

    def set_parameter(self, name: str, value: torch.Tensor) -> None:
        """Overwrite one parameter (cast to its dtype) until the next :meth:`restore` or :meth:`apply`."""
        if name not in self._parameters:
            raise InvalidParameter(f"the model has no parameter {name}")
        if tuple(value.shape) != tuple(self._parameters[name].shape):
            raise InvalidParameter(f"parameter {name} has shape {tuple(self._parameters[name].shape)}, "
                                   f"got {tuple(value.shape)}")
        self._write(name, value.to(self.device))

    def parameter(self, name: str) -> torch.Tensor:
        """The parameter ``name`` as it is now (a tied weight answers under either name)."""
        return self._parameters[name]

    @property
    def parameter_names(self) -> list[str]:
        return list(self._parameters)

    def release_backup(self) -> None:
        """Drop the saved original weights (memory: one copy of every weight ever patched); restores first."""
        self.restore()
        self._originals.clear()

    # ------------------------------------------------------------------------------ running

    def context_length(self) -> int | None:
        """The longest sequence the model takes (from its config), or None."""
        return context_length(self.config)

    def evaluate(self, tasks: Sequence[Task], *, batch_size: int = 8, score: ScoreFunction | None = None,
                 progress: bool = False, label: str | None = None) -> dict[str, TaskScore]:
        """Score the model as it is now (base, or with what :meth:`apply` put on it) on every task.

        With ``score``, each task's value is ``score(model, rows)`` (rows as the JSON objects);
        otherwise the built-in metrics of :class:`~loramerge.runtime.scoring.TaskScore`.
        """
        if batch_size < 1:
            raise InvalidParameter(f"batch size must be at least 1, got {batch_size}")
        out: dict[str, TaskScore] = {}
        for task in tasks:
            if score is not None:
                value = float(score(self.model, [dict(row.data) for row in task.rows]))
                out[task.name] = TaskScore(task.name, "custom", len(task.rows), value=value)
                continue
            if self.kind not in (None, "causal"):
                raise UnsupportedModel(f"{self.folder}: built-in evaluation scores causal language models; this is "
                                       f"a {self.kind} model (pass score= to use your own metric)")
            encoded = encode_task(task, self.tokenizer, self.context_length())
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            desc = f"{label}: {task.name}" if label else task.name
            scores = score_sequences(self.model, encoded, batch_size=batch_size, pad_id=pad, device=self.device,
                                     desc=desc, progress=progress, kind=self.kind)
            out[task.name] = task_score(task, encoded, scores)
        return out

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The model's logits for ``input_ids`` (moved to the model's device), as they come out of it."""
        ids = input_ids.to(self.device)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(self.device)
        with torch.inference_mode():
            return forward_logits(self.model, ids, mask, self.kind)

    # ------------------------------------------------------------------------------ internals

    def _term(self, lowrank: LowRank, weight: float) -> _Term:
        B, A = lowrank.matrices(self.compute_dtype, self.device)
        return _Term(B * (lowrank.scale * weight), A)

    def _original(self, parameter: str) -> torch.Tensor:
        saved = self._originals.get(parameter)
        if saved is None:
            saved = self._originals[parameter] = self._parameters[parameter].detach().clone()
        return saved

    def _patch(self, placement: Placement, terms: list[_Term], base: torch.Tensor | None = None) -> None:
        B = torch.cat([t.B for t in terms], dim=1) if len(terms) > 1 else terms[0].B
        A = torch.cat([t.A for t in terms], dim=0) if len(terms) > 1 else terms[0].A
        param = self._parameters[placement.parameter]
        original = self._original(placement.parameter) if base is None else base
        rows = param.shape[0]
        if placement.transposed:
            left, right = A.T, B.T
        else:
            left, right = B, A
        with torch.no_grad():
            if param.dtype == left.dtype and param.is_contiguous():
                torch.addmm(original.view(rows, -1), left, right, out=param.view(rows, -1))
            else:  # add in float32, round once to the stored dtype (as fold does)
                summed = torch.addmm(original.view(rows, -1).to(left.dtype), left, right)
                param.copy_(summed.view(param.shape))
            # Finite factors and weights give a finite sum unless float16 overflows; only then is a scan needed.
            if param.dtype == torch.float16 and not bool(torch.isfinite(param).all()):
                param.copy_(original)
                raise NonFiniteValues(f"module {placement.module}: applying the update produced NaN/Inf values")
        self._patched.add(placement.parameter)

    def _replaced(self, parameter: str, values: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
        """The weight after full replacements (``modules_to_save``): moved weight w of the way to each value."""
        current = self._original(parameter).to(self.compute_dtype)
        for value, weight in values:
            target = value.to(device=current.device, dtype=self.compute_dtype)
            current = target if weight == 1.0 else current + weight * (target - current)
        return current

    def _write(self, parameter: str, value: torch.Tensor) -> None:
        self._original(parameter)
        with torch.no_grad():
            self._parameters[parameter].copy_(value)
        self._patched.add(parameter)

    def _add_bias(self, parameter: str, vectors: list[torch.Tensor]) -> None:
        param = self._parameters[parameter]
        original = self._original(parameter)
        with torch.no_grad():
            total = original.to(self.compute_dtype) + sum(v.to(param.device, self.compute_dtype) for v in vectors)
            param.copy_(total)
        self._patched.add(parameter)

    def _hook(self, placement: Placement, template: LowRank, terms: list[_Term]) -> None:
        B = torch.cat([t.B for t in terms], dim=1)
        A = torch.cat([t.A for t in terms], dim=0)
        module = self._modules[placement.target]
        if placement.kind == "linear":
            branch = _linear_branch(A, B)
        elif placement.kind == "embedding":
            branch = _embedding_branch(A, B)
        else:
            branch = _conv_branch(module, A.reshape(A.shape[0], *template.A.shape[1:]),
                                  B.reshape(B.shape[0], B.shape[1], *template.B.shape[2:]))

        def hook(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            return output + branch(args[0]).to(output.dtype)

        self._hooks.append(module.register_forward_hook(hook))


def _linear_branch(A: torch.Tensor, B: torch.Tensor):
    return lambda x: F.linear(F.linear(x.to(A.dtype), A), B)


def _embedding_branch(A: torch.Tensor, B: torch.Tensor):
    table = A.T.contiguous()  # (num_embeddings, r)
    return lambda ids: F.embedding(ids, table) @ B.T


def _conv_branch(module: nn.Module, A: torch.Tensor, B: torch.Tensor):
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[A.ndim]
    stride, padding, dilation = module.stride, module.padding, module.dilation  # type: ignore[attr-defined]
    return lambda x: conv(conv(x.to(A.dtype), A, None, stride, padding, dilation), B)


def _units(adapters: AdapterLike | Sequence[AdapterLike], weights: Sequence[float] | None) -> list[tuple[Adapter, float]]:
    listed = [adapters] if isinstance(adapters, (Adapter, str, Path)) else list(adapters)
    loaded = [a if isinstance(a, Adapter) else load(a) for a in listed]
    if weights is None:
        values = [1.0] * len(loaded)
    else:
        values = [float(w) for w in weights]
        if len(values) != len(loaded):
            raise InvalidParameter(f"got {len(values)} weight(s) for {len(loaded)} adapter(s); give one weight per adapter")
    return list(zip(loaded, values))
