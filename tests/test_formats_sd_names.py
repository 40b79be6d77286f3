"""The built-in SD 1.x / SD 2.x / SDXL / Flux name tables against the real models and diffusers' own converters."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from loramerge.io.formats.sd_names import (
    ARCHITECTURES,
    SD1_UNET,
    SD2_UNET,
    SDXL_UNET,
    architectures_for_kohya,
    identify,
    unet_modules,
)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SD1_CONFIG = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
)
SD2_CONFIG = dict(SD1_CONFIG, cross_attention_dim=1024, use_linear_projection=True, attention_head_dim=(5, 10, 20, 20))
SDXL_CONFIG = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def _targets(model: torch.nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


@pytest.mark.parametrize(("spec", "config"), [(SD1_UNET, SD1_CONFIG), (SD2_UNET, SD2_CONFIG), (SDXL_UNET, SDXL_CONFIG)],
                         ids=["sd1", "sd2", "sdxl"])
def test_unet_tables_list_every_linear_and_conv_of_the_real_unet(spec, config):
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**config)
    assert {d: s for d, _, s in unet_modules(spec)} == _targets(unet)


def test_flux_table_lists_every_linear_of_the_real_transformer():
    with torch.device("meta"):
        flux = diffusers.FluxTransformer2DModel(guidance_embeds=True)
    ours = {k: v for k, v in ARCHITECTURES["flux"].shapes.items() if k.startswith("transformer.")}
    assert ours == _targets(flux, "transformer.")


@pytest.mark.parametrize(("arch", "component", "config"), [
    ("sd1", "text_encoder", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12)),
    ("sd2", "text_encoder", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23)),
    ("sdxl", "text_encoder_2", dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, projection_dim=1280)),
])
def test_clip_tables_match_the_real_text_encoders(arch, component, config):
    cls = transformers.CLIPTextModelWithProjection if "projection_dim" in config else transformers.CLIPTextModel
    with torch.device("meta"):
        model = cls(transformers.CLIPTextConfig(num_attention_heads=4, **config))
    ours = {k: v for k, v in ARCHITECTURES[arch].shapes.items() if k.startswith(component + ".")}
    # transformers 5 drops CLIPTextModel's ``text_model`` level; LoRA files (and diffusers) keep it.
    inner = "" if hasattr(model, "text_model") else "text_model."
    real = {k: v for k, v in _targets(model, component + "." + inner).items() if not k.endswith(".text_projection")}
    if hasattr(model, "text_projection"):
        real[component + ".text_projection"] = tuple(model.text_projection.weight.shape)
    assert ours == real


def test_t5_table_matches_flux_t5_xxl():
    config = transformers.T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                   feed_forward_proj="gated-gelu", vocab_size=32128)
    with torch.device("meta"):
        model = transformers.T5EncoderModel(config)
    real = {k: v for k, v in _targets(model, "text_encoder_2.").items() if not k.endswith("lm_head")}
    ours = {k: v for k, v in ARCHITECTURES["flux"].shapes.items() if k.startswith("text_encoder_2.")}
    assert ours == real


def _lora_keys(names):
    out = {}
    for n in names:
        out[f"{n}.lora_down.weight"] = torch.zeros(1, 1)
        out[f"{n}.lora_up.weight"] = torch.zeros(1, 1)
        out[f"{n}.alpha"] = torch.tensor(1.0)
    return out


def _diffusers_module(key: str) -> str:
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    key = key.replace(".processor.", ".")
    peft_key = next(iter(convert_unet_state_dict_to_peft({key: 0})))
    return peft_key.rsplit(".lora_", 1)[0]


def test_sdxl_kohya_names_are_the_ones_diffusers_maps_to_our_canonical_names():
    """diffusers' own SGM→diffusers key conversion sends each SDXL kohya name to our canonical module."""
    arch = ARCHITECTURES["sdxl"]
    unet_names = {k: c for c, k in arch.preferred.items() if c.startswith("unet.")}
    assert all(k.startswith("lora_unet_") for k in unet_names)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k" in unet_names
    state, _ = diffusers.StableDiffusionXLPipeline.lora_state_dict(
        _lora_keys(unet_names), unet_config=SimpleNamespace(layers_per_block=2))
    converted = {_diffusers_module(k) for k in state if k.endswith(".down.weight")}
    assert converted == set(unet_names.values())


def test_sd1_kohya_names_convert_to_our_canonical_names_in_diffusers():
    arch = ARCHITECTURES["sd1"]
    unet_names = {k: c for c, k in arch.preferred.items() if c.startswith("unet.")}
    state, _ = diffusers.StableDiffusionPipeline.lora_state_dict(_lora_keys(unet_names))
    assert {_diffusers_module(k) for k in state if k.endswith(".down.weight")} == set(unet_names.values())


def test_flux_kohya_names_convert_like_diffusers_including_fused_qkv_and_the_final_swap():
    arch = ARCHITECTURES["flux"]
    names = {k for c, k in arch.preferred.items() if c.startswith("transformer.")}
    state = {}
    for n in names:
        rows = arch.kohya[n].shape[0]
        state[f"{n}.lora_down.weight"] = torch.ones(1, 4)
        state[f"{n}.lora_up.weight"] = torch.arange(rows, dtype=torch.float32).reshape(rows, 1)
    # diffusers leaves the embedders and final layers without the component prefix; add it back.
    converted = {k if k.startswith("transformer.") else "transformer." + k: v
                 for k, v in diffusers.FluxPipeline.lora_state_dict(state).items()}
    modules = {k.rsplit(".lora_", 1)[0] for k in converted}
    assert modules == {c for c in arch.shapes if c.startswith("transformer.")}
    # Every canonical B is the rows our pieces say (the final modulation's halves swapped).
    for name in names:
        target = arch.kohya[name]
        for p in target.pieces:
            got = converted[f"{p.module}.lora_B.weight"][p.dst:p.dst + p.size, 0]
            assert torch.equal(got, torch.arange(p.src, p.src + p.size, dtype=torch.float32)), name


def test_kohya_spellings_are_unique_within_each_architecture():
    for name in ARCHITECTURES:
        arch = ARCHITECTURES[name]
        preferred = [k for c, k in arch.preferred.items() if not arch.kohya[k].fused]
        assert len(preferred) == len(set(preferred)), name


def test_identification_uses_names_then_shapes():
    assert architectures_for_kohya(["lora_unet_down_blocks_0_attentions_0_proj_in"])[
        "lora_unet_down_blocks_0_attentions_0_proj_in"] == {"sd1", "sd2"}
    sd2_only = {"unet.down_blocks.0.attentions.0.proj_in": (320, 320)}  # linear projection: SD 2.x
    assert identify(sd2_only) == ["sd2"]
    assert identify({"unet.nonexistent": (1, 1)}) == []
    assert identify({"transformer.transformer_blocks.0.attn.to_q": (3072, 3072)}) == ["flux"]
