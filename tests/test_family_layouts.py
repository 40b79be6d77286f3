"""Trainer layouts of the new families, written the way each trainer writes them (test writers below, from
the trainers' key conventions, not from loramerge's writers), through loramerge's ``inspect``, ``convert``
and ``fold``. The oracle is the family's own diffusers loader reading the same file (or, for layouts
diffusers cannot read, the diffusers-style file of the same LoRA)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramerge import fold, load
from loramerge.errors import UnknownFormat, UnsupportedAdapter
from loramerge.io.formats import write_adapter
from tests.cli_helpers import assert_clean_failure, run_cli
from tests.family_fixtures import (
    build,
    forward,
    linear_modules,
    load_folded,
    load_with_diffusers,
    random_adapter,
    relative_error,
    save,
)

pytest.importorskip("diffusers")

# Wan's original (ComfyUI / musubi-tuner / DiffSynth) module names, from the Wan repository's model.py.
WAN_ATTN = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o"}


def wan_original(path: str) -> str | None:
    m = re.fullmatch(r"blocks\.(\d+)\.attn([12])\.(.+)", path)
    if m:
        return f"blocks.{m[1]}.{'self_attn' if m[2] == '1' else 'cross_attn'}.{WAN_ATTN[m[3]]}"
    m = re.fullmatch(r"blocks\.(\d+)\.ffn\.net\.(0\.proj|2)", path)
    if m:
        return f"blocks.{m[1]}.ffn.{m[2][0]}"
    return {"condition_embedder.time_embedder.linear_1": "time_embedding.0",
            "condition_embedder.time_embedder.linear_2": "time_embedding.2",
            "condition_embedder.text_embedder.linear_1": "text_embedding.0",
            "condition_embedder.text_embedder.linear_2": "text_embedding.2",
            "condition_embedder.time_proj": "time_projection.1", "proj_out": "head.head"}.get(path)


def same_name(path: str) -> str:
    return path


# LTX-2's original names (Lightricks' LTX-2 model code) where they are not diffusers' own.
LTX2_RENAMED = {"proj_in": "patchify_proj", "audio_proj_in": "audio_patchify_proj", "time_embed": "adaln_single",
                "audio_time_embed": "audio_adaln_single",
                "av_cross_attn_video_scale_shift": "av_ca_video_scale_shift_adaln_single",
                "av_cross_attn_audio_scale_shift": "av_ca_audio_scale_shift_adaln_single",
                "av_cross_attn_video_a2v_gate": "av_ca_a2v_gate_adaln_single",
                "av_cross_attn_audio_v2a_gate": "av_ca_v2a_gate_adaln_single"}


def ltx2_original(path: str) -> str:
    head, _, rest = path.partition(".")
    return ".".join(filter(None, (LTX2_RENAMED.get(head, head), rest)))


ORIGINAL = {"wan": wan_original, "qwen_image": same_name, "hidream": same_name, "ltx_video": same_name,
            "ltx2": ltx2_original, "z_image": same_name}


def write_layout(adapter, layout: str, family: str, file, *, alpha_factor: float = 2.0, blocks_only=False):
    """``adapter`` (diffusers names, one scale) written in a trainer's layout; alphas carry the scale."""
    tensors = {}
    for module, lr in adapter.layers.items():
        path = module.split(".", 1)[1]
        if blocks_only and not path.startswith(("blocks.", "transformer_blocks.")):
            continue
        rank = lr.rank
        alpha = lr.scale * rank
        if layout in ("comfyui", "musubi", "diffsynth"):
            original = ORIGINAL[family](path)
            if original is None:
                continue
            if layout == "comfyui":  # ComfyUI / AI-Toolkit: diffusion_model.<original>.lora_A/B + alpha
                key, a, b = f"diffusion_model.{original}", "lora_A.weight", "lora_B.weight"
            elif layout == "musubi":  # kohya / musubi-tuner: lora_unet_<original flattened>.lora_down/up + alpha
                key, a, b = "lora_unet_" + original.replace(".", "_"), "lora_down.weight", "lora_up.weight"
            else:  # DiffSynth-Studio: bare original names, PEFT suffixes, no alpha (scale baked in)
                key, a, b = original, "lora_A.default.weight" if family == "qwen_image" else "lora_A.weight", \
                    "lora_B.default.weight" if family == "qwen_image" else "lora_B.weight"
        elif layout == "onetrainer":  # OneTrainer: lora_transformer_<diffusers path flattened>
            key, a, b = "lora_transformer_" + path.replace(".", "_"), "lora_down.weight", "lora_up.weight"
        else:
            raise ValueError(layout)
        # diffusers' Wan converter takes alphas on block modules only, so the oracle file bakes the rest.
        # diffusers' LTX-Video and LTX-2 loaders ignore ``.alpha`` keys (scale 1), so their oracle files bake every scale.
        baked = layout == "diffsynth" or (layout == "comfyui" and not path.startswith(("blocks.", "transformer_blocks."))) \
            or family in ("ltx_video", "ltx2")
        if baked:
            tensors[f"{key}.{a}"] = (lr.A * lr.scale).contiguous()
            tensors[f"{key}.{b}"] = lr.B.contiguous()
        else:
            tensors[f"{key}.{a}"] = lr.A.contiguous()
            tensors[f"{key}.{b}"] = lr.B.contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(file))
    return file


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout-bases")
    return {name: save(name, build(name), root / name) for name in ("wan", "qwen_image", "hidream", "ltx_video", "ltx2", "z_image", "sd3")}


CASES = [("wan", "comfyui"), ("wan", "musubi"), ("wan", "diffsynth"), ("qwen_image", "comfyui"),
         ("qwen_image", "musubi"), ("qwen_image", "diffsynth"), ("hidream", "comfyui"), ("ltx_video", "comfyui"),
         ("ltx2", "comfyui"), ("z_image", "comfyui")]


@pytest.mark.parametrize(("family", "layout"), CASES)
def test_trainer_layout_reads_like_the_family_loader_and_folds(family, layout, bases, tmp_path):
    adapter = random_adapter(linear_modules(build(family)), seed=5, scale=0.25)
    file = write_layout(adapter, layout, family, tmp_path / "lora.safetensors", blocks_only=layout == "musubi")
    ours = load(file)
    assert ours.config["architectures"] == [family]
    # diffusers reads DiffSynth's bare names as ComfyUI spells them (what ComfyUI's loader does too)
    oracle = {f"diffusion_model.{k}": v for k, v in load_file(str(file)).items()} if layout == "diffsynth" else file
    expected = forward(family, load_with_diffusers(family, oracle, build(family)))

    fold(bases[family], file, output=tmp_path / "folded", device="cpu")
    assert relative_error(forward(family, load_folded(family, tmp_path / "folded")), expected) < 1e-4

    # convert to diffusers-style: the family loader gives the same outputs
    assert run_cli("convert", file, "-o", tmp_path / "conv", "--to", "diffusers").exit_code == 0
    converted = load_with_diffusers(family, tmp_path / "conv" / "pytorch_lora_weights.safetensors", build(family))
    assert relative_error(forward(family, converted), expected) < 1e-4


@pytest.mark.parametrize("family", ["wan", "sd3"])
def test_onetrainer_names_resolve_through_the_family_module_list(family, bases, tmp_path):
    adapter = random_adapter(linear_modules(build(family)), seed=7)
    file = write_layout(adapter, "onetrainer", family, tmp_path / "ot.safetensors")
    ours = load(file)
    assert sorted(ours.layers) == sorted(adapter.layers)
    reference = write_adapter(adapter, tmp_path / "ref", format="diffusers")
    expected = forward(family, load_with_diffusers(family, reference / "pytorch_lora_weights.safetensors", build(family)))
    fold(bases[family], file, output=tmp_path / "folded", device="cpu")
    assert relative_error(forward(family, load_folded(family, tmp_path / "folded")), expected) < 1e-4


@pytest.mark.parametrize(("family", "layout"), [("wan", "comfyui"), ("wan", "kohya"), ("qwen_image", "comfyui"),
                                                ("qwen_image", "kohya"), ("hidream", "comfyui")])
def test_writers_in_trainer_layouts_convert_back_through_diffusers(family, layout, tmp_path):
    """Our ComfyUI/musubi output, converted by the family's diffusers converter, gives our deltas back."""
    model = build(family)
    modules = linear_modules(model)
    if layout == "kohya":
        modules = {m: s for m, s in modules.items() if m.startswith(("transformer.blocks.", "transformer.transformer_blocks."))}
    adapter = random_adapter(modules, seed=9, scale=0.75)
    adapter.config["architectures"] = [family]
    out = write_adapter(adapter, tmp_path / "out.safetensors", format=layout)
    with torch.no_grad():
        expected = forward(family, load_with_diffusers(family, write_adapter(adapter, tmp_path / "ref", format="diffusers")
                                                       / "pytorch_lora_weights.safetensors", build(family)))
        got = forward(family, load_with_diffusers(family, out, build(family)))
    assert relative_error(got, expected) < 1e-4
    again = load(out)
    for module, lr in adapter.layers.items():
        assert torch.allclose(again.layers[module].product(), lr.product(), atol=1e-5)


def test_inspect_with_base_reports_coverage(bases, tmp_path):
    adapter = random_adapter({m: s for m, s in linear_modules(build("wan")).items() if ".attn1." in m}, seed=2)
    file = write_layout(adapter, "comfyui", "wan", tmp_path / "lora.safetensors")
    result = run_cli("inspect", file, "--base", bases["wan"], "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    coverage = info["coverage"]
    assert coverage["matched"]["transformer.blocks.0.attn1.to_q"] == ["blocks.0.attn1.to_q.weight"]
    assert coverage["unmatched"] == {}
    assert "blocks.0.attn2.to_q.weight" in coverage["untouched"]
    assert "blocks.1.attn1.to_out.0.weight" not in coverage["untouched"]  # adapted
    assert "blocks.0.ffn.net.0.proj.weight" not in coverage["untouched"]  # not a kind the LoRA adapts
    text = run_cli("inspect", file, "--base", bases["wan"]).stdout
    assert "untouched: blocks.0.attn2.to_q.weight" in text


def test_unknown_key_names_it_and_the_nearest_base_names_and_skip_unknown_lists_it(bases, tmp_path):
    adapter = random_adapter({"transformer.blocks.0.attn1.to_q": (16, 16)}, seed=2)
    file = write_layout(adapter, "comfyui", "wan", tmp_path / "lora.safetensors")
    tensors = load_file(str(file))
    tensors["diffusion_model.blocks.0.self_attn.qq.lora_A.weight"] = torch.ones(2, 16)
    tensors["diffusion_model.blocks.0.self_attn.qq.lora_B.weight"] = torch.ones(16, 2)
    save_file(tensors, str(file))
    assert_clean_failure(run_cli("inspect", file, "--base", bases["wan"]), "self_attn.qq", "nearest base names")
    result = run_cli("inspect", file, "--base", bases["wan"], "--skip-unknown", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["skipped"] == ["diffusion_model.blocks.0.self_attn.qq"]
    assert math.isclose(len(info["modules"]), 1)


def lycoris_on(family: str, folder, *, algo: str, **kwargs):
    """A LyCORIS file that lycoris-lora writes for the family's tiny denoiser (SimpleTuner's ``lycoris_`` layout),
    and lycoris's own forward with it applied."""
    import logging

    from lycoris import LycorisNetwork, create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    model = build(family)
    attention = {"wan": "WanAttention", "qwen_image": "Attention", "flux": "FluxAttention"}[family]
    LycorisNetwork.apply_preset({"target_module": [attention, "FeedForward"]})
    net = create_lycoris(model, 1.0, linear_dim=2, linear_alpha=1.0, algo=algo, **kwargs)
    net.apply_to()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.3)
    path = folder / f"{family}-{algo}.safetensors"
    net.save_weights(str(path), torch.float32, {})
    return path, forward(family, model)


@pytest.mark.parametrize(("family", "algo"), [("wan", "lokr"), ("wan", "loha"), ("qwen_image", "lokr")])
def test_lycoris_on_new_families_folds_converts_and_stays_factored(family, algo, bases, tmp_path):
    pytest.importorskip("lycoris")
    path, expected = lycoris_on(family, tmp_path, algo=algo, **({"factor": 4} if algo == "lokr" else {}))
    adapter = load(path)
    assert adapter.config["architectures"] == [family]
    fold(bases[family], path, output=tmp_path / "folded", device="cpu")
    assert relative_error(forward(family, load_folded(family, tmp_path / "folded")), expected) < 1e-4
    # diffusers-style output (exact B@A) loads with the family's own loader
    assert run_cli("convert", path, "-o", tmp_path / "conv", "--to", "diffusers").exit_code == 0
    loaded = load_with_diffusers(family, tmp_path / "conv" / "pytorch_lora_weights.safetensors", build(family))
    assert relative_error(forward(family, loaded), expected) < 1e-4
    # re-saved as LyCORIS: the same tensors, not an expanded LoCon
    assert run_cli("convert", path, "-o", tmp_path / "again.safetensors").exit_code == 0
    before, after = load_file(str(path)), load_file(str(tmp_path / "again.safetensors"))
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)


def test_lycoris_in_musubi_names_resolves_through_the_converter(bases, tmp_path):
    pytest.importorskip("lycoris")
    path, expected = lycoris_on("wan", tmp_path, algo="lokr", factor=4)
    renamed = {}
    for key, value in load_file(str(path)).items():
        module, suffix = key.split(".", 1)
        dotted = module.removeprefix("lycoris_")
        for diffusers_path in linear_modules(build("wan")):
            if diffusers_path.split(".", 1)[1].replace(".", "_") == dotted:
                renamed[f"lora_unet_{wan_original(diffusers_path.split('.', 1)[1]).replace('.', '_')}.{suffix}"] = value
    save_file(renamed, str(tmp_path / "musubi.safetensors"))
    fold(bases["wan"], tmp_path / "musubi.safetensors", output=tmp_path / "folded", device="cpu")
    assert relative_error(forward("wan", load_folded("wan", tmp_path / "folded")), expected) < 1e-4


def test_xlabs_flux_layout_reads_like_diffusers(tmp_path):
    """XLabs' Flux LoRA: ``double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight``, one shared
    ``down`` for the fused q, k, v (XLabs' x-flux trainer)."""
    model = build("flux")
    h = model.config.num_attention_heads * model.config.attention_head_dim
    g = torch.Generator().manual_seed(11)
    tensors = {}
    for stream in ("1", "2"):
        for kind, rows in (("qkv", 3 * h), ("proj", h)):
            key = f"double_blocks.0.processor.{kind}_lora{stream}"
            tensors[f"{key}.down.weight"] = torch.randn(4, h, generator=g) / math.sqrt(h)
            tensors[f"{key}.up.weight"] = torch.randn(rows, 4, generator=g) * 0.3
    save_file(tensors, str(tmp_path / "xlabs.safetensors"))
    ours = load(tmp_path / "xlabs.safetensors")
    assert ours.source_format == "comfyui" and ours.config["architectures"][0] == "flux"
    assert "transformer.transformer_blocks.0.attn.add_k_proj" in ours.layers
    folder = save("flux", model, tmp_path / "base")
    expected = forward("flux", load_with_diffusers("flux", tmp_path / "xlabs.safetensors", build("flux")))
    fold(folder, tmp_path / "xlabs.safetensors", output=tmp_path / "folded", device="cpu")
    assert relative_error(forward("flux", load_folded("flux", tmp_path / "folded")), expected) < 1e-4


def test_combine_of_two_trainer_files_loads_in_the_family_loader(bases, tmp_path):
    """``combine`` of a ComfyUI and a musubi Wan LoRA: the diffusers output is the sum of the two."""
    modules = {m: s for m, s in linear_modules(build("wan")).items() if m.startswith("transformer.blocks.")}
    first = write_layout(random_adapter(modules, seed=1), "comfyui", "wan", tmp_path / "a.safetensors")
    second = write_layout(random_adapter(modules, seed=2, scale=0.1), "musubi", "wan", tmp_path / "b.safetensors")
    result = run_cli("combine", first, second, "-o", tmp_path / "sum", "--format", "diffusers", "--weights", "0.5,1")
    assert result.exit_code == 0, result.output
    got = forward("wan", load_with_diffusers("wan", tmp_path / "sum" / "pytorch_lora_weights.safetensors", build("wan")))
    fold(bases["wan"], [first, second], output=tmp_path / "folded", weights=[0.5, 1.0], device="cpu")
    assert relative_error(got, forward("wan", load_folded("wan", tmp_path / "folded"))) < 1e-4


# Original (ComfyUI / AI-Toolkit) module names and the diffusers module whose shape each has (× rows for fused
# q, k, v), from each family's original model code.
ORIGINAL_MODULES = {
    "hunyuan_video": [("double_blocks.0.img_attn_qkv", "transformer_blocks.0.attn.to_q", 3),
                      ("double_blocks.0.img_attn_proj", "transformer_blocks.0.attn.to_out.0", 1),
                      ("double_blocks.0.img_mlp.fc1", "transformer_blocks.0.ff.net.0.proj", 1),
                      ("double_blocks.0.img_mlp.fc2", "transformer_blocks.0.ff.net.2", 1),
                      ("double_blocks.0.img_mod.linear", "transformer_blocks.0.norm1.linear", 1),
                      ("double_blocks.0.txt_attn_qkv", "transformer_blocks.0.attn.add_q_proj", 3),
                      ("double_blocks.0.txt_attn_proj", "transformer_blocks.0.attn.to_add_out", 1),
                      ("double_blocks.0.txt_mlp.fc1", "transformer_blocks.0.ff_context.net.0.proj", 1)],
    "flux2": [("double_blocks.0.img_attn.qkv", "transformer_blocks.0.attn.to_q", 3),
              ("double_blocks.0.txt_attn.qkv", "transformer_blocks.0.attn.add_q_proj", 3),
              ("single_blocks.0.linear1", "single_transformer_blocks.0.attn.to_qkv_mlp_proj", 1),
              ("single_blocks.0.linear2", "single_transformer_blocks.0.attn.to_out", 1)],
}


@pytest.mark.parametrize("family", sorted(ORIGINAL_MODULES))
def test_original_layouts_with_fused_qkv_read_like_the_family_loader(family, tmp_path):
    model = build(family)
    file = original_file(family, ORIGINAL_MODULES[family], tmp_path / "lora.safetensors")
    assert load(file).config["architectures"] == [family]
    expected = forward(family, load_with_diffusers(family, file, build(family)))
    assert relative_error(expected, forward(family, model)) > 1e-3
    folder = save(family, model, tmp_path / "base")
    fold(folder, file, output=tmp_path / "folded", device="cpu")
    assert relative_error(forward(family, load_folded(family, tmp_path / "folded")), expected) < 1e-4
    assert run_cli("convert", file, "-o", tmp_path / "conv", "--to", "diffusers").exit_code == 0
    converted = load_with_diffusers(family, tmp_path / "conv" / "pytorch_lora_weights.safetensors", build(family))
    assert relative_error(forward(family, converted), expected) < 1e-4


def test_lumina2_names_resolve_at_the_released_width():
    """diffusers' Lumina 2 converter splits q, k, v with Lumina-Image-2.0's widths written in, so its files are
    resolved at that size (the probe is rank 1, so this costs nothing)."""
    from loramerge.io.formats.converted import ProbeModule, resolve

    modules = [("layers.0.attention.qkv", (2304 + 768 + 768, 2304)), ("layers.0.attention.out", (2304, 2304)),
               ("layers.0.feed_forward.w1", (6144, 2304)), ("layers.0.feed_forward.w2", (2304, 6144)),
               ("layers.0.feed_forward.w3", (6144, 2304)), ("layers.0.adaLN_modulation.1", (9216, 1024))]
    probes = [ProbeModule(f"diffusion_model.{n}", s, f"diffusion_model.{n}.lora_A.weight",
                          f"diffusion_model.{n}.lora_B.weight") for n, s in modules]
    found = resolve(probes, origin="probe")
    assert found.family == "lumina2" and not found.unmapped
    qkv = found.targets["diffusion_model.layers.0.attention.qkv"]
    assert [(p.module, p.src, p.size) for p in qkv.pieces] == [
        ("transformer.layers.0.attn.to_q", 0, 2304), ("transformer.layers.0.attn.to_k", 2304, 768),
        ("transformer.layers.0.attn.to_v", 3072, 768)]


def test_a_lora_for_one_family_folded_into_another_names_both(bases, tmp_path):
    file = write_layout(random_adapter(linear_modules(build("wan")), seed=1), "comfyui", "wan",
                        tmp_path / "wan.safetensors")
    result = run_cli("fold", bases["qwen_image"], file, "-o", tmp_path / "out")
    assert_clean_failure(result, "Wan 2.1/2.2", "QwenImageTransformer2DModel")
    assert not (tmp_path / "out").exists()


def test_without_diffusers_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    import sys

    file = write_layout(random_adapter({"transformer.blocks.0.attn1.to_q": (16, 16)}), "comfyui", "wan",
                        tmp_path / "lora.safetensors")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now fails
    assert_clean_failure(run_cli("inspect", file), "pip install 'loramerge[diffusion]'")


# Flux.1's original (BFL) module names, from BFL's flux model code, with the diffusers module whose shape each has
# and how many of its rows it stacks (fused q, k, v). ``single_blocks.N.linear1`` is left out: diffusers' Flux.1
# converter splits it at Flux.1-dev's widths only (3072·3 + 12288 rows), so its loader cannot read it on a tiny model
# (loramerge can: see test_flux1_linear1_at_any_width_splits_as_at_the_released_one).
FLUX1_ORIGINAL = [
    ("double_blocks.0.img_mod.lin", "transformer_blocks.0.norm1.linear", 1),
    ("double_blocks.0.txt_mod.lin", "transformer_blocks.0.norm1_context.linear", 1),
    ("double_blocks.0.img_attn.qkv", "transformer_blocks.0.attn.to_q", 3),
    ("double_blocks.0.img_attn.proj", "transformer_blocks.0.attn.to_out.0", 1),
    ("double_blocks.0.txt_attn.qkv", "transformer_blocks.0.attn.add_q_proj", 3),
    ("double_blocks.0.txt_attn.proj", "transformer_blocks.0.attn.to_add_out", 1),
    ("double_blocks.0.img_mlp.0", "transformer_blocks.0.ff.net.0.proj", 1),
    ("double_blocks.0.img_mlp.2", "transformer_blocks.0.ff.net.2", 1),
    ("double_blocks.0.txt_mlp.0", "transformer_blocks.0.ff_context.net.0.proj", 1),
    ("double_blocks.0.txt_mlp.2", "transformer_blocks.0.ff_context.net.2", 1),
    ("single_blocks.0.linear2", "single_transformer_blocks.0.proj_out", 1),
    ("single_blocks.0.modulation.lin", "single_transformer_blocks.0.norm.linear", 1),
    ("img_in", "x_embedder", 1), ("txt_in", "context_embedder", 1),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1", 1),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2", 1),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1", 1),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2", 1),
    ("final_layer.linear", "proj_out", 1), ("final_layer.adaLN_modulation.1", "norm_out.linear", 1),
]


def original_file(family, modules, file, *, a="lora_A.weight", b="lora_B.weight", seed=13, rank=3):
    """A LoRA on original module names behind ``diffusion_model.`` (ComfyUI / AI-Toolkit), factors spelled a/b."""
    shapes = linear_modules(build(family))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for original, diffusers_module, fused in modules:
        out, inp = shapes[f"transformer.{diffusers_module}"]
        tensors[f"diffusion_model.{original}.{a}"] = torch.randn(rank, inp, generator=g) / math.sqrt(inp)
        tensors[f"diffusion_model.{original}.{b}"] = torch.randn(fused * out, rank, generator=g) * 0.3
    save_file(tensors, str(file))
    return file


def test_flux1_comfyui_file_with_peft_suffixes_reads_as_flux1(tmp_path):
    """AI-Toolkit writes Flux.1 LoRAs as ``diffusion_model.<BFL name>.lora_A/lora_B``; diffusers' Flux.1 loader
    reads that layout only with kohya's ``lora_down``/``lora_up`` (what ComfyUI saves), so the oracle is that twin."""
    peft_file = original_file("flux", FLUX1_ORIGINAL, tmp_path / "peft.safetensors")
    twin = original_file("flux", FLUX1_ORIGINAL, tmp_path / "kohya.safetensors", a="lora_down.weight",
                         b="lora_up.weight")
    ours = load(peft_file)
    assert ours.config["architectures"] == ["flux"]
    assert "transformer.transformer_blocks.0.norm1.linear" in ours.layers
    model = build("flux")
    # diffusers' Flux.1 converter names the top-level modules (img_in, time_in, final_layer …) without their
    # ``transformer.`` prefix, so its loader drops them; the oracle gives them the prefix back.
    oracle = converted_with_prefix("flux", str(twin))
    assert "transformer.x_embedder.lora_A.weight" in oracle
    folds_and_converts_like("flux", model, peft_file, oracle, tmp_path)


def converted_with_prefix(family, source):
    """The family converter's diffusers-named state dict of ``source``, every key under ``transformer.``:
    diffusers' kohya/ComfyUI Flux.1 converter (Chroma's too) names the top-level modules (img_in, time_in,
    final_layer …) without it, so its own loader drops them."""
    import diffusers

    from loramerge.io.formats.families import FAMILIES

    converted = getattr(diffusers, FAMILIES[family].pipeline).lora_state_dict(source)
    converted = converted[0] if isinstance(converted, tuple) else converted
    return {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in converted.items()}


def folds_and_converts_like(family, model, file, oracle, tmp_path):
    """loramerge's fold of ``file`` and its ``--to diffusers`` output give what the family loader gives for ``oracle``."""
    expected = forward(family, load_with_diffusers(family, oracle, build(family)))
    assert relative_error(expected, forward(family, model)) > 1e-3
    fold(save(family, model, tmp_path / "base"), file, output=tmp_path / "folded", device="cpu")
    assert relative_error(forward(family, load_folded(family, tmp_path / "folded")), expected) < 1e-4
    assert run_cli("convert", file, "-o", tmp_path / "conv", "--to", "diffusers").exit_code == 0
    converted = load_with_diffusers(family, tmp_path / "conv" / "pytorch_lora_weights.safetensors", build(family))
    assert relative_error(forward(family, converted), expected) < 1e-4


def test_flux_original_names_both_families_share_are_told_apart_by_shape():
    """Attention and MLP names are the same in Flux.1 and Flux.2; the MLP's aspect ratio is not (Flux.1 h→4h,
    Flux.2 h→6h, SwiGLU), at any width. Attention alone fits both, and both are recorded."""
    from loramerge.io.formats.converted import ProbeModule, resolve

    def probes(modules):
        return [ProbeModule(f"diffusion_model.{n}", s, f"diffusion_model.{n}.lora_A.weight",
                            f"diffusion_model.{n}.lora_B.weight") for n, s in modules]

    flux1 = resolve(probes([("double_blocks.0.img_attn.qkv", (96, 32)), ("double_blocks.0.img_mlp.0", (128, 32)),
                            ("double_blocks.0.img_mlp.2", (32, 128))]), origin="probe")
    flux2 = resolve(probes([("double_blocks.0.img_attn.qkv", (96, 32)), ("double_blocks.0.img_mlp.0", (192, 32)),
                            ("double_blocks.0.img_mlp.2", (32, 96))]), origin="probe")
    attention = resolve(probes([("double_blocks.0.img_attn.qkv", (96, 32))]), origin="probe")
    assert flux1.family == "flux" and flux2.family == "flux2"
    assert flux2.targets["diffusion_model.double_blocks.0.img_mlp.0"].pieces[0].module == \
        "transformer.transformer_blocks.0.ff.linear_in"
    assert attention.family == "flux" and "flux2" in attention.also
    # linear1 at Flux.1-dev's width: diffusers' converter splits it into q, k, v and the MLP input
    linear1 = resolve(probes([("single_blocks.0.linear1", (21504, 3072)), ("single_blocks.0.modulation.lin", (9216, 3072))]),
                      origin="probe").targets["diffusion_model.single_blocks.0.linear1"]
    assert [(p.module.rsplit(".", 1)[1], p.src, p.size) for p in linear1.pieces] == [
        ("to_q", 0, 3072), ("to_k", 3072, 3072), ("to_v", 6144, 3072), ("proj_mlp", 9216, 12288)]


def test_control_norm_names_are_those_of_diffusers_bfl_converter():
    """diffusers' BFL control converter only takes a whole Flux.1-dev file, so it checks loramerge's names for
    the norm scales on a skeleton of one (every module BFL's control LoRAs train, 1-wide factors, numbered scales)."""
    import diffusers

    from loramerge.io.formats.comfyui import control_norm

    rows = {"img_attn.qkv": 3, "txt_attn.qkv": 3, "linear1": 21504, "adaLN_modulation.1": 2}
    modules = [f"double_blocks.{i}.{m}" for i in range(19) for m in (
        "img_mod.lin", "txt_mod.lin", "img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj",
        "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2")]
    modules += [f"single_blocks.{i}.{m}" for i in range(38) for m in ("linear1", "linear2", "modulation.lin")]
    modules += ["time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
                "guidance_in.in_layer", "guidance_in.out_layer", "txt_in", "img_in", "final_layer.linear",
                "final_layer.adaLN_modulation.1"]
    skeleton = {}
    for m in modules:
        rank = 2 if m.endswith("adaLN_modulation.1") else 1  # diffusers swaps the halves of A too
        skeleton[f"{m}.lora_A.weight"] = torch.ones(rank, 1)
        skeleton[f"{m}.lora_B.weight"] = torch.ones(next((r for k, r in rows.items() if m.endswith(k)), 1), rank)
    norms = [f"double_blocks.{i}.{s}_attn.norm.{q}_norm.scale" for i in range(19) for s in ("img", "txt")
             for q in ("query", "key")] + [f"single_blocks.{i}.norm.{q}_norm.scale" for i in range(38)
                                           for q in ("query", "key")]
    skeleton.update({n: torch.tensor([float(i)]) for i, n in enumerate(norms)})
    converted = diffusers.FluxPipeline.lora_state_dict(skeleton)
    converted = converted[0] if isinstance(converted, tuple) else converted
    for i, name in enumerate(norms):
        assert converted[control_norm(name)].item() == i, name


def control_file(model, file, *, seed=17, rank=3):
    """A BFL Flux control LoRA for ``model`` (BFL's flux-*-lora layout: bare BFL names, lora_A/lora_B, a
    widened ``img_in`` taking the control latents beside the image latents, and new q/k norm scales), and the
    same LoRA in diffusers' names (their mapping: diffusers' BFL converter, see the test above)."""
    shapes = linear_modules(model)
    g = torch.Generator().manual_seed(seed)
    bfl, ours = {}, {}
    kohya_twin = {}
    for original, diffusers_module, fused in FLUX1_ORIGINAL:
        out, inp = shapes[f"transformer.{diffusers_module}"]
        if original == "img_in":
            inp *= 2
        A = torch.randn(rank, inp, generator=g) / math.sqrt(inp)
        B = torch.randn(fused * out, rank, generator=g) * 0.3
        bfl[f"{original}.lora_A.weight"], bfl[f"{original}.lora_B.weight"] = A, B
        kohya_twin[f"diffusion_model.{original}.lora_down.weight"] = A
        kohya_twin[f"diffusion_model.{original}.lora_up.weight"] = B
    head = model.config.attention_head_dim
    norms = {"double_blocks.0.img_attn.norm.query_norm.scale": "transformer_blocks.0.attn.norm_q.weight",
             "double_blocks.0.img_attn.norm.key_norm.scale": "transformer_blocks.0.attn.norm_k.weight",
             "double_blocks.0.txt_attn.norm.query_norm.scale": "transformer_blocks.0.attn.norm_added_q.weight",
             "double_blocks.0.txt_attn.norm.key_norm.scale": "transformer_blocks.0.attn.norm_added_k.weight",
             "single_blocks.0.norm.query_norm.scale": "single_transformer_blocks.0.attn.norm_q.weight",
             "single_blocks.0.norm.key_norm.scale": "single_transformer_blocks.0.attn.norm_k.weight"}
    for original, name in norms.items():
        bfl[original] = 1 + 0.5 * torch.randn(head, generator=g)
        ours[f"transformer.{name}"] = bfl[original]
    save_file(bfl, str(file))
    ours.update(converted_with_prefix("flux", kohya_twin))
    return file, ours


def flux_control_forward(model):
    """The tiny Flux model's forward on image latents with control latents beside them (twice the channels)."""
    g = torch.Generator().manual_seed(1)
    channels = model.config.in_channels
    inputs = dict(hidden_states=torch.randn(1, 16, channels, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([1.0]),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def flux_pipeline_with(lora):
    import diffusers

    pipe = diffusers.FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                  tokenizer_2=None, transformer=build("flux"))
    pipe.load_lora_weights(lora)
    return pipe.transformer


def test_bfl_flux_control_lora_reads_converts_and_is_refused_by_fold_and_merge(tmp_path):
    model = build("flux")
    file, diffusers_named = control_file(model, tmp_path / "canny.safetensors")
    ours = load(file)
    assert ours.config["architectures"][0] == "flux"
    assert ours.layers["transformer.x_embedder"].A.shape[1] == 2 * model.config.in_channels
    assert sorted(ours.full_weights) == sorted(k for k in diffusers_named if k.endswith("norm_q.weight")
                                               or k.endswith("norm_k.weight") or "norm_added" in k)
    expected = flux_control_forward(flux_pipeline_with(dict(diffusers_named)))
    assert expected.shape[-1] == model.config.in_channels  # the widened model still predicts image latents

    assert run_cli("convert", file, "-o", tmp_path / "conv", "--to", "diffusers").exit_code == 0
    converted = flux_pipeline_with(str(tmp_path / "conv" / "pytorch_lora_weights.safetensors"))
    assert converted.config.in_channels == 2 * model.config.in_channels
    assert relative_error(flux_control_forward(converted), expected) < 1e-4

    # fold widens Flux.1's 64-channel x_embedder only (tests/test_flux_control.py); this tiny model has 4
    base = save("flux", model, tmp_path / "base")
    assert_clean_failure(run_cli("fold", base, file, "-o", tmp_path / "out"), "canny.safetensors", "x_embedder",
                         "FluxControlPipeline")
    assert not (tmp_path / "out").exists()
    other = write_adapter(random_adapter(linear_modules(model), seed=1), tmp_path / "style", format="diffusers")
    assert_clean_failure(run_cli("combine", file, other, "-o", tmp_path / "merged"), "canny.safetensors", "norm")


# Chroma's original modules are Flux.1's without the per-block modulation (a distilled guidance layer replaces it).
CHROMA_ORIGINAL = [m for m in FLUX1_ORIGINAL if "mod" not in m[0] and not m[0].startswith(("time_in", "vector_in"))]


def kohya_file(family, modules, file, *, seed=19):
    """A LoRA on original module names as kohya's sd-scripts, musubi-tuner and AI-Toolkit's kohya output write
    them: ``lora_unet_<BFL name, dots as _>`` with alphas, and no ``ss_*`` metadata saying the family."""
    shapes = linear_modules(build(family))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for original, diffusers_module, fused in modules:
        out, inp = shapes[f"transformer.{diffusers_module}"]
        name = "lora_unet_" + original.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, inp, generator=g) / math.sqrt(inp)
        tensors[f"{name}.lora_up.weight"] = torch.randn(fused * out, 4, generator=g) * 0.3
        # diffusers' Flux.1/Chroma converter ignores the alpha of final_layer modules (kohya applies alpha / rank
        # to every module): there the oracle file has alpha = rank.
        tensors[f"{name}.alpha"] = torch.tensor(4.0 if original.startswith("final_layer") else 2.0)
    save_file(tensors, str(file))
    return file


def test_chroma_kohya_file_reads_like_the_chroma_loader_and_folds(tmp_path):
    """kohya's sd-scripts trains Chroma with its Flux.1 network: ``lora_unet_<BFL name, dots as _>`` with alphas."""
    model = build("chroma")
    file = kohya_file("chroma", CHROMA_ORIGINAL, tmp_path / "chroma.safetensors")
    assert "chroma" in load(file).config["architectures"]
    folds_and_converts_like("chroma", model, file, converted_with_prefix("chroma", str(file)), tmp_path)


# Flux.2's original (BFL flux2) names that diffusers' Flux.2 kohya converter maps. The double blocks have no
# modulation of their own (one per stream for the whole model), the MLP is SwiGLU (h → 6h → 3h → h) and
# linear1 fuses q, k, v with both MLP inputs (9h rows).
FLUX2_KOHYA = [
    ("double_blocks.0.img_attn.qkv", "transformer_blocks.0.attn.to_q", 3),
    ("double_blocks.0.img_attn.proj", "transformer_blocks.0.attn.to_out.0", 1),
    ("double_blocks.0.txt_attn.qkv", "transformer_blocks.0.attn.add_q_proj", 3),
    ("double_blocks.0.txt_attn.proj", "transformer_blocks.0.attn.to_add_out", 1),
    ("double_blocks.0.img_mlp.0", "transformer_blocks.0.ff.linear_in", 1),
    ("double_blocks.0.img_mlp.2", "transformer_blocks.0.ff.linear_out", 1),
    ("double_blocks.0.txt_mlp.0", "transformer_blocks.0.ff_context.linear_in", 1),
    ("double_blocks.0.txt_mlp.2", "transformer_blocks.0.ff_context.linear_out", 1),
    ("single_blocks.0.linear1", "single_transformer_blocks.0.attn.to_qkv_mlp_proj", 1),
    ("single_blocks.0.linear2", "single_transformer_blocks.0.attn.to_out", 1),
    ("img_in", "x_embedder", 1), ("txt_in", "context_embedder", 1),
    ("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1", 1),
    ("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2", 1),
    ("final_layer.linear", "proj_out", 1),
]
# Flux.1's (linear1 left out: diffusers' Flux.1 converter splits it at Flux.1-dev's widths only).
FLUX_KOHYA = {"flux": FLUX1_ORIGINAL, "flux2": FLUX2_KOHYA}


@pytest.mark.parametrize("family", sorted(FLUX_KOHYA))
def test_flux_kohya_files_without_metadata_read_as_their_family(family, tmp_path):
    """Without ``ss_base_model_version`` (musubi-tuner, AI-Toolkit) the names both Flux generations share are told
    apart by their aspect ratios (Flux.1's MLP h → 4h, Flux.2's h → 6h; linear1 7h and 9h) and by the names only one
    has; each file then folds and converts to what its family's own loader gives."""
    file = kohya_file(family, FLUX_KOHYA[family], tmp_path / "lora.safetensors")
    assert load(file).config["architectures"][0] == family
    folds_and_converts_like(family, build(family), file, converted_with_prefix(family, str(file)), tmp_path)
    other = "flux2" if family == "flux" else "flux"
    result = run_cli("fold", save(other, build(other), tmp_path / "other"), file, "-o", tmp_path / "wrong")
    labels = {"flux": "Flux.1", "flux2": "Flux.2"}
    assert_clean_failure(result, labels[family], "Flux2Transformer2DModel" if other == "flux2" else "FluxTransformer2DModel")


def test_flux_kohya_file_on_attention_only_records_both_families(tmp_path):
    """q, k, v and the output projections have the same names and shapes in Flux.1 and Flux.2, and become the same
    diffusers modules: such a file is recorded for both, and folds into a Flux.2 like Flux.2's loader."""
    attention = [m for m in FLUX2_KOHYA if "_attn." in m[0]]
    file = kohya_file("flux2", attention, tmp_path / "attention.safetensors")
    assert load(file).config["architectures"][:2] == ["flux", "flux2"]
    folds_and_converts_like("flux2", build("flux2"), file, converted_with_prefix("flux2", str(file)), tmp_path)


# Original layouts that fuse diffusers modules (q, k, v …), written by loramerge. At toy widths some of the family
# converters cannot split what they fuse (HunyuanVideo's splits single_blocks.N.linear1 at 3072 rows), so those
# modules are checked at the released widths below. HunyuanVideo's converter swaps the halves of lora_A as well as
# lora_B's rows on final_layer.adaLN_modulation.1 (written with A repeated, so it loads), and splits lora_A of the
# token refiner's self_attn_qkv along its rank into three (no LoRA on it loads in diffusers), so loramerge refuses that.
def hunyuan_writable(module):
    return not (module.startswith("transformer.single_transformer_blocks.") and (".attn.to_" in module or "proj_mlp" in module)) \
        and not ("refiner_blocks" in module and re.search(r"attn\.to_[qkv]$", module))


FUSED_WRITERS = {  # (family, layout): which of the tiny model's modules; kohya: the blocks diffusers' kohya converter maps
    ("flux2", "comfyui"): lambda m: True,
    ("flux2", "kohya"): lambda m: ".transformer_blocks." in m or "single_transformer_blocks." in m,
    ("hunyuan_video", "comfyui"): hunyuan_writable,
    ("z_image", "comfyui"): lambda m: True,
    ("z_image", "kohya"): lambda m: True,
}


@pytest.mark.parametrize(("family", "layout"), sorted(FUSED_WRITERS))
def test_original_name_writers_load_in_the_family_loader_like_our_fold(family, layout, tmp_path):
    """``convert --to comfyui/kohya`` of a diffusers-style LoRA: the family's own diffusers loader, reading our file,
    gives what loramerge's fold of the source gives; reading our file back gives the source's deltas."""
    model = build(family)
    adapter = random_adapter({m: s for m, s in linear_modules(model).items() if FUSED_WRITERS[family, layout](m)},
                             seed=21, scale=0.75)
    adapter.config["architectures"] = [family]
    source = write_adapter(adapter, tmp_path / "source", format="diffusers")
    out = tmp_path / f"out-{layout}.safetensors"
    result = run_cli("convert", source, "-o", out, "--to", layout)
    assert result.exit_code == 0, result.output
    fold(save(family, model, tmp_path / "base"), source, output=tmp_path / "folded", device="cpu")
    expected = forward(family, load_folded(family, tmp_path / "folded"))
    assert relative_error(expected, forward(family, model)) > 1e-3
    assert relative_error(forward(family, load_with_diffusers(family, out, build(family))), expected) < 1e-4
    assert_same_deltas(load(out), adapter)


def assert_same_deltas(again, adapter):
    """``again`` holds ``adapter``'s deltas (float64, dense) and, for the parts of fused modules it lacked, zeros."""
    for module, lr in adapter.layers.items():
        ours = again.layers[module]
        assert torch.allclose(ours.product(torch.float64), lr.product(torch.float64), atol=1e-6), module
    for module in set(again.layers) - set(adapter.layers):
        assert not again.layers[module].product(torch.float64).any(), module


def test_a_fused_module_partly_adapted_gets_zero_rows_for_the_rest(tmp_path):
    """Only q of the image attention and k of the text attention: the fused qkv modules carry zeros for the others."""
    family = "flux2"
    model = build(family)
    adapter = random_adapter({m: s for m, s in linear_modules(model).items()
                              if m.endswith(("attn.to_q", "attn.add_k_proj"))}, seed=3, scale=0.5)
    adapter.config["architectures"] = [family]
    for layout in ("comfyui", "kohya"):
        out = write_adapter(adapter, tmp_path / f"{layout}.safetensors", format=layout)
        again = load(out)
        assert "transformer.transformer_blocks.0.attn.to_v" in again.layers
        assert_same_deltas(again, adapter)
        reference = write_adapter(adapter, tmp_path / f"ref-{layout}", format="diffusers")
        expected = forward(family, load_with_diffusers(family, reference / "pytorch_lora_weights.safetensors", build(family)))
        assert relative_error(forward(family, load_with_diffusers(family, out, build(family))), expected) < 1e-4


def factor_distance(first, second) -> float:
    """‖B₁A₁s₁ − B₂A₂s₂‖_F / ‖B₂A₂s₂‖_F from the factors alone (float64), never forming the matrices."""
    B = torch.cat([first[0].double() * first[2], -second[0].double() * second[2]], 1)
    A = torch.cat([first[1].double(), second[1].double()])
    difference = torch.trace((B.T @ B) @ (A @ A.T))
    B2, A2 = second[0].double() * second[2], second[1].double()
    return float(difference.clamp_min(0).sqrt() / torch.trace((B2.T @ B2) @ (A2 @ A2.T)).sqrt())


RELEASED_FUSED = {  # at the released widths: HunyuanVideo's single block (linear1 fuses q, k, v and the MLP input), one
    # double block (diffusers only converts a file with an img_attn_qkv); Lumina 2's first block (q 2304, k and v 768 rows)
    "hunyuan_video": ("single_transformer_blocks.0.", "transformer_blocks.0.attn.to_q"),
    "lumina2": ("layers.0.",),
}


@pytest.mark.parametrize("family", sorted(RELEASED_FUSED))
def test_fused_writers_at_released_widths_convert_back_through_diffusers(family, tmp_path):
    import diffusers

    from loramerge.io.formats.families import FAMILIES, family_modules

    shapes = {m: s for m, s in family_modules(family).items()
              if m.split(".", 1)[1].startswith(RELEASED_FUSED[family]) and len(s) == 2}
    adapter = random_adapter({m: tuple(s) for m, s in shapes.items()}, seed=5, scale=0.5)
    adapter.config["architectures"] = [family]
    out = write_adapter(adapter, tmp_path / "out.safetensors", format="comfyui")
    converted = getattr(diffusers, FAMILIES[family].pipeline).lora_state_dict(str(out))
    converted = converted[0] if isinstance(converted, tuple) else converted
    for module, lr in adapter.layers.items():
        theirs = (converted[f"{module}.lora_B.weight"], converted[f"{module}.lora_A.weight"], 1.0)
        assert factor_distance(theirs, (lr.B, lr.A, lr.scale)) < 1e-5, module
    again = load(out)
    for module, lr in adapter.layers.items():
        ours = again.layers[module]
        assert factor_distance((ours.B, ours.A, ours.scale), (lr.B, lr.A, lr.scale)) < 1e-5, module


def test_modules_diffusers_cannot_load_in_the_original_layout_are_refused_by_name(tmp_path):
    """HunyuanVideo's converter splits lora_A of the token refiner's ``self_attn_qkv`` along its rank into three and
    lora_B along its rows: every piece it gives has ranks r/3 and r, which its own loader refuses. No file written
    in that layout can load, so loramerge does not write one."""
    import diffusers

    refiner = [("double_blocks.0.img_attn_qkv", "transformer_blocks.0.attn.to_q", 3),
               ("txt_in.individual_token_refiner.blocks.0.self_attn_qkv",
                "context_embedder.token_refiner.refiner_blocks.0.attn.to_q", 3)]
    file = original_file("hunyuan_video", refiner, tmp_path / "theirs.safetensors")
    theirs = diffusers.HunyuanVideoPipeline.lora_state_dict(str(file))
    with pytest.raises(RuntimeError, match="size mismatch"):
        diffusers.HunyuanVideoPipeline.load_lora_into_transformer(theirs, transformer=build("hunyuan_video"))
    # loramerge's probe goes through the same converter, so it names the module rather than guess its split
    with pytest.raises(UnknownFormat, match=r"HunyuanVideo converter maps to no module: .*self_attn_qkv.*--skip-unknown"):
        load(file)
    assert load(file, skip_unknown=True).config["skipped"] == [f"diffusion_model.{refiner[1][0]}"]
    shapes = linear_modules(build("hunyuan_video"))
    adapter = random_adapter({m: shapes[m] for m in ("transformer.transformer_blocks.0.attn.to_q",
                                                     "transformer.context_embedder.token_refiner.refiner_blocks.0.attn.to_q")})
    adapter.config["architectures"] = ["hunyuan_video"]
    with pytest.raises(UnsupportedAdapter, match=r"refiner_blocks\.0\.attn\.to_q.*self_attn_qkv.*--to diffusers"):
        write_adapter(adapter, tmp_path / "out.safetensors", format="comfyui")
    assert not (tmp_path / "out.safetensors").exists()


def test_hunyuan_final_modulation_reads_with_its_halves_swapped(tmp_path):
    """HunyuanVideo's ``final_layer.adaLN_modulation.1`` gives (shift, scale), diffusers' ``norm_out.linear`` (scale,
    shift). diffusers' converter swaps the halves of lora_A too, so it reads a trainer's file (rank 3 here) wrongly;
    loramerge's reading is checked against the dense update with its rows swapped (float64)."""
    from safetensors.torch import load_file

    modules = [("double_blocks.0.img_attn_qkv", "transformer_blocks.0.attn.to_q", 3),
               ("final_layer.adaLN_modulation.1", "norm_out.linear", 1)]
    file = original_file("hunyuan_video", modules, tmp_path / "lora.safetensors", rank=3)
    tensors = load_file(str(file))
    dense = (tensors["diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight"].double()
             @ tensors["diffusion_model.final_layer.adaLN_modulation.1.lora_A.weight"].double())
    shift, scale = dense.chunk(2)
    ours = load(file).layers["transformer.norm_out.linear"].product(torch.float64)
    assert torch.allclose(ours, torch.cat([scale, shift]), atol=1e-10)


def test_flux1_linear1_at_any_width_splits_as_at_the_released_one(tmp_path):
    """diffusers' Flux.1 converter splits ``single_blocks.N.linear1`` at Flux.1-dev's widths (q, k, v 3072 rows each,
    the MLP input the rest). loramerge probes it at that width and scales the split to the file's (h, h, h, 4h, as
    BFL's single block splits its output). The oracle is diffusers' loader on the rest of the file (kohya-suffixed
    twin, see above) with linear1's rows split that way."""
    h = linear_modules(build("flux"))["transformer.single_transformer_blocks.0.attn.to_q"][0]  # the hidden size
    modules = [*FLUX1_ORIGINAL, ("single_blocks.0.linear1", "single_transformer_blocks.0.attn.to_q", 7)]
    file = original_file("flux", modules, tmp_path / "lora.safetensors")
    ours = load(file)
    assert ours.config["architectures"] == ["flux"]
    tensors = load_file(str(file))
    A, B = (tensors[f"diffusion_model.single_blocks.0.linear1.{f}.weight"] for f in ("lora_A", "lora_B"))
    oracle = converted_with_prefix("flux", str(original_file("flux", FLUX1_ORIGINAL, tmp_path / "twin.safetensors",
                                                             a="lora_down.weight", b="lora_up.weight")))
    for part, rows in (("attn.to_q", B[:h]), ("attn.to_k", B[h:2 * h]), ("attn.to_v", B[2 * h:3 * h]),
                       ("proj_mlp", B[3 * h:])):
        module = f"transformer.single_transformer_blocks.0.{part}"
        oracle[f"{module}.lora_A.weight"], oracle[f"{module}.lora_B.weight"] = A, rows
        assert torch.allclose(ours.layers[module].product(torch.float64), rows.double() @ A.double(), atol=1e-10)
    folds_and_converts_like("flux", build("flux"), file, oracle, tmp_path)
