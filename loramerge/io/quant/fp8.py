"""Block-scaled FP8 weights: ``float8_e4m3fn`` values with one float32 ``weight_scale_inv`` per block.

This is the layout DeepSeek-V3 and the Qwen FP8 releases ship, and that transformers'
``FineGrainedFP8Config`` reads (``quant_method: "fp8"``, ``weight_block_size: [128, 128]``): the
weight ``(out, in)`` is cut into blocks of 128×128 (the last row and column of blocks may be
partial) and ``W = fp8 · scale_inv[i // 128, j // 128]`` in float32.

Quantization computes each block's scale the way transformers does it: ``scale = 448 / amax``
(448 is the largest e4m3 value; an all-zero block gets scale 1), values are multiplied by it,
clamped to ±448 and rounded to e4m3, and the stored ``weight_scale_inv`` is ``1 / scale``.
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0
DEFAULT_BLOCK = (128, 128)


def _grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def expand_scales(scale_inv: torch.Tensor, columns: int, block: tuple[int, int], start: int, stop: int) -> torch.Tensor:
    """The per-element float32 scale of rows ``start:stop`` of a weight with ``columns`` columns."""
    row_blocks = torch.arange(start, stop, device=scale_inv.device) // block[0]
    per_row = scale_inv.float()[row_blocks]  # (rows, column blocks)
    return per_row.repeat_interleave(block[1], dim=1)[:, :columns]


def block_size_of(weight_shape: tuple[int, ...], scale_shape: tuple[int, ...],
                  configured: tuple[int, int] | None = None) -> tuple[int, int]:
    """The block size that maps ``scale_shape`` onto ``weight_shape``: the configured one when it fits, else derived.

    Raises ValueError when no block size fits.

    Example:
        >>> block_size_of((300, 256), (3, 2)), block_size_of((64, 64), (1, 1), (128, 128))
        ((128, 128), (128, 128))
    """
    candidates = [configured] if configured else []
    candidates.append(DEFAULT_BLOCK)
    if len(scale_shape) == 2 and all(scale_shape):
        candidates.append((math.ceil(weight_shape[0] / scale_shape[0]), math.ceil(weight_shape[1] / scale_shape[1])))
    for block in candidates:
        if block and len(weight_shape) == 2 and tuple(scale_shape) == _grid((weight_shape[0], weight_shape[1]), block):
            return (int(block[0]), int(block[1]))
    raise ValueError(f"scale grid {tuple(scale_shape)} fits no block size for a weight of shape {tuple(weight_shape)}")


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
                   rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Float32 values of FP8 ``weight`` rows (all, or the ``rows`` range it holds) with their block ``scale_inv``.

    Example:
        >>> w = torch.tensor([[1.0, 2.0], [3.0, -4.0]]).to(FP8_DTYPE)
        >>> dequantize_fp8(w, torch.tensor([[0.5]])).tolist()
        [[0.5, 1.0], [1.5, -2.0]]
    """
    start, stop = rows or (0, weight.shape[0])
    return weight.float() * expand_scales(scale_inv, weight.shape[1], block, start, stop)


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp8 weight, float32 weight_scale_inv)`` of a 2-D weight, each block scaled to the e4m3 range.

    Example:
        >>> q, s = quantize_fp8(torch.tensor([[1.0, -2.0], [0.5, 0.25]]))
        >>> s.tolist(), dequantize_fp8(q, s).tolist()
        ([[0.004464285913854837]], [[1.0, -2.0], [0.5, 0.25]])
    """
    if FP8_DTYPE is None:
        raise RuntimeError("this torch has no float8_e4m3fn dtype")
    out, cols = weight.shape
    grid = _grid((out, cols), block)
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1], dtype=torch.float32, device=weight.device)
    padded[:out, :cols] = weight.float()
    tiles = padded.reshape(grid[0], block[0], grid[1], block[1])
    amax = tiles.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, FP8_MAX / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.ones_like(amax))
    scaled = (tiles * scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
    quantized = scaled.reshape(padded.shape)[:out, :cols].to(FP8_DTYPE)
    return quantized.contiguous(), (1.0 / scale).float()
