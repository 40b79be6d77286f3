"""Tiny mixture-of-experts models from transformers configs and PEFT adapters on their fused expert parameters."""

from __future__ import annotations

import torch

MOE_KW = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_moe(kind: str, seed: int = 0):
    """A tiny ``qwen3_moe`` (experts stored (E, out, in), per-expert modules on disk), ``gpt_oss`` (stored
    (E, in, out), fused on disk) or ``mixtral`` (per-expert ``w1/w2/w3`` on disk) causal LM."""
    import transformers

    torch.manual_seed(seed)
    if kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                                             num_experts_per_tok=2, **MOE_KW)
        model = transformers.Qwen3MoeForCausalLM(config)
    elif kind == "gpt_oss":
        config = transformers.GptOssConfig(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, **MOE_KW)
        model = transformers.GptOssForCausalLM(config)
    elif kind == "mixtral":
        kw = {k: v for k, v in MOE_KW.items() if k != "head_dim"}
        config = transformers.MixtralConfig(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, **kw)
        model = transformers.MixtralForCausalLM(config)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # gpt-oss initialises its expert parameters to zero
        for name, param in model.named_parameters():
            if "experts" in name:
                param.normal_(0.0, 0.2)
    return model.eval()


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))
