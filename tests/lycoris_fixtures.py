"""Files written by lycoris-lora itself (4.1.3, its kohya network) for a small SD-shaped UNet and CLIP text encoder,
with the outputs of lycoris's own forward as the oracle.

The UNet has an inpainting-style ``conv_in`` (9 input channels, 3×3), which no built-in table holds at this
shape; the CLIP text encoder is built by the installed transformers, so on transformers ≥ 5 its module paths
have no ``text_model`` level and lycoris names them ``lora_te_encoder_layers_…``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TINY_UNET = dict(sample_size=8, in_channels=9, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
                 cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4)
TINY_TE = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
               max_position_embeddings=8, projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
PRESET = ('enable_conv = true\nunet_target_module = ["Transformer2DModel", "ResnetBlock2D"]\n'
          'unet_target_name = ["conv_in"]\ntext_encoder_target_module = ["CLIPAttention", "CLIPMLP"]\n')


def build_models(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return (UNet2DConditionModel(**TINY_UNET).eval(), CLIPTextModel(CLIPTextConfig(**TINY_TE)).eval())


def run_models(unet: torch.nn.Module, te: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed inputs through both models: (UNet sample, text encoder hidden states)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        text = te(torch.tensor([[0, 5, 9, 1]])).last_hidden_state
        sample = unet(torch.randn(1, 9, 8, 8, generator=g), 3, encoder_hidden_states=torch.randn(1, 4, 8, generator=g)).sample
    return sample, text


def save_pipeline(unet: torch.nn.Module, te: torch.nn.Module, folder: Path) -> Path:
    """A diffusers pipeline folder holding the two models (what ``fold`` and ``--base`` take)."""
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    te.save_pretrained(folder / "text_encoder", safe_serialization=True)
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "text_encoder": ["transformers", "CLIPTextModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def load_pipeline(folder: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    return (UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
            CLIPTextModel.from_pretrained(folder / "text_encoder").eval())


@dataclass
class LycorisFile:
    path: Path
    sample: torch.Tensor  # lycoris's own forward, UNet
    text: torch.Tensor    # lycoris's own forward, text encoder


def write_lycoris(folder: Path, name: str, *, algo: str, dim: int, alpha: float, seed: int = 1,
                  **kwargs: Any) -> LycorisFile:
    """A LyCORIS file written by lycoris-lora's kohya network on the tiny models, with random factors."""
    from lycoris.kohya import create_network

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    unet, te = build_models()
    preset = folder / "preset.toml"
    preset.write_text(PRESET)
    net = create_network(1.0, dim, alpha, None, te, unet, algo=algo, conv_dim=dim, conv_alpha=alpha,
                         preset=str(preset), **kwargs)
    net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.3)
    path = folder / f"{name}.safetensors"
    net.save_weights(str(path), torch.float32, {})
    sample, text = run_models(unet, te)
    return LycorisFile(path, sample, text)
