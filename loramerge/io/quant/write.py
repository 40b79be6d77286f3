"""Writing quantized checkpoints: a folded model's weights quantized again, as transformers saves them.

:func:`quantize_folder` rewrites the shards of a (full-precision) model folder with some of its
weights quantized, one shard at a time (a shard's quantized tensors are held until it is
written; each weight is quantized whole), then fixes the weight index and ``config.json``:

- ``bnb4``: bitsandbytes 4-bit, serialized as transformers does (``<m>.weight`` packed uint8,
  ``.absmax``, ``.quant_map``, with double quantization ``.nested_absmax`` and
  ``.nested_quant_map``, and the JSON state ``.quant_state.bitsandbytes__<type>``);
- ``int8``: LLM.int8 (``<m>.weight`` int8, ``<m>.SCB``, ``<m>.weight_format``);
- ``fp8``: block FP8 (``<m>.weight`` float8_e4m3fn, ``<m>.weight_scale_inv``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loramerge.io.checkpoint import dtype_code, open_checkpoint
from loramerge.io.quant import bnb4, fp8, int8
from loramerge.io.shards import OutEntry, ShardWriter


@dataclass(frozen=True)
class Scheme:
    """How one weight is quantized: ``kind`` (bnb4, int8, fp8) and its settings."""

    kind: str
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False
    block: tuple[int, int] = fp8.DEFAULT_BLOCK


def quantize_tensor(name: str, weight: torch.Tensor, scheme: Scheme) -> dict[str, torch.Tensor]:
    """The serialized tensors of ``weight`` (stored as ``name``) under ``scheme``.

    Example:
        >>> out = quantize_tensor("fc.weight", torch.randn(4, 64, dtype=torch.bfloat16), Scheme("bnb4"))
        >>> sorted(out)[:3], out["fc.weight"].shape
        (['fc.weight', 'fc.weight.absmax', 'fc.weight.quant_map'], torch.Size([128, 1]))
    """
    if scheme.kind == "bnb4":
        packed, state = bnb4.quantize_4bit(weight, scheme.quant_type, scheme.blocksize, scheme.double_quant)
        return {name: packed, **state.tensors(name)}
    module = name.removesuffix(".weight")
    if scheme.kind == "int8":
        codes, scb = int8.quantize_int8(weight.float())
        return {name: codes, f"{module}.SCB": scb, f"{module}.weight_format": torch.tensor(0, dtype=torch.uint8)}
    if scheme.kind == "fp8":
        q, scale_inv = fp8.quantize_fp8(weight, scheme.block)
        return {name: q, f"{name}_scale_inv": scale_inv}
    raise ValueError(f"unknown quantization scheme {scheme.kind!r}")


def quantize_folder(folder: Path, schemes: dict[str, Scheme], config_update: dict[str, Any] | None) -> list[str]:
    """Quantize the tensors named in ``schemes`` in the model folder ``folder``, in place; returns them sorted.

    ``config_update`` becomes ``config.json``'s ``quantization_config`` (None keeps the config).
    """
    ckpt = open_checkpoint(folder)
    staging = folder / ".quantizing"
    staging.mkdir()
    weight_map: dict[str, str] = {}
    total = 0
    for shard in ckpt.shards:
        produced: dict[str, torch.Tensor] = {}
        entries: list[OutEntry] = []
        copies = {}
        for info in ckpt.tensors_in(shard):
            scheme = schemes.get(info.name)
            if scheme is None:
                entries.append(OutEntry(info.name, info.dtype, info.shape))
                copies[info.name] = info
                continue
            for key, tensor in quantize_tensor(info.name, ckpt.read(info.name), scheme).items():
                produced[key] = tensor.contiguous()
                entries.append(OutEntry(key, dtype_code(tensor.dtype), tuple(tensor.shape)))
        with ShardWriter(staging / shard.name, entries, ckpt.shard_metadata.get(shard) or {"format": "pt"}) as writer:
            for entry in entries:
                if entry.name in copies:
                    writer.copy(entry.name, copies[entry.name])
                else:
                    writer.write(entry.name, produced[entry.name])
                weight_map[entry.name] = shard.name
                total += entry.nbytes
    for shard in ckpt.shards:
        (staging / shard.name).replace(shard)
    staging.rmdir()
    if ckpt.index_file is not None:
        index = json.loads(ckpt.index_file.read_text())
        index["weight_map"] = weight_map
        index.setdefault("metadata", {})["total_size"] = total
        ckpt.index_file.write_text(json.dumps(index, indent=2) + "\n")
    config_path = folder / "config.json"
    if config_update is not None and config_path.is_file():
        config = json.loads(config_path.read_text())
        config["quantization_config"] = config_update
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    return sorted(schemes)


def bnb4_config(quant_type: str, double_quant: bool, compute_dtype: torch.dtype, skip_modules: list[str] | None,
                storage: str = "uint8") -> dict[str, Any]:
    """``quantization_config`` as transformers writes it for a bitsandbytes 4-bit model."""
    return {
        "_load_in_4bit": True, "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": storage, "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant, "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": skip_modules, "llm_int8_threshold": 6.0,
        "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
    }
