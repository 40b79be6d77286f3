"""bitsandbytes LLM.int8 weights: int8 codes with one float32 scale per output row (``SCB``).

A row's scale is its absolute maximum; the code is ``round(w · 127 / scale)``. Dequantization is
``code · scale · (1/127)`` in float32, exactly as ``bitsandbytes.functional.int8_vectorwise_dequant``
computes it (Dettmers et al., "LLM.int8()", 2022). The outlier threshold of LLM.int8 applies to
activations at run time, not to the stored weights.
"""

from __future__ import annotations

import torch

_INV_127 = 7.874015718698502e-3  # the float bitsandbytes multiplies by


def dequantize_int8(codes: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """The float32 weight of int8 ``codes`` ``(out, in)`` and row scales ``scb`` ``(out,)``.

    Example:
        >>> dequantize_int8(torch.tensor([[127, -64]], dtype=torch.int8), torch.tensor([2.0])).tolist()
        [[2.0, -1.0078740119934082]]
    """
    return codes * scb.float().view(-1, 1) * _INV_127


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise int8 codes and float32 scales of a 2-D weight (``int8_vectorwise_quant`` with no outliers).

    Example:
        >>> codes, scb = quantize_int8(torch.tensor([[2.0, -1.0]]))
        >>> codes.tolist(), scb.tolist()
        ([[127, -64]], [2.0])
    """
    scb = weight.abs().amax(dim=1).float()
    codes = torch.round(weight * (127.0 / scb.unsqueeze(-1))).to(torch.int8)
    return codes, scb
