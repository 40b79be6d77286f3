"""Tiny models and real PEFT adapters for the fold and extract tests, built offline.

Every adapter is made by PEFT itself (``get_peft_model`` + ``save_pretrained``) with
``init_lora_weights=False`` and its LoRA parameters randomised, so B ≠ 0 and the scale matters.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from loramerge.io.formats.tensorfile import write_safetensors

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def tiny_llama(tie: bool = False, seed: int = 0, vocab: int = 96, hidden: int = 32, layers: int = 2,
               dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # transformers initialises norms to 1; make them informative
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=80, n_positions=32, n_embd=24, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config).eval()


class Toy(nn.Module):
    """Conv2d (3×3 and 1×1), Embedding and Linear layers with biases, for the non-transformers cases."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 12)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.point = nn.Conv2d(6, 5, 1)
        self.fc = nn.Linear(12, 7)
        self.head = nn.Linear(7, 4)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.point(self.conv(image)).mean(dim=(2, 3))
        return self.head(self.fc(self.emb(tokens).mean(1))) + h.mean(1, keepdim=True)


def toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy().eval()


def save_toy(model: Toy, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(dict(model.state_dict()), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}) + "\n")
    return folder


def load_toy(folder: Path) -> Toy:
    from safetensors.torch import load_file

    model = Toy().eval()
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model


def save_base(model, folder: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}) + "\n")
    (folder / "special_tokens_map.json").write_text("{}\n")
    return folder


def randomise(peft_model, seed: int, magnitude: bool = True) -> None:
    """Fill every LoRA factor (and DoRA magnitude, bias) with seeded noise of a realistic size."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" not in name:
                continue
            if "magnitude" in name:
                if magnitude:
                    p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
                continue
            p.copy_((0.3 * torch.randn(p.shape, generator=g)).to(p.dtype))


def make_adapter(base_model, folder: Path, seed: int = 1, **lora_kwargs) -> Path:
    """A PEFT adapter for a copy of ``base_model`` saved to ``folder``."""
    from peft import LoraConfig, get_peft_model

    lora_kwargs.setdefault("r", 4)
    lora_kwargs.setdefault("lora_alpha", 8)
    config = LoraConfig(init_lora_weights=False, **lora_kwargs)
    pm = get_peft_model(copy.deepcopy(base_model), config)
    randomise(pm, seed)
    pm.save_pretrained(folder)
    return folder


def peft_merged(base_model, adapters: list[Path], names: list[str] | None = None):
    """PEFT's merge_and_unload of ``adapters`` (all active, in order) on a copy of ``base_model``."""
    from peft import PeftModel

    names = names or [f"a{i}" for i in range(len(adapters))]
    pm = PeftModel.from_pretrained(copy.deepcopy(base_model), adapters[0], adapter_name=names[0])
    for path, name in zip(adapters[1:], names[1:]):
        pm.load_adapter(path, adapter_name=name)
    if len(names) > 1:
        pm.base_model.set_adapter(names)
    return pm.merge_and_unload(adapter_names=names)


def peft_adapted(base_model, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base_model), adapter).eval()
