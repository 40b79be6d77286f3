"""Tiny denoisers of every image/video model family diffusers loads LoRAs for, built offline from small
configs, with inputs for one forward pass; and loading a LoRA file with the family's own diffusers loader.

The configs keep each family's block structure (double/single blocks, refiners, experts …) at toy width,
so module names are the real ones and only the shapes are small.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loramerge import Adapter, LowRank

logging.getLogger("diffusers").setLevel(logging.ERROR)


def _r(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


@dataclass(frozen=True)
class TinyFamily:
    name: str
    model: str
    config: dict[str, Any]
    inputs: Callable[[torch.Generator], dict[str, Any]]
    outputs: int = 1  # leading outputs compared (LTX-2 denoises video and audio)


TINY: dict[str, TinyFamily] = {f.name: f for f in (
    TinyFamily("flux", "FluxTransformer2DModel",
               dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)),
               lambda g: dict(hidden_states=_r(g, 1, 16, 4), encoder_hidden_states=_r(g, 1, 8, 32),
                              pooled_projections=_r(g, 1, 32), timestep=torch.tensor([1.0]),
                              img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))),
    TinyFamily("chroma", "ChromaTransformer2DModel",
               dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8),
                    approximator_num_channels=8, approximator_hidden_dim=32, approximator_layers=1),
               lambda g: dict(hidden_states=_r(g, 1, 16, 4), encoder_hidden_states=_r(g, 1, 8, 32),
                              timestep=torch.tensor([1.0]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))),
    TinyFamily("flux2", "Flux2Transformer2DModel",
               dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=16,
                    axes_dims_rope=(4, 4, 4, 4)),
               lambda g: dict(hidden_states=_r(g, 1, 16, 4), encoder_hidden_states=_r(g, 1, 8, 32),
                              timestep=torch.tensor([1.0]), guidance=torch.tensor([1.0]),
                              img_ids=torch.zeros(1, 16, 4), txt_ids=torch.zeros(1, 8, 4))),
    TinyFamily("sd3", "SD3Transformer2DModel",
               dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                    num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                    pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16),
               lambda g: dict(hidden_states=_r(g, 1, 4, 8, 8), encoder_hidden_states=_r(g, 1, 6, 16),
                              pooled_projections=_r(g, 1, 16), timestep=torch.tensor([1.0]))),
    TinyFamily("qwen_image", "QwenImageTransformer2DModel",
               dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6)),
               lambda g: dict(hidden_states=_r(g, 1, 16, 16), encoder_hidden_states=_r(g, 1, 6, 16),
                              encoder_hidden_states_mask=torch.ones(1, 6), timestep=torch.tensor([1.0]),
                              img_shapes=[(1, 4, 4)])),
    TinyFamily("wan", "WanTransformer3DModel",
               dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                    text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32),
               lambda g: dict(hidden_states=_r(g, 1, 4, 2, 8, 8), encoder_hidden_states=_r(g, 1, 6, 16),
                              timestep=torch.tensor([1]))),
    TinyFamily("hunyuan_video", "HunyuanVideoTransformer3DModel",
               dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                    num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
                    pooled_projection_dim=8, rope_axes_dim=(2, 2, 4)),
               lambda g: dict(hidden_states=_r(g, 1, 4, 1, 4, 4), encoder_hidden_states=_r(g, 1, 6, 16),
                              encoder_attention_mask=torch.ones(1, 6), pooled_projections=_r(g, 1, 8),
                              timestep=torch.tensor([1]), guidance=torch.tensor([1000.0]))),
    TinyFamily("ltx_video", "LTXVideoTransformer3DModel",
               dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                    attention_head_dim=8, cross_attention_dim=16, num_layers=1, caption_channels=16),
               lambda g: dict(hidden_states=_r(g, 1, 16, 8), encoder_hidden_states=_r(g, 1, 6, 16),
                              encoder_attention_mask=torch.ones(1, 6), timestep=torch.tensor([1]),
                              num_frames=1, height=4, width=4)),
    TinyFamily("ltx2", "LTX2VideoTransformer3DModel",
               dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                    audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2, audio_attention_head_dim=8,
                    audio_cross_attention_dim=16, num_layers=1, caption_channels=16, pos_embed_max_pos=8,
                    audio_pos_embed_max_pos=8, base_height=32, base_width=32),
               lambda g: dict(hidden_states=_r(g, 1, 16, 8), audio_hidden_states=_r(g, 1, 5, 8),
                              encoder_hidden_states=_r(g, 1, 6, 16), audio_encoder_hidden_states=_r(g, 1, 6, 16),
                              encoder_attention_mask=torch.ones(1, 6), audio_encoder_attention_mask=torch.ones(1, 6),
                              timestep=torch.tensor([1.0]), num_frames=1, height=4, width=4, audio_num_frames=5),
               outputs=2),
    TinyFamily("hidream", "HiDreamImageTransformer2DModel",
               dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
                    attention_head_dim=8, num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8,
                    num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(4, 2, 2),
                    max_resolution=(32, 32), llama_layers=(0, 1)),
               lambda g: dict(hidden_states=_r(g, 1, 4, 8, 8), timesteps=torch.tensor([1]),
                              encoder_hidden_states_t5=_r(g, 1, 6, 8), encoder_hidden_states_llama3=_r(g, 2, 1, 6, 4),
                              pooled_embeds=_r(g, 1, 8))),
    TinyFamily("lumina2", "Lumina2Transformer2DModel",
               dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=1, num_refiner_layers=1,
                    num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 2, 2),
                    axes_lens=(64, 64, 64), cap_feat_dim=8),
               lambda g: dict(hidden_states=_r(g, 1, 4, 8, 8), timestep=torch.tensor([1.0]),
                              encoder_hidden_states=_r(g, 1, 6, 8),
                              encoder_attention_mask=torch.ones(1, 6, dtype=torch.bool))),
    TinyFamily("z_image", "ZImageTransformer2DModel",
               dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=16, n_layers=1, n_refiner_layers=1,
                    n_heads=2, n_kv_heads=2, cap_feat_dim=8, axes_dims=[4, 2, 2], axes_lens=[64, 64, 64]),
               lambda g: dict(x=[_r(g, 4, 1, 8, 8)], t=torch.tensor([0.5]), cap_feats=[_r(g, 6, 8)])),
    TinyFamily("cogview4", "CogView4Transformer2DModel",
               dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
                    num_attention_heads=2, text_embed_dim=8, time_embed_dim=8, condition_dim=4,
                    pos_embed_max_size=16, sample_size=8, rope_axes_dim=(4, 4)),
               lambda g: dict(hidden_states=_r(g, 1, 4, 8, 8), encoder_hidden_states=_r(g, 1, 6, 8),
                              timestep=torch.tensor([1]), original_size=torch.tensor([[8, 8]]),
                              target_size=torch.tensor([[8, 8]]), crop_coords=torch.tensor([[0, 0]]))),
    TinyFamily("sana", "SanaTransformer2DModel",
               dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                    num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                    caption_channels=8, sample_size=8, patch_size=1),
               lambda g: dict(hidden_states=_r(g, 1, 4, 8, 8), encoder_hidden_states=_r(g, 1, 6, 8),
                              timestep=torch.tensor([1]))),
)}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """The tiny denoiser of family ``name`` with seeded weights, in eval mode."""
    import diffusers

    torch.manual_seed(seed)
    return getattr(diffusers, TINY[name].model)(**TINY[name].config).eval()


def forward(name: str, model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    """One forward pass of ``model`` on seeded inputs; the denoised sample (samples, flattened) as one tensor."""
    with torch.no_grad():
        result = model(**TINY[name].inputs(torch.Generator().manual_seed(seed)), return_dict=False)
    if TINY[name].outputs > 1:
        return torch.cat([t.flatten() for t in result[:TINY[name].outputs]])
    out = result[0]
    return torch.stack(out) if isinstance(out, list) else out


def save(name: str, model: torch.nn.Module, folder: Path) -> Path:
    """The model saved as a diffusers model folder (config.json + safetensors)."""
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def load_folded(name: str, folder: Path) -> torch.nn.Module:
    import diffusers

    return getattr(diffusers, TINY[name].model).from_pretrained(folder).eval()


def linear_modules(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Every ``nn.Linear`` of ``model`` as ``transformer.<path>`` with its ``(out, in)``."""
    return {f"transformer.{n}": (m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def random_adapter(modules: dict[str, tuple[int, int]], *, rank: int = 2, seed: int = 0, scale: float = 0.5,
                   size: float = 0.3) -> Adapter:
    """A LoRA on ``modules`` with random factors (ΔW of order ``size``) and one scale."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, (out, inp) in modules.items():
        A = torch.randn(rank, inp, generator=g) / math.sqrt(inp)
        B = torch.randn(out, rank, generator=g) * size
        layers[name] = LowRank(A=A, B=B, scale=scale)
    return Adapter(layers)


def load_with_diffusers(family: str, file: Path | dict[str, torch.Tensor], model: torch.nn.Module) -> torch.nn.Module:
    """Load a LoRA file into ``model`` with the family's own pipeline loader (``lora_state_dict`` and
    ``load_lora_into_transformer``, what ``load_lora_weights`` calls), as a diffusers user would."""
    import diffusers

    from loramerge.io.formats.families import FAMILIES

    cls = getattr(diffusers, FAMILIES[family].pipeline)
    wants = inspect.signature(cls.lora_state_dict).parameters
    kwargs: dict[str, Any] = {"return_lora_metadata": True}
    if "return_alphas" in wants:
        kwargs["return_alphas"] = True
    source = str(file) if isinstance(file, Path) else dict(file)
    out = cls.lora_state_dict(source, **kwargs)
    state_dict, metadata = out[0], out[-1]
    params = inspect.signature(cls.load_lora_into_transformer).parameters
    call: dict[str, Any] = {"state_dict": state_dict, "transformer": model, "metadata": metadata}
    if "network_alphas" in params:
        call["network_alphas"] = out[1] if "return_alphas" in kwargs else None
    cls.load_lora_into_transformer(**call)
    return model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))
