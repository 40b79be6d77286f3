"""Quantized bases in a fold: which base to read (dequantized or QLoRA's dequant(quant(W))) and what to write.

- ``base_quant`` (``--base-quant nf4|fp4``): a full-precision base read as the 4-bit weights a QLoRA
  adapter was trained against; written in the output dtype (bfloat16 unless ``dtype`` says).
- A pre-quantized base (bitsandbytes 4/8-bit, FP8, GPTQ, AWQ) is dequantized on the fly and
  written in full precision, without ``quantization_config``; ``keep_quant`` writes the folded
  weights in the base's own quantization again (bitsandbytes and FP8; GPTQ/AWQ would need
  calibration data and are refused).
- ``quantize="nf4"|"fp4"`` writes the folded model as a pre-quantized bitsandbytes 4-bit checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loramerge.errors import InvalidParameter, UnsupportedAdapter
from loramerge.io.checkpoint import Checkpoint
from loramerge.io.quant import bnb4
from loramerge.io.quant.targets import bnb_targets
from loramerge.io.quant.view import BaseQuant, DequantizedCheckpoint, open_base
from loramerge.io.quant.write import Scheme, bnb4_config, quantize_folder

__all__ = ["BaseQuant", "QuantPlan", "open_fold_base"]


@dataclass
class QuantPlan:
    """The quantization side of one fold."""

    base_quant: BaseQuant | None = None
    keep_quant: bool = False
    quantize: str | None = None
    quantize_double: bool = False

    @property
    def active(self) -> bool:
        return self.base_quant is not None or self.keep_quant or self.quantize is not None


def quant_plan(base_quant: str | BaseQuant | None, keep_quant: bool, quantize: str | None,
               double_quant: bool = False) -> QuantPlan:
    """Validate the quantization options of a fold.

    Example:
        >>> quant_plan("nf4", False, None).base_quant.quant_type
        'nf4'
    """
    spec = BaseQuant(base_quant) if isinstance(base_quant, str) else base_quant
    if quantize is not None and quantize not in bnb4.QUANT_TYPES:
        raise InvalidParameter(f"--quantize must be one of {', '.join(bnb4.QUANT_TYPES)}, got {quantize!r}")
    if keep_quant and quantize is not None:
        raise InvalidParameter("--keep-quant and --quantize both say how to write the weights; give one")
    if keep_quant and spec is not None:
        raise InvalidParameter("--keep-quant keeps a pre-quantized base's format; with --base-quant use --quantize")
    double = spec.double_quant if spec is not None and quantize is not None else double_quant
    return QuantPlan(spec, keep_quant, quantize, double)


def open_fold_base(folder: Path, plan: QuantPlan, allow_pickle: bool, out_dtype: torch.dtype | None) -> Checkpoint:
    """The base checkpoint, read through :func:`~loramerge.io.quant.view.open_base`."""
    dtype = out_dtype if plan.base_quant is None or out_dtype is not None else torch.bfloat16
    ckpt = open_base(folder, allow_pickle=allow_pickle, base_quant=plan.base_quant, dtype=dtype)
    if plan.keep_quant:
        method = ckpt.quantization.get("format", "") if isinstance(ckpt, DequantizedCheckpoint) else ""
        if not method:
            raise InvalidParameter(f"{folder}: --keep-quant needs a quantized base, and this one is not quantized")
        if method.startswith(("gptq", "awq")):
            raise UnsupportedAdapter(f"{folder}: the base is {method}; re-quantizing it would need calibration data, "
                                     "so --keep-quant is refused (the fold is written in full precision without it)")
    return ckpt


def output_dtype(plan: QuantPlan, out_dtype: torch.dtype | None) -> torch.dtype | None:
    """QLoRA folds write the compute dtype, bfloat16 unless ``dtype`` is given."""
    return torch.bfloat16 if plan.base_quant is not None and out_dtype is None else out_dtype


def drops_quantization_config(ckpt: Checkpoint, plan: QuantPlan) -> bool:
    return isinstance(ckpt, DequantizedCheckpoint) and bool(ckpt.quantization.get("format")) and not plan.keep_quant


def requantize(tmp: Path, ckpt: Checkpoint, plan: QuantPlan, out_dtype: torch.dtype | None) -> dict[str, Any]:
    """Quantize the written model in ``tmp`` as ``plan`` asks; returns the recipe's ``quantization`` entry."""
    record: dict[str, Any] = dict(ckpt.quantization) if isinstance(ckpt, DequantizedCheckpoint) else {}
    if plan.quantize is not None:
        spec = plan.base_quant or BaseQuant(plan.quantize)
        targets = bnb_targets(ckpt.config, set(ckpt.tensors), spec.skip_modules, where=ckpt.location)
        scheme = Scheme("bnb4", plan.quantize, spec.blocksize, plan.quantize_double)
        compute = out_dtype or torch.bfloat16
        written = quantize_folder(tmp, dict.fromkeys(targets.weights, scheme),
                                  bnb4_config(plan.quantize, plan.quantize_double, compute, spec.skip_modules))
        record["written_quantized"] = {"format": f"bitsandbytes {plan.quantize}", "tensors": written}
    elif plan.keep_quant:
        assert isinstance(ckpt, DequantizedCheckpoint)
        schemes = {name: _same_scheme(ckpt, name) for name in ckpt.decoders}
        written = quantize_folder(tmp, schemes, None)
        record["written_quantized"] = {"format": ckpt.quantization["format"], "tensors": written}
    return record


def _same_scheme(ckpt: DequantizedCheckpoint, name: str) -> Scheme:
    decoder = ckpt.decoders[name]
    if decoder.kind in bnb4.QUANT_TYPES:
        state = bnb4.state_from_tensors({n: ckpt.stored.read(n) for n in decoder.hidden}, name)  # type: ignore[union-attr]
        return Scheme("bnb4", state.quant_type, state.blocksize, state.nested is not None)
    if decoder.kind == "int8":
        return Scheme("int8")
    return Scheme("fp8", block=decoder.block or (128, 128))
