"""diffusers files: the three key styles, scales from metadata or alphas, writing, and kohya ↔ diffusers alignment."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from loramerge import Adapter, LowRank, UnknownFormat, UnsupportedAdapter, load, merge
from loramerge.io.formats import detect_format
from tests.sd_fixtures import assert_delta, delta_of, gen, kohya_module, lora_factors, ref_lora

UNET_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"


def save(path, tensors, metadata=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def test_peft_style_with_adapter_metadata_uses_its_alphas_and_ranks(tmp_path):
    g = gen(0)
    d1, u1 = lora_factors((8, 8), 4, g)
    d2, u2 = lora_factors((8, 6), 2, g)
    tensors = {f"unet.{UNET_Q}.lora_A.weight": d1, f"unet.{UNET_Q}.lora_B.weight": u1,
               f"text_encoder.{TE_Q}.lora_A.weight": d2, f"text_encoder.{TE_Q}.lora_B.weight": u2}
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "text_encoder.r": 2, "text_encoder.lora_alpha": 2,
            "text_encoder.alpha_pattern": {"q_proj": 1}, "unet.peft_type": "LORA"}
    folder = tmp_path / "lora"
    save(folder / "pytorch_lora_weights.safetensors", tensors, {"lora_adapter_metadata": json.dumps(meta)})
    assert detect_format(folder).name == "diffusers"
    adapter = load(folder)
    assert adapter.source_format == "diffusers"
    assert adapter[f"unet.{UNET_Q}"].scale == 2.0
    assert adapter[f"text_encoder.{TE_Q}"].scale == 0.5  # alpha_pattern matched by PEFT's rule
    assert_delta(delta_of(adapter[f"unet.{UNET_Q}"]), ref_lora(d1, u1, 8.0))


def test_peft_style_without_metadata_has_scale_one_unless_alpha_tensors(tmp_path):
    g = gen(1)
    d1, u1 = lora_factors((8, 8), 4, g)
    d2, u2 = lora_factors((12, 8), 2, g)
    tensors = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": d1,
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": u1,
               "transformer.proj_out.lora_A.weight": d2, "transformer.proj_out.lora_B.weight": u2,
               "transformer.proj_out.alpha": torch.tensor(1.0)}
    adapter = load(save(tmp_path / "flux.safetensors", tensors))
    assert adapter["transformer.transformer_blocks.0.attn.to_q"].scale == 1.0
    assert adapter["transformer.proj_out"].scale == 0.5
    # Flux.1's table first; the diffusers families that share these two generic names follow.
    assert adapter.config["architectures"][0] == "flux"


def test_old_loracompatible_and_attention_processor_styles(tmp_path):
    g = gen(2)
    conv_d, conv_u = lora_factors((8, 8, 3, 3), 2, g)
    q_d, q_u = lora_factors((8, 8), 2, g)
    o_d, o_u = lora_factors((8, 8), 2, g)
    te_d, te_u = lora_factors((16, 8), 2, g)
    tensors = {
        "down_blocks.0.resnets.0.conv1.lora.down.weight": conv_d, "down_blocks.0.resnets.0.conv1.lora.up.weight": conv_u,
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": q_d,
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": q_u,
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": o_d,
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": o_u,
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight": te_d,
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight": te_u,
        "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight": q_d[:, :8],
        "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight": q_u,
    }
    adapter = load(save(tmp_path / "old.safetensors", tensors))
    assert sorted(adapter.modules) == sorted([
        "unet.down_blocks.0.resnets.0.conv1",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "text_encoder.text_model.encoder.layers.0.mlp.fc1",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    ])
    assert_delta(delta_of(adapter["unet.down_blocks.0.resnets.0.conv1"]), ref_lora(conv_d, conv_u, None))


def test_unknown_keys_in_a_diffusers_file_are_listed(tmp_path):
    g = gen(3)
    d, u = lora_factors((8, 8), 2, g)
    tensors = {f"unet.{UNET_Q}.lora_A.weight": d, f"unet.{UNET_Q}.lora_B.weight": u,
               "unet.something.else.weight": torch.zeros(2)}
    with pytest.raises(UnknownFormat, match=r"1 key\(s\) in no diffusers LoRA layout: unet\.something"):
        load(save(tmp_path / "x.safetensors", tensors))


def test_diffusers_writer_and_reader_round_trip(tmp_path):
    g = gen(4)
    layers = {}
    for name, shape, rank, scale in ((f"unet.{UNET_Q}", (8, 8), 3, 0.7), ("unet.down_blocks.0.resnets.0.conv1", (8, 8, 3, 3), 2, -1.5),
                                     (f"text_encoder_2.{TE_Q}", (16, 16), 4, 2.0)):
        d, u = lora_factors(shape, rank, g)
        layers[name] = LowRank(A=d, B=u, scale=scale, kind="conv" if len(shape) == 4 else "linear")
    adapter = Adapter(layers)
    out = adapter.save(tmp_path / "out", format="diffusers")
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    with safetensors.safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] in (2, 3) and meta["text_encoder_2.r"] == 4
    again = load(out)
    for m, lr in layers.items():
        assert_delta(delta_of(again[m]), delta_of(lr))


def test_diffusers_to_kohya_round_trip_has_equal_deltas(tmp_path):
    g = gen(5)
    tensors = {}
    for module, shape in ((f"unet.{UNET_Q}", (640, 640)), ("unet.down_blocks.1.resnets.0.conv1", (640, 320, 3, 3)),
                          (f"text_encoder.{TE_Q}", (768, 768)), (f"text_encoder_2.{TE_Q}", (1280, 1280))):
        d, u = lora_factors(shape, 2, g)
        tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = d, u
    source = load(save(tmp_path / "sdxl.safetensors", tensors))
    assert source.config["architectures"] == ["sdxl"]
    out = source.save(tmp_path / "kohya.safetensors", format="kohya")
    keys = {k.split(".")[0] for k in safetensors.torch.load_file(str(out))}
    assert keys == {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_input_blocks_4_0_in_layers_2",
                    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"}
    again = load(out)
    assert sorted(again.modules) == sorted(source.modules)
    for m in source.modules:
        assert_delta(delta_of(again[m]), delta_of(source[m]))


def test_sdxl_kohya_and_the_same_lora_saved_by_diffusers_merge_module_by_module(tmp_path):
    g = gen(6)
    spec = {  # kohya (SGM) name → (diffusers name, shape)
        "lora_unet_input_blocks_7_1_transformer_blocks_3_attn2_to_k": (
            "unet.down_blocks.2.attentions.0.transformer_blocks.3.attn2.to_k", (1280, 2048)),
        "lora_unet_output_blocks_1_0_in_layers_2": ("unet.up_blocks.0.resnets.1.conv1", (1280, 2560, 3, 3)),
        "lora_unet_middle_block_1_proj_out": ("unet.mid_block.attentions.0.proj_out", (1280, 1280)),
        "lora_te2_text_model_encoder_layers_31_mlp_fc2": ("text_encoder_2.text_model.encoder.layers.31.mlp.fc2", (1280, 5120)),
    }
    kohya, diff = {}, {}
    for name, (module, shape) in spec.items():
        d, u = lora_factors(shape, 2, g)
        kohya.update(kohya_module(name, d, u, 4.0))  # scale 2
        diff[f"{module}.lora_A.weight"], diff[f"{module}.lora_B.weight"] = d * 2, u
    a = load(save(tmp_path / "kohya.safetensors", kohya))
    b = load(save(tmp_path / "diffusers" / "pytorch_lora_weights.safetensors", diff))
    assert sorted(a.modules) == sorted(b.modules) == sorted(m for m, _ in spec.values())
    difference = merge([a, b], weights=[1.0, -1.0])
    assert len(difference) == len(spec)
    for m in difference.modules:
        assert float(delta_of(difference[m]).abs().max()) < 1e-5 * float(delta_of(a[m]).abs().max())


def test_diffusers_writer_refuses_names_without_a_component(tmp_path):
    g = gen(7)
    d, u = lora_factors((8, 8), 2, g)
    adapter = load(save(tmp_path / "opaque.safetensors", kohya_module("lora_unet_joint_blocks_0_x", d, u, 1.0)))
    with pytest.raises(UnsupportedAdapter, match="pipeline component"):
        adapter.save(tmp_path / "out", format="diffusers")
