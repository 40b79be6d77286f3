"""One validation for every tensor an adapter reader reads, and for every update it builds.

Readers (PEFT, kohya, LyCORIS, diffusers) call three functions, so the same rules hold for all:

* :func:`checked_tensors` on the whole file as read: every tensor is a real number type (a float8
  tensor is widened exactly to bfloat16, since torch has no arithmetic for it), and none is empty;
* :func:`check_parts` on one kohya/LyCORIS module's tensors: which algorithm they form (refusing
  a mix of two), whether every factor is there, and whether their ranks and sizes fit together,
  before any algebra runs;
* :func:`low_rank` to build each :class:`~loramerge.core.adapter.LowRank`: factor ranks and
  layouts that fit the module kind, rank at least 1, finite values and scale.

Every refusal is one :class:`~loramerge.errors.CorruptFile` line naming the file and the module.

Example:
    >>> import torch
    >>> lr = low_rank("a.safetensors", "fc", A=torch.ones(2, 3), B=torch.ones(4, 2), scale=0.5)
    >>> lr.rank
    2
    >>> try:
    ...     low_rank("a.safetensors", "fc", A=torch.ones(0, 3), B=torch.ones(4, 0), scale=1.0)
    ... except CorruptFile as e:
    ...     print(e)
    a.safetensors: module fc: lora_A has shape (0, 3), with a dimension of size 0
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from loramerge.core.adapter import LowRank
from loramerge.errors import CorruptFile, LoramergeError, UnsupportedAdapter
from loramerge.io.formats.tensorfile import check_finite

F = TypeVar("F", bound=Callable[..., Any])

def _with_fields(path_arg: str, module_arg: str | None = None) -> Callable[[F], F]:
    """Fill the ``path`` (and ``module``) fields of the errors a checker raises from its arguments."""
    def decorate(function: F) -> F:
        names = list(inspect.signature(function).parameters)

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except LoramergeError as exc:
                bound = dict(zip(names, args)) | kwargs
                module = bound.get(module_arg) if module_arg else None
                raise exc.fill(path=str(bound.get(path_arg)), module=module) from None

        return wrapper  # type: ignore[return-value]

    return decorate


FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT8 = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                                                   "float8_e8m0fnu") if hasattr(torch, name))


def widen(tensor: torch.Tensor) -> torch.Tensor:
    """A float8 tensor as bfloat16 (exactly: every float8 value is a bfloat16 value); others unchanged.

    Example:
        >>> widen(torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn)).dtype
        torch.bfloat16
    """
    return tensor.to(torch.bfloat16) if tensor.dtype in _FLOAT8 else tensor


@_with_fields("origin")
def checked_tensors(tensors: Mapping[str, torch.Tensor], origin: Path | str) -> dict[str, torch.Tensor]:
    """The tensors of an adapter file, float8 widened, after refusing empty and non-numeric ones.

    Example:
        >>> try:
        ...     checked_tensors({"x.lora_A.weight": torch.ones(0, 4)}, "a.safetensors")
        ... except CorruptFile as e:
        ...     print(e)
        a.safetensors: tensor x.lora_A.weight has shape (0, 4), with a dimension of size 0
    """
    out = {}
    for key, tensor in tensors.items():
        if tensor.is_complex() or tensor.dtype == torch.bool:
            raise CorruptFile(f"{origin}: tensor {key} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                              "which no adapter stores")
        if tensor.numel() == 0:
            raise CorruptFile(f"{origin}: tensor {key} has shape {tuple(tensor.shape)}, with a dimension of size 0")
        out[key] = widen(tensor)
    return out


@_with_fields("origin", "module")
def factor(tensor: torch.Tensor, origin: Path | str, module: str, what: str, *, ndims: tuple[int, ...] = (2, 3, 4, 5),
           finite: bool = True) -> torch.Tensor:
    """``tensor`` checked as one factor: floating, of one of ``ndims`` dimensions, non-empty, finite.

    Example:
        >>> try:
        ...     factor(torch.ones(4), "k.safetensors", "lora_te_x", "lora_down.weight")
        ... except CorruptFile as e:
        ...     print(e)
        k.safetensors: module lora_te_x: lora_down.weight has shape (4,); a factor needs 2 to 5 dimensions
    """
    tensor = widen(tensor)
    if not tensor.is_floating_point():
        raise CorruptFile(f"{origin}: module {module}: {what} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                          "factors are floating point")
    if tensor.ndim not in ndims:
        wanted = f"{ndims[0]} to {ndims[-1]}" if len(ndims) > 1 and ndims == tuple(range(ndims[0], ndims[-1] + 1)) \
            else " or ".join(map(str, ndims))
        raise CorruptFile(f"{origin}: module {module}: {what} has shape {tuple(tensor.shape)}; a factor needs "
                          f"{wanted} dimension{'s' if wanted != '1' else ''}")
    if tensor.numel() == 0:
        raise CorruptFile(f"{origin}: module {module}: {what} has shape {tuple(tensor.shape)}, with a dimension of size 0")
    if finite:
        check_finite(tensor, path=origin, what=f"module {module} {what}")
    return tensor


@_with_fields("origin", "module")
def scalar(tensor: torch.Tensor, origin: Path | str, module: str, what: str) -> float:
    """The one finite number a tensor such as kohya's ``alpha`` or ``scale`` holds.

    Example:
        >>> try:
        ...     scalar(torch.tensor([4.0, 8.0]), "k.safetensors", "lora_te_x", "alpha")
        ... except CorruptFile as e:
        ...     print(e)
        k.safetensors: module lora_te_x: alpha must hold one number, but has shape (2,)
    """
    if tensor.numel() != 1:
        raise CorruptFile(f"{origin}: module {module}: {what} must hold one number, but has shape {tuple(tensor.shape)}")
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise CorruptFile(f"{origin}: module {module}: {what} has dtype {tensor.dtype}; it must be a number")
    value = float(widen(tensor).reshape(()).item())
    if not math.isfinite(value):
        raise CorruptFile(f"{origin}: module {module}: {what} is {value}, not a finite number")
    return value


@_with_fields("origin", "module")
def low_rank(origin: Path | str, module: str, *, A: torch.Tensor, B: torch.Tensor, scale: float,
             kind: str | None = None, names: tuple[str, str] = ("lora_A", "lora_B"), checked: bool = False,
             **extra: Any) -> LowRank:
    """The module's :class:`~loramerge.core.adapter.LowRank`, after checking that its factors fit.

    ``names`` label A and B in messages (``lora_down``/``lora_up`` for kohya). ``kind`` defaults to
    ``conv`` for factors of more than two dimensions, else ``linear``. ``extra`` goes to
    :class:`LowRank` (``fan_in_fan_out``, ``alpha``, ``magnitude``, ``bias``). ``checked`` says
    that A and B already went through :func:`factor`.

    Example:
        >>> try:
        ...     low_rank("a", "fc", A=torch.ones(2, 3), B=torch.ones(4, 3), scale=1.0)
        ... except CorruptFile as e:
        ...     print(e)
        a: module fc: lora_B has 3 columns but lora_A has rank 2; the factors do not fit together
    """
    a_name, b_name = names
    if not checked:
        A = factor(A, origin, module, a_name)
        B = factor(B, origin, module, b_name)
    kind = kind or ("conv" if A.ndim > 2 else "linear")
    if kind in ("linear", "embedding") and (A.ndim != 2 or B.ndim != 2):
        raise CorruptFile(f"{origin}: module {module}: a {kind} update needs 2-D factors, got {a_name} "
                          f"{tuple(A.shape)} and {b_name} {tuple(B.shape)}")
    if B.shape[1] != A.shape[0]:
        raise CorruptFile(f"{origin}: module {module}: {b_name} has {B.shape[1]} columns but {a_name} has rank "
                          f"{A.shape[0]}; the factors do not fit together")
    if any(d != 1 for d in B.shape[2:]):
        raise CorruptFile(f"{origin}: module {module}: {b_name} of shape {tuple(B.shape)} must have a 1×1 kernel")
    if not math.isfinite(scale):
        raise CorruptFile(f"{origin}: module {module}: the scale (alpha/r) is {scale}, not a finite number")
    _check_product(origin, module, A, B, scale)
    for name in ("magnitude", "bias"):
        if extra.get(name) is not None:
            extra[name] = factor(extra[name], origin, module, name, ndims=(1, 2, 3, 4, 5))
    bias = extra.get("bias")
    if bias is not None and (bias.ndim != 1 or bias.shape[0] != B.shape[0]):
        raise CorruptFile(f"{origin}: module {module}: the bias of shape {tuple(bias.shape)} does not fit "
                          f"{B.shape[0]} outputs")
    try:
        return LowRank(A=A, B=B, scale=float(scale), kind=kind, **extra)  # type: ignore[arg-type]
    except UnsupportedAdapter as exc:
        raise UnsupportedAdapter(f"{origin}: module {module}: {exc}") from None
    except ValueError as exc:
        raise CorruptFile(f"{origin}: module {module}: {exc}") from None


def _check_product(origin: Path | str, module: str, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
    """Refuse an update whose entries overflow float32 although its factors do not.

    The bound ``|scale|·max_i Σ_k |B_ik|·max |A|`` costs one pass over the factors; only when it
    exceeds the float32 range is the product itself formed (in float64) to decide.
    """
    limit = torch.finfo(torch.float32).max
    Bm, Am = B.reshape(B.shape[0], B.shape[1]).double(), A.reshape(A.shape[0], -1).double()
    if abs(scale) * float(Bm.abs().sum(dim=1).max()) * float(Am.abs().max()) <= limit:
        return
    largest = abs(scale) * float((Bm @ Am).abs().max())
    if not largest <= limit:
        raise CorruptFile(f"{origin}: module {module}: its update scale·B@A reaches {largest:.3g}, beyond the float32 "
                          "range")


# ------------------------------------------------------------------------------- kohya / LyCORIS

# The tensors of each algorithm (beyond alpha, scale and dora_scale, which every one may have).
_ALGORITHMS = {
    "lora": ("lora_down.weight", "lora_up.weight", "lora_mid.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "full": ("diff", "diff_b"),
}
_SHARED = ("alpha", "scale", "dora_scale")


def algorithm_of(name: str, parts: Mapping[str, torch.Tensor], origin: Path | str) -> str:
    """``lora``, ``loha``, ``lokr`` or ``full`` from a module's tensor suffixes; a mix of two is refused.

    Example:
        >>> algorithm_of("m", {"hada_w1_a": torch.ones(2, 2), "alpha": torch.tensor(1.0)}, "f")
        'loha'
        >>> try:
        ...     algorithm_of("m", {"hada_w1_a": torch.ones(2, 2), "lora_down.weight": torch.ones(2, 2)}, "f")
        ... except CorruptFile as e:
        ...     print(e)
        f: module m mixes the tensors of two algorithms (hada_w1_a of LoHa, lora_down.weight of LoRA)
    """
    found = {algo: [k for k in parts if k in keys] for algo, keys in _ALGORITHMS.items()}
    present = [algo for algo, keys in found.items() if keys]
    if len(present) > 1:
        labels = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "full": "full"}
        shown = ", ".join(f"{found[a][0]} of {labels[a]}" for a in sorted(present, key=lambda a: found[a][0]))
        raise CorruptFile(f"{origin}: module {name} mixes the tensors of two algorithms ({shown})")
    if not present:
        raise CorruptFile(f"{origin}: module {name} has {', '.join(sorted(parts))} but no LoRA factors")
    return present[0]


@_with_fields("origin", "name")
def check_parts(name: str, parts: Mapping[str, torch.Tensor], origin: Path | str) -> str:
    """Check a kohya/LyCORIS module's tensors before any algebra; returns its algorithm.

    Every factor must be present, of the right number of dimensions, non-empty and finite, and
    the sizes they share (ranks, outputs, inputs, kernels) must agree. ``alpha`` and ``scale``
    must be one finite number each.

    Example:
        >>> parts = {"lora_down.weight": torch.ones(2, 8), "lora_up.weight": torch.ones(4, 3)}
        >>> try:
        ...     check_parts("lora_te_x", parts, "k.safetensors")
        ... except CorruptFile as e:
        ...     print(e)
        k.safetensors: module lora_te_x: lora_up.weight has 3 columns but lora_down.weight has rank 2
    """
    algorithm = algorithm_of(name, parts, origin)
    for key in ("alpha", "scale"):
        if key in parts:
            scalar(parts[key], origin, name, key)
    shapes = _ShapeCheck(name, parts, origin)
    {"lora": shapes.lora, "loha": shapes.loha, "lokr": shapes.lokr, "full": shapes.full}[algorithm]()
    if "dora_scale" in parts:
        factor(parts["dora_scale"], origin, name, "dora_scale", ndims=(1, 2, 3, 4, 5))
    return algorithm


class _ShapeCheck:
    """The shape rules of each algorithm, with one message format for all of them."""

    def __init__(self, name: str, parts: Mapping[str, torch.Tensor], origin: Path | str) -> None:
        self.name, self.parts, self.origin = name, parts, origin

    def get(self, key: str, ndims: tuple[int, ...]) -> torch.Tensor:
        if key not in self.parts:
            raise CorruptFile(f"{self.origin}: module {self.name} has no {key} tensor")
        return factor(self.parts[key], self.origin, self.name, key, ndims=ndims)

    def lora(self) -> None:
        down = self.get("lora_down.weight", (2, 3, 4, 5))
        up = self.get("lora_up.weight", (2, 3, 4, 5))
        if up.shape[1] != down.shape[0]:
            raise CorruptFile(f"{self.origin}: module {self.name}: lora_up.weight has {up.shape[1]} columns but "
                              f"lora_down.weight has rank {down.shape[0]}")
        if any(d != 1 for d in up.shape[2:]):
            raise CorruptFile(f"{self.origin}: module {self.name}: lora_up.weight of shape {tuple(up.shape)} must "
                              "have a 1×1 kernel")
        if "lora_mid.weight" in self.parts:
            mid = self.get("lora_mid.weight", (3, 4, 5))
            if tuple(mid.shape[:2]) != (up.shape[1], down.shape[0]) or any(d != 1 for d in down.shape[2:]):
                raise CorruptFile(
                    f"{self.origin}: module {self.name}: lora_mid.weight of shape {tuple(mid.shape)} does not fit "
                    f"lora_up.weight {tuple(up.shape)} and lora_down.weight {tuple(down.shape)} (expected "
                    f"({up.shape[1]}, {down.shape[0]}, kernel…) and a 1×1 down kernel)")

    def loha(self) -> None:
        tucker = [k for k in ("hada_t1", "hada_t2") if k in self.parts]
        if len(tucker) == 1:
            other = "hada_t2" if tucker[0] == "hada_t1" else "hada_t1"
            raise CorruptFile(f"{self.origin}: module {self.name} has {tucker[0]} but no {other} tensor")
        for side in ("1", "2"):
            self._factor_pair(f"hada_w{side}_a", f"hada_w{side}_b", f"hada_t{side}" if tucker else None)
        out_axis = 1 if tucker else 0
        self._agree(("hada_w1_a", out_axis), ("hada_w2_a", out_axis), "outputs")
        self._agree(("hada_w1_b", 1), ("hada_w2_b", 1), "inputs")
        if tucker and tuple(self.parts["hada_t1"].shape[2:]) != tuple(self.parts["hada_t2"].shape[2:]):
            raise CorruptFile(f"{self.origin}: module {self.name}: hada_t1 and hada_t2 have different kernels")

    def lokr(self) -> None:
        for side, full_dims in (("1", (2,)), ("2", (2, 3, 4, 5))):
            whole = f"lokr_w{side}"
            if whole in self.parts:
                self.get(whole, full_dims)
                continue
            core = "lokr_t2" if side == "2" and "lokr_t2" in self.parts else None
            self._factor_pair(f"lokr_w{side}_a", f"lokr_w{side}_b", core)
        if "lokr_t2" in self.parts and "lokr_w2" in self.parts:
            raise CorruptFile(f"{self.origin}: module {self.name} has both lokr_w2 and lokr_t2")

    def full(self) -> None:
        diff = self.get("diff", (1, 2, 3, 4, 5))
        if diff.ndim == 1:
            raise UnsupportedAdapter(f"{self.origin}: module {self.name} is a full update of a 1-D weight (a norm or "
                                     "bias), which is not a matrix update")
        if "diff_b" in self.parts:
            bias = self.get("diff_b", (1,))
            if bias.shape[0] != diff.shape[0]:
                raise CorruptFile(f"{self.origin}: module {self.name}: diff_b has {bias.shape[0]} entries but diff has "
                                  f"{diff.shape[0]} outputs")

    def _factor_pair(self, a_name: str, b_name: str, core_name: str | None) -> None:
        """Check a LyCORIS factor pair: ``a`` (rows × rank) and ``b`` (rank × cols), or a Tucker ``core`` between them."""
        a, b = self.get(a_name, (2,)), self.get(b_name, (2,))
        if core_name is not None:
            core = self.get(core_name, (3, 4, 5))
            if tuple(core.shape[:2]) != (a.shape[0], b.shape[0]):
                raise CorruptFile(f"{self.origin}: module {self.name}: {core_name} of shape {tuple(core.shape)} does "
                                  f"not fit {a_name} {tuple(a.shape)} and {b_name} {tuple(b.shape)}")
        elif a.shape[1] != b.shape[0]:
            raise CorruptFile(f"{self.origin}: module {self.name}: {a_name} has rank {a.shape[1]} but "
                              f"{b_name} has rank {b.shape[0]}")

    def _agree(self, a: tuple[str, int], b: tuple[str, int], what: str) -> None:
        x, y = self.parts[a[0]].shape[a[1]], self.parts[b[0]].shape[b[1]]
        if x != y:
            raise CorruptFile(f"{self.origin}: module {self.name}: {a[0]} has {x} {what} but {b[0]} has {y}")
