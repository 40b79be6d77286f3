"""Quantized checkpoints of a tiny Llama, written by transformers + bitsandbytes, or by faithful writers of the
FP8 (DeepSeek-V3 layout), GPTQ and AWQ formats, and a PEFT adapter for them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from loramerge.io.quant import fp8

LLAMA_QUANT_KW = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False)
ADAPTED = ("q_proj", "down_proj")


def tiny_quant_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**LLAMA_QUANT_KW)).to(torch.bfloat16).eval()


def bnb_checkpoint(base: Path, out: Path, **bnb_kwargs) -> Path:
    """``base`` loaded by transformers with ``BitsAndBytesConfig(**bnb_kwargs)`` on the CPU and saved pre-quantized."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=BitsAndBytesConfig(**bnb_kwargs),
                                                 dtype=torch.bfloat16, device_map="cpu")
    model.save_pretrained(str(out))
    return out


def _rewrite(base: Path, out: Path, tensors: dict[str, torch.Tensor], quantization_config: dict) -> Path:
    from safetensors.torch import save_file

    shutil.copytree(base, out)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config))
    return out


def _linear_weights(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in state if k.endswith("proj.weight")]


def fp8_checkpoint(base: Path, out: Path) -> Path:
    """The DeepSeek-V3 / Qwen-FP8 layout: float8_e4m3fn ``weight`` and float32 ``weight_scale_inv`` per 128×128 block."""
    from safetensors.torch import load_file

    state = load_file(str(base / "model.safetensors"))
    tensors = {}
    for name, value in state.items():
        if name in _linear_weights(state):
            q, scale_inv = fp8.quantize_fp8(value)
            tensors[name], tensors[name + "_scale_inv"] = q, scale_inv
        else:
            tensors[name] = value
    return _rewrite(base, out, tensors, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]})


def _pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """Eight 4-bit codes per int32 along dim 0, lowest bits first (GPTQ's qweight)."""
    shifted = codes.reshape(-1, 8, codes.shape[1]).to(torch.int64) << (4 * torch.arange(8)).reshape(1, 8, 1)
    return _as_int32(shifted.sum(dim=1))


def _pack_columns(codes: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """Eight 4-bit codes per int32 along dim 1; bits 4i hold column 8c + order[i] (AWQ interleaves)."""
    grouped = codes.reshape(codes.shape[0], -1, 8)[:, :, list(order)].to(torch.int64)
    return _as_int32((grouped << (4 * torch.arange(8))).sum(dim=2))


def _as_int32(values: torch.Tensor) -> torch.Tensor:
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def int4_checkpoint(base: Path, out: Path, method: str, group_size: int = 32) -> tuple[Path, dict[str, torch.Tensor]]:
    """A GPTQ (format ``gptq``, zeros stored minus one, act-order ``g_idx``) or AWQ GEMM checkpoint of ``base``,
    quantized with asymmetric min-max 4-bit groups; returns it and the exact float64 weights it encodes."""
    from safetensors.torch import load_file

    state = load_file(str(base / "model.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    exact: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(0)
    for name, value in state.items():
        if name not in _linear_weights(state):
            tensors[name] = value
            continue
        module = name.removesuffix(".weight")
        w = value.double().T  # (in, out)
        in_features = w.shape[0]
        g_idx = torch.arange(in_features) // group_size
        if method == "gptq":
            g_idx = g_idx[torch.randperm(in_features, generator=g)]  # act-order: any channel in any group
        groups = in_features // group_size
        low = torch.stack([w[g_idx == k].amin(0) for k in range(groups)])
        high = torch.stack([w[g_idx == k].amax(0) for k in range(groups)])
        scales = ((high - low) / 15).clamp(min=1e-4).half()
        zeros = torch.round(-low / scales.double()).clamp(1 if method == "gptq" else 0, 15).long()
        codes = torch.round(w / scales.double()[g_idx] + zeros[g_idx]).clamp(0, 15).long()
        exact[name] = (scales.double()[g_idx] * (codes - zeros[g_idx]).double()).T
        if method == "gptq":
            tensors[f"{module}.qweight"] = _pack_rows(codes)
            tensors[f"{module}.qzeros"] = _pack_columns(zeros - 1)
            tensors[f"{module}.g_idx"] = g_idx.int()
        else:
            order = (0, 2, 4, 6, 1, 3, 5, 7)
            tensors[f"{module}.qweight"] = _pack_columns(codes, order)
            tensors[f"{module}.qzeros"] = _pack_columns(zeros, order)
        tensors[f"{module}.scales"] = scales
    config = ({"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": True, "sym": False,
               "checkpoint_format": "gptq"} if method == "gptq" else
              {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"})
    return _rewrite(base, out, tensors, config), exact
