"""The canonical adapter types: :class:`LowRank` (one module) and :class:`Adapter` (all modules).

Every reader turns its format into these types and every writer starts from them, so nothing
between the two knows which format a module came from.

Orientation. ``A`` and ``B`` keep PEFT's shapes: ``B @ A`` is the update in ``(out, in)``
orientation, and a conv update is ``(out, in, *kernel)``. The base weight may be stored
differently: transposed for GPT-2's ``Conv1D`` (``fan_in_fan_out``) and for embeddings.
:meth:`LowRank.product` gives the update in ``(out, in)`` orientation and
:meth:`LowRank.base_delta` gives it in the base weight's own layout, ready to be added.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from loramerge.core.devices import move
from loramerge.errors import UnsupportedAdapter

if TYPE_CHECKING:
    from loramerge.core.report import MergeReport

ModuleKind = Literal["linear", "conv", "embedding"]

# ``Adapter.save`` and ``Adapter.push_to_hub`` are conveniences whose work lives in the layers above
# the core (formats in ``loramerge.io``, publishing in ``loramerge.hub``). Those layers install
# their function here when they are imported, which importing any part of the package does, so the
# core type never imports them.
_OUTPUT_HOOKS: dict[str, Callable[..., Any]] = {}


def install_output_hook(name: Literal["save", "push_to_hub"], function: Callable[..., Any]) -> None:
    """Make ``Adapter.<name>`` call ``function(adapter, ...)``; used by ``loramerge.io`` and ``loramerge.hub``."""
    _OUTPUT_HOOKS[name] = function


def _output_hook(name: str) -> Callable[..., Any]:
    try:
        return _OUTPUT_HOOKS[name]
    except KeyError:
        raise RuntimeError(f"Adapter.{name} is installed by the loramerge package; import loramerge first") from None

MODULE_KINDS: tuple[str, ...] = ("linear", "conv", "embedding")


@dataclass(frozen=True, eq=False)
class LowRank:
    """One module's low-rank update ΔW = scale · B @ A.

    Shapes: ``A`` is ``(r, in)`` (conv: ``(r, in, *kernel)``; embedding: ``(r, num_embeddings)``)
    and ``B`` is ``(out, r)`` (conv: ``(out, r, 1, ...)``; embedding: ``(embedding_dim, r)``).

    ``magnitude_axis`` says which axis the DoRA norm runs along: ``out`` (one norm per output
    row, PEFT's and current LyCORIS's convention) or ``in`` (one per input channel, LyCORIS with
    ``wd_on_output=False``). It comes from the file's convention, never from the shape, which
    cannot tell the two apart on a square weight.

    ``magnitude`` holds a DoRA magnitude vector and ``bias`` a ``lora_B`` bias; both are kept so a
    fold can honour them, and a merge refuses them. ``alpha`` is the source's alpha, for display.

    Example:
        >>> import torch
        >>> lr = LowRank(A=torch.ones(2, 3), B=torch.ones(4, 2), scale=0.5)
        >>> lr.rank, lr.delta_shape, float(lr.product()[0, 0])
        (2, (4, 3), 1.0)
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0
    kind: ModuleKind = "linear"
    fan_in_fan_out: bool = False
    alpha: float | None = None
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    magnitude_axis: Literal["out", "in"] = "out"

    def __post_init__(self) -> None:
        if self.A.ndim < 2 or self.B.ndim < 2:
            raise ValueError(f"LoRA factors must be at least 2-D, got A {tuple(self.A.shape)}, B {tuple(self.B.shape)}")
        if self.kind not in MODULE_KINDS:
            raise ValueError(f"unknown module kind {self.kind!r}; expected one of {MODULE_KINDS}")
        if self.B.shape[1] != self.A.shape[0]:
            raise UnsupportedAdapter(
                f"lora_B has {self.B.shape[1]} input channels but lora_A has rank {self.A.shape[0]}; "
                "grouped convolutions (groups > 1) cannot be merged"
            )
        if any(d != 1 for d in self.B.shape[2:]):
            raise ValueError(f"conv lora_B must have a 1x1 kernel, got {tuple(self.B.shape)}")
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be finite, got {self.scale}")

    @property
    def rank(self) -> int:
        """The number of rank-one terms, ``A.shape[0]``."""
        return int(self.A.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """Shape of ``B @ A`` in (out, in[, *kernel]) orientation."""
        return (self.out_features, *self.A.shape[1:])

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """Shape of the update flattened to a matrix: ``(out, in · prod(kernel))``."""
        return (self.out_features, int(math.prod(self.A.shape[1:])))

    @property
    def base_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this update is added to."""
        if self.transposed_in_base:
            return (int(self.A.shape[1]), self.out_features)
        return self.delta_shape

    @property
    def transposed_in_base(self) -> bool:
        """True when the base weight stores this update transposed (embeddings, GPT-2 Conv1D)."""
        return self.kind == "embedding" or (self.kind == "linear" and self.fan_in_fan_out)

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    def matrices(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors as matrices ``(B (out, r), A (r, in·k))``, scale not applied."""
        B = self.B.reshape(self.B.shape[0], self.B.shape[1]).to(device=device, dtype=dtype)
        A = self.A.reshape(self.A.shape[0], -1).to(device=device, dtype=dtype)
        return B, A

    def product(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """ΔW = scale · B @ A in (out, in[, *kernel]) orientation, computed in ``dtype``."""
        B, A = self.matrices(dtype, device)
        return (self.scale * (B @ A)).reshape(self.delta_shape)

    def base_delta(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """ΔW in the base weight's own layout: what a fold adds to the weight."""
        delta = self.product(dtype, device)
        return delta.T if self.transposed_in_base else delta

    def from_matrices(self, B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> LowRank:
        """A new update of the same module kind and layout from matrix factors ``B (out, k)``, ``A (k, in·kk)``.

        Source-only extras (alpha, DoRA magnitude, bias) are dropped: the result is a plain LoRA.
        """
        k = A.shape[0]
        A_shaped = A.reshape(k, *self.A.shape[1:])
        B_shaped = B.reshape(B.shape[0], k, *self.B.shape[2:])
        return replace(
            self, A=A_shaped.contiguous(), B=B_shaped.contiguous(), scale=float(scale),
            alpha=None, magnitude=None, bias=None,
        )

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LowRank:
        """The same update with its tensors cast and moved (the cast runs on the accelerator's side of a copy).

        Example:
            >>> lr = LowRank(torch.ones(2, 3), torch.ones(4, 2), magnitude=torch.ones(4)).to(torch.float64, "cpu")
            >>> lr.A.dtype, lr.magnitude.dtype
            (torch.float64, torch.float64)
        """
        def convert(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else move(tensor, device, dtype)

        return replace(self, A=convert(self.A), B=convert(self.B), magnitude=convert(self.magnitude),
                       bias=convert(self.bias))

    def baked(self) -> LowRank:
        """The same update with the scale folded into the factors (scale = 1).

        The factor √|scale| goes on each side, with the sign on B, so neither factor is tiny in fp16.
        """
        if self.scale == 1.0:
            return self
        root = math.sqrt(abs(self.scale))
        sign = 1.0 if self.scale >= 0 else -1.0
        bias = self.bias * self.scale if self.bias is not None else None  # the bias is scaled with B
        return replace(self, A=self.A * root, B=self.B * (sign * root), scale=1.0, alpha=None, bias=bias)


@dataclass
class Adapter(Mapping[str, LowRank]):
    """An ordered mapping from the base model's module path to its :class:`LowRank` update.

    Metadata: ``base_model`` (Hub id or path the adapter was trained on), ``task_type`` (PEFT's),
    ``source_format`` (``"peft"``, ``"kohya"``, ...), ``dtype`` (of the stored factors) and
    ``source`` (where it was read from). ``full_weights`` holds full replacement tensors such as
    PEFT's ``modules_to_save``; ``config`` is the source's own configuration, for reference.
    A merged adapter carries its per-module :class:`~loramerge.core.report.MergeReport` in ``report``.
    ``origin`` says where a loaded adapter came from, for model cards and recipes: ``path`` for a
    local source; ``repo_id``, ``revision``, ``commit`` and ``subpath`` for a Hub source; and the
    ``license`` its model card declares, if any.

    Example:
        >>> import torch
        >>> ad = Adapter({"layer.q": LowRank(torch.ones(1, 3), torch.ones(2, 1))})
        >>> ad.modules, ad.delta("layer.q").shape
        (['layer.q'], torch.Size([2, 3]))
    """

    layers: dict[str, LowRank] = field(default_factory=dict)
    base_model: str | None = None
    task_type: str | None = None
    source_format: str = "peft"
    dtype: torch.dtype | None = None
    source: str | None = None
    full_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    report: MergeReport | None = None
    origin: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = dict(self.layers)
        if self.dtype is None and self.layers:
            self.dtype = next(iter(self.layers.values())).dtype

    def __getitem__(self, module: str) -> LowRank:
        return self.layers[module]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def modules(self) -> list[str]:
        """The module paths, in order.

        Example:
            >>> import torch
            >>> Adapter({"a": LowRank(torch.ones(1, 2), torch.ones(2, 1))}).modules
            ['a']
        """
        return list(self.layers)

    @property
    def name(self) -> str:
        """A short display name: the source's last path component, or ``"merged"``."""
        if not self.source:
            return "merged"
        return Path(self.source.rstrip("/")).name or self.source

    def delta(self, module: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ΔW of ``module``, scale included, in the base weight's layout.

        Example:
            >>> import torch
            >>> ad = Adapter({"m": LowRank(torch.eye(2), 2 * torch.eye(2), scale=0.5)})
            >>> ad.delta("m").tolist()
            [[1.0, 0.0], [0.0, 1.0]]
        """
        return self.layers[module].base_delta(dtype)

    def parameter_count(self) -> int:
        """The number of stored factor entries over all modules."""
        return sum(lr.A.numel() + lr.B.numel() for lr in self.layers.values())

    def save(self, path: str | Path, *, format: str | None = None, dtype: torch.dtype | str | None = None,
             force: bool = False) -> Path:
        """Write the adapter to ``path`` atomically and return the path.

        ``format`` defaults to PEFT. ``dtype`` defaults to the adapter's dtype. An existing,
        non-empty output is replaced only with ``force=True``.

        Example:
            >>> import tempfile, torch
            >>> ad = Adapter({"lin": LowRank(torch.ones(2, 3), torch.ones(4, 2))})
            >>> out = ad.save(tempfile.mkdtemp() + "/merged")
            >>> sorted(p.name for p in out.iterdir())
            ['adapter_config.json', 'adapter_model.safetensors']
        """
        return _output_hook("save")(self, path, format=format, dtype=dtype, force=force)

    def push_to_hub(self, repo_id: str, *, private: bool = False, commit_message: str | None = None,
                    token: str | None = None, format: str | None = None, dtype: torch.dtype | str | None = None,
                    description: str | None = None) -> Any:
        """Upload the adapter to the Hub model repository ``repo_id`` with a model card.

        It is saved to a temporary folder (``format``, ``dtype`` as in :meth:`save`) with its
        ``README.md`` and, for a merge, ``loramerge_recipe.yaml``, then pushed through
        ``huggingface_hub`` (the repository is created if needed, ``private`` if asked). The token
        is ``token``, else ``HF_TOKEN`` or the saved login. Returns the repository and commit.
        """
        return _output_hook("push_to_hub")(self, repo_id, private=private, commit_message=commit_message, token=token,
                            format=format, dtype=dtype, description=description)

    def with_layers(self, layers: Mapping[str, LowRank], **changes: Any) -> Adapter:
        """A copy of this adapter's metadata around new layers."""
        return replace(self, layers=dict(layers), **changes)
