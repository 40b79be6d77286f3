"""Tiny models and real PEFT adapters, built offline, shared by the tests.

Every adapter is written by PEFT's own ``save_pretrained`` from a model wrapped with
``init_lora_weights=False`` (so B ≠ 0), which makes PEFT the oracle for what the files mean.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")

LLAMA_KW = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False,
)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**LLAMA_KW)).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    return GPT2LMHeadModel(cfg).eval()


class ConvEmbedNet(nn.Module):
    """A toy network with an embedding, a 3×3 conv, a 1×1 conv and a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.conv = nn.Conv2d(3, 6, kernel_size=3, padding=1)
        self.pointwise = nn.Conv2d(6, 5, kernel_size=1)
        self.head = nn.Linear(10, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.conv(x)).mean()


def toy_conv_net(seed: int = 0) -> ConvEmbedNet:
    torch.manual_seed(seed)
    return ConvEmbedNet().eval()


def make_peft_adapter(model: nn.Module, folder: Path, *, seed: int = 0, dtype: torch.dtype | None = None,
                      base_model_name: str | None = "tiny/llama", **lora_kwargs) -> Path:
    """Wrap a copy of ``model`` with a LoRA of ``lora_kwargs`` (random A and B), save it with PEFT."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, base_model_name_or_path=base_model_name, **lora_kwargs)
    model = copy.deepcopy(model)
    model.__dict__["name_or_path"] = base_model_name  # PEFT takes the base name from the model
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.3)
    if dtype is not None:
        peft_model = peft_model.to(dtype)
    peft_model.save_pretrained(str(folder))
    return folder


def peft_deltas(model: nn.Module, folder: Path, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """PEFT's own ``get_delta_weight`` for every LoRA module of the adapter in ``folder`` (float32)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(folder), adapter_name=adapter_name)
    deltas = {}
    for name, module in peft_model.base_model.model.named_modules():
        has_adapter = adapter_name in getattr(module, "lora_A", {}) or adapter_name in getattr(
            module, "lora_embedding_A", {}
        )
        if hasattr(module, "get_delta_weight") and has_adapter:
            deltas[name] = module.get_delta_weight(adapter_name).detach().float()
    return deltas
