"""GPTQ and AWQ int4 checkpoints: packed ``qweight``/``qzeros`` with ``scales`` (and GPTQ's ``g_idx``).

Both store 4-bit integer codes ``q``, a 4-bit zero point ``z`` and a float16 scale ``s`` per group
of input channels, and mean ``W[o, k] = s[g, o] · (q[k, o] − z[g, o])``. They pack differently:

- GPTQ (``quant_method: "gptq"``; AutoGPTQ, GPTQModel, optimum): ``qweight`` is int32
  ``(in/8, out)`` with input channel ``8r + j`` in bits ``4j`` of row ``r``; ``qzeros`` is int32
  ``(groups, out/8)`` with output channel ``8c + j`` in bits ``4j``; ``scales`` ``(groups, out)``;
  ``g_idx`` ``(in,)`` gives each input channel's group (``k // group_size`` unless act-order
  permuted it). The original ``gptq`` checkpoint format stores ``z − 1``; ``gptq_v2`` stores ``z``.
- AWQ GEMM (``quant_method: "awq"``, ``version: "gemm"``; AutoAWQ): ``qweight`` is int32
  ``(in, out/8)`` and ``qzeros`` ``(in/group_size, out/8)``, the eight output channels of a word
  interleaved in the order 0, 2, 4, 6, 1, 3, 5, 7 (bits ``4i`` hold channel ``8c + order[i]``);
  groups are consecutive runs of ``group_size`` input channels.

Values are computed in float32, where ``s · (q − z)`` is exact, and rounded once to the output dtype.
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """The eight 4-bit fields of each int32 of ``packed`` (lowest bits first), laid out along ``dim`` (0 or 1), int32.

    Example:
        >>> unpack_int4(torch.tensor([[0x76543210]], dtype=torch.int32), 1).tolist()
        [[0, 1, 2, 3, 4, 5, 6, 7]]
    """
    words = packed.to(torch.int32)
    fields = (words.unsqueeze(-1) >> _SHIFTS.to(words.device)) & 0xF  # (..., 8)
    if dim == 1:
        return fields.reshape(words.shape[0], -1)
    return fields.permute(0, 2, 1).reshape(-1, words.shape[1])


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    g_idx: torch.Tensor | None = None, *, group_size: int = 128, zero_offset: int = 1,
                    in_features: int | None = None) -> torch.Tensor:
    """The float32 ``(out, in)`` weight of a GPTQ int4 layer; ``zero_offset`` is 1 for format ``gptq``, 0 for ``gptq_v2``.

    Example:
        >>> q = torch.tensor([[0x00000003]] * 1, dtype=torch.int32).repeat(1, 1)  # input 0 has code 3
        >>> z = torch.tensor([[0x00000000]], dtype=torch.int32)  # stored z - 1 = 0, so z = 1
        >>> dequantize_gptq(q, z, torch.tensor([[0.5] + [0.0] * 7]).half(), group_size=8)[0].tolist()
        [1.0, -0.5, -0.5, -0.5, -0.5, -0.5, -0.5, -0.5]
    """
    codes = unpack_int4(qweight, 0)  # (in, out)
    in_features = in_features or codes.shape[0]
    codes = codes[:in_features]
    out_features = scales.shape[1]
    zeros = unpack_int4(qzeros, 1)[:, :out_features] + zero_offset  # (groups, out)
    if g_idx is None:
        g_idx = torch.arange(in_features) // group_size if group_size > 0 else torch.zeros(in_features, dtype=torch.long)
    groups = g_idx.to(torch.long)
    weight = scales.float()[groups] * (codes[:, :out_features] - zeros[groups]).float()
    return weight.T.contiguous()


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *,
                   group_size: int = 128) -> torch.Tensor:
    """The float32 ``(out, in)`` weight of an AWQ GEMM int4 layer.

    Example:
        >>> q = torch.tensor([[0x00000002]], dtype=torch.int32)  # bits 0-3 hold output channel 0
        >>> dequantize_awq(q, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 8).half(), group_size=1)[:, 0].tolist()
        [2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    """
    order = torch.tensor(AWQ_ORDER)
    inverse = torch.argsort(order)  # field index holding channel j of each word

    def channels(packed: torch.Tensor) -> torch.Tensor:
        fields = unpack_int4(packed, 1).reshape(packed.shape[0], -1, 8)
        return fields[:, :, inverse].reshape(packed.shape[0], -1)

    codes = channels(qweight)  # (in, out)
    zeros = channels(qzeros)  # (groups, out)
    groups = torch.arange(codes.shape[0]) // group_size
    weight = scales.float()[groups] * (codes - zeros[groups]).float()
    return weight.T.contiguous()
