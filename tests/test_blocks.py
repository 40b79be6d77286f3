"""Block weights: the LoRA Block Weight extension's block lists and presets, named rules, exact scaling.

Oracles:

- the extension's documented block lists and default presets, transcribed here as the extension
  writes them (hako-mikan/sd-webui-lora-block-weight: README tables and ``DEF_WEIGHT_PRESET``);
- which block a module is in, computed the way the extension and A1111 do it: A1111 turns a
  diffusers UNet name into its LDM name by block arithmetic (``convert_diffusers_name_to_compvis``:
  resnets and attentions of down block i, layer j → ``input_blocks.{1+3i+j}``, its downsampler →
  ``input_blocks.{3+3i}``, up block i layer j → ``output_blocks.{3i+j}``, its upsampler →
  ``output_blocks.{3i+2}``), and the extension finds ``input_blocks_N_``/``middle_block_``/
  ``output_blocks_N_`` (or ``encoder``/``embedders`` for BASE) in that name;
- the deltas of the weighted result against w·ΔW computed by hand in float64, and for SDXL the
  UNet and text-encoder outputs of diffusers' own per-block LoRA scales (``set_adapters`` with
  ``{"down": {"block_1": [...]}, "mid": ..., "up": ...}``) against our weighted file.
"""

from __future__ import annotations

import json
import re
import warnings

import pytest
import safetensors.torch
import torch

import loramerge
from loramerge import Adapter, InvalidParameter, LowRank, UnsupportedAdapter
from loramerge.io.formats.sd_names import ARCHITECTURES
from loramerge.merge.blocks import (
    BLOCK_TABLES,
    FLUX_LIST,
    SD_FULL,
    SD_LORA,
    SDXL_FULL,
    SDXL_LORA,
    UNET_PRESETS,
    BlockWeighting,
    weigh_blocks,
)
from loramerge.merge.methods import available_methods
from tests.cli_helpers import assert_clean_failure, run_cli
from tests.method_fixtures import random_statistics
from tests.sd_fixtures import gen, kohya_module, lora_factors, randn, ref_loha, ref_lokr, ref_lora

# ------------------------------------------------------------------ the extension, as it documents itself

EXTENSION_LISTS = {
    17: "BASE,IN01,IN02,IN04,IN05,IN07,IN08,M00,OUT03,OUT04,OUT05,OUT06,OUT07,OUT08,OUT09,OUT10,OUT11",
    26: "BASE,IN00,IN01,IN02,IN03,IN04,IN05,IN06,IN07,IN08,IN09,IN10,IN11,M00,OUT00,OUT01,OUT02,OUT03,OUT04,OUT05,"
        "OUT06,OUT07,OUT08,OUT09,OUT10,OUT11",
    12: "BASE,IN04,IN05,IN07,IN08,M00,OUT00,OUT01,OUT02,OUT03,OUT04,OUT05",
    20: "BASE,IN00,IN01,IN02,IN03,IN04,IN05,IN06,IN07,IN08,M00,OUT00,OUT01,OUT02,OUT03,OUT04,OUT05,OUT06,OUT07,OUT08",
}
EXTENSION_PRESETS = """\
NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
INS:1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0
IND:1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0
INALL:1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0
MIDD:1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0
OUTD:1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0
OUTS:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1
OUTALL:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1
ALL0.5:0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5"""


def a1111_block(module: str) -> str | None:
    """The extension's block of a canonical module, by A1111's name arithmetic (see the module docstring)."""
    component, _, path = module.partition(".")
    if component.startswith("text_encoder"):
        return "BASE"
    if path.startswith("conv_in"):
        return "IN00"
    if found := re.match(r"down_blocks\.(\d+)\.(?:attentions|resnets)\.(\d+)\.", path):
        return f"IN{1 + 3 * int(found[1]) + int(found[2]):02d}"
    if found := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.", path):
        return f"IN{3 + 3 * int(found[1]):02d}"
    if path.startswith("mid_block."):
        return "M00"
    if found := re.match(r"up_blocks\.(\d+)\.(?:attentions|resnets)\.(\d+)\.", path):
        return f"OUT{3 * int(found[1]) + int(found[2]):02d}"
    if found := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.", path):
        return f"OUT{3 * int(found[1]) + 2:02d}"
    return None


def kohya_default_targets(arch: str) -> list[str]:
    """The modules kohya's default LoRA network trains: Transformer2DModel linears and CLIP attention/MLP."""
    return [m for m in ARCHITECTURES[arch].shapes
            if ".attentions." in m or (m.startswith("text_encoder") and (".self_attn." in m or ".mlp." in m))]


def test_block_lists_are_the_extensions():
    assert ",".join(SD_LORA.blocks) == EXTENSION_LISTS[17]
    assert ",".join(SD_FULL.blocks) == EXTENSION_LISTS[26]
    assert ",".join(SDXL_LORA.blocks) == EXTENSION_LISTS[12]
    assert ",".join(SDXL_FULL.blocks) == EXTENSION_LISTS[20]
    flux = ["CLIP", "T5", "IN"] + [f"D{i:02d}" for i in range(19)] + [f"S{i:02d}" for i in range(38)] + ["OUT"]
    assert list(FLUX_LIST.blocks) == flux and len(flux) == 61


def test_presets_are_the_extensions_vectors_and_carry_over_by_region():
    table = BLOCK_TABLES["sd"]
    for line in EXTENSION_PRESETS.splitlines():
        name, values = line.split(":")
        weights = table.preset(name)
        assert [weights[b] for b in SD_LORA.blocks] == [float(v) for v in values.split(",")], name
    assert set(UNET_PRESETS) == {line.split(":")[0] for line in EXTENSION_PRESETS.splitlines()}
    # SDXL: shallow = the 640-channel level (IN04 IN05, OUT03–OUT05), deep = the 1280-channel one.
    sdxl = BLOCK_TABLES["sdxl"].preset("OUTD")
    assert [sdxl[b] for b in SDXL_LORA.blocks] == [1, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0]
    sdxl = BLOCK_TABLES["sdxl"].preset("INS")
    assert [sdxl[b] for b in SDXL_LORA.blocks] == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert set(BLOCK_TABLES["sdxl"].preset("ALL").values()) == {1.0}  # ALL is the identity on every block
    assert set(BLOCK_TABLES["flux"].preset("FLUXALL").values()) == {1.0}
    with pytest.raises(InvalidParameter, match="does not apply to Flux"):
        BLOCK_TABLES["flux"].preset("OUTD")


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_every_unet_and_text_encoder_module_is_in_the_extensions_block(arch):
    table = BLOCK_TABLES["sdxl" if arch == "sdxl" else "sd"]
    names = ARCHITECTURES[arch]
    blocks = {m: table.block_of(m, names) for m in names.shapes}
    assert blocks == {m: a1111_block(m) for m in names.shapes}
    outside = sorted(m for m, b in blocks.items() if b is None)
    assert outside == sorted(m for m in names.shapes if m.startswith(("unet.time_embedding", "unet.add_embedding",
                                                                      "unet.conv_out")))
    # A plain LoRA (kohya's default targets) touches exactly the short list's blocks; a LoCon all of the full list's.
    short, full = table.lists
    assert {blocks[m] for m in kohya_default_targets(arch)} == set(short.blocks)
    assert {b for b in blocks.values() if b is not None} == set(full.blocks)


def test_named_modules_fall_in_their_blocks():
    sd1, sdxl, flux = (ARCHITECTURES[a] for a in ("sd1", "sdxl", "flux"))
    sd, xl, fx = BLOCK_TABLES["sd"], BLOCK_TABLES["sdxl"], BLOCK_TABLES["flux"]
    cases = [
        (sd, sd1, "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "IN01"),
        (sd, sd1, "unet.down_blocks.2.attentions.1.proj_out", "IN08"),
        (sd, sd1, "unet.down_blocks.0.downsamplers.0.conv", "IN03"),
        (sd, sd1, "unet.down_blocks.3.resnets.1.conv2", "IN11"),
        (sd, sd1, "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2", "M00"),
        (sd, sd1, "unet.up_blocks.0.resnets.2.conv1", "OUT02"),
        (sd, sd1, "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v", "OUT11"),
        (sd, sd1, "text_encoder.text_model.encoder.layers.11.mlp.fc2", "BASE"),
        (xl, sdxl, "unet.down_blocks.1.attentions.0.proj_in", "IN04"),
        (xl, sdxl, "unet.down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_k", "IN08"),
        (xl, sdxl, "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "OUT00"),
        (xl, sdxl, "unet.up_blocks.1.attentions.2.proj_out", "OUT05"),
        (xl, sdxl, "unet.up_blocks.2.resnets.2.conv2", "OUT08"),
        (xl, sdxl, "text_encoder_2.text_projection", "BASE"),
        (fx, flux, "transformer.transformer_blocks.18.ff_context.net.2", "D18"),
        (fx, flux, "transformer.transformer_blocks.0.attn.add_k_proj", "D00"),
        (fx, flux, "transformer.single_transformer_blocks.37.proj_mlp", "S37"),
        (fx, flux, "transformer.x_embedder", "IN"),
        (fx, flux, "transformer.time_text_embed.guidance_embedder.linear_1", "IN"),
        (fx, flux, "transformer.norm_out.linear", "OUT"),
        (fx, flux, "transformer.proj_out", "OUT"),
        (fx, flux, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "CLIP"),
        (fx, flux, "text_encoder_2.encoder.block.3.layer.1.DenseReluDense.wo", "T5"),
    ]
    for table, names, module, block in cases:
        assert table.block_of(module, names) == block, module


# --------------------------------------------------------------------------------- exact weighting


def _sdxl_kohya_file(path, modules: list[str], seed: int = 0) -> dict[str, torch.Tensor]:
    """A hand-written kohya SDXL file (SGM UNet names) on ``modules``; returns ΔW per canonical module."""
    names = ARCHITECTURES["sdxl"]
    g = gen(seed)
    tensors, deltas = {}, {}
    for i, module in enumerate(modules):
        down, up = lora_factors(names.shapes[module], 1 + i % 3, g)
        tensors.update(kohya_module(names.preferred[module], down, up, alpha=2.0))
        deltas[module] = ref_lora(down, up, 2.0)
    safetensors.torch.save_file(tensors, str(path))
    return deltas


def _one_per_block(arch: str, modules: list[str]) -> list[str]:
    seen: dict[str | None, str] = {}
    for m in modules:
        seen.setdefault(a1111_block(m), m)
    return list(seen.values())


def test_convert_scales_each_block_of_a_kohya_sdxl_file_exactly(tmp_path):
    modules = _one_per_block("sdxl", kohya_default_targets("sdxl"))
    deltas = _sdxl_kohya_file(tmp_path / "lora.safetensors", modules)
    vector = [0.8, 0.5, -1.0, 0.0, 1.5, 0.25, 2.0, 0.3, 0.7, 1.0, -0.5, 0.9]
    out = loramerge.convert(tmp_path / "lora.safetensors", tmp_path / "weighted.safetensors",
                            block_weights=",".join(map(str, vector)))
    weighted = loramerge.load(out)
    assert json.loads(weighted.config["metadata"]["loramerge"])["block_weights"] == vector  # recorded in the file
    weight_of = dict(zip(SDXL_LORA.blocks, vector))
    assert sorted(weighted.modules) == sorted(modules)
    for module in modules:
        expected = weight_of[a1111_block(module)] * deltas[module]
        torch.testing.assert_close(weighted.delta(module, torch.float64), expected, rtol=1e-5,
                                   atol=1e-6 * float(deltas[module].abs().max()))


def _sd_adapter(seed: int, modules: list[str], rank: int = 3) -> Adapter:
    g = gen(seed)
    layers = {m: LowRank(torch.randn(rank, 12, generator=g), torch.randn(10, rank, generator=g), scale=0.5 + seed)
              for m in modules}
    return Adapter(layers, config={"architectures": ["sd1"]}, source=f"lora{seed}")


SD_MODULES = ["text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
              "unet.down_blocks.0.attentions.0.proj_in", "unet.down_blocks.1.attentions.1.proj_out",
              "unet.down_blocks.2.attentions.0.proj_in", "unet.mid_block.attentions.0.proj_out",
              "unet.up_blocks.1.attentions.0.proj_in", "unet.up_blocks.3.attentions.2.proj_out"]


@pytest.mark.parametrize("method", [m.name for m in available_methods()])
def test_block_weights_compose_exactly_with_every_method(method):
    """Weighting before the merge: merge(block_weights=…) is the merge of the sources scaled by hand."""
    spec = loramerge.get_method(method)
    count = 2 if spec.max_sources == 2 else 3
    sources = [_sd_adapter(i, SD_MODULES) for i in range(count)]
    weighting = ["OUTALL", "2:0.5,1,1,0,0,-1,2,0.25,1,1,1,1,1,0.5,0.5,0.5,0.5"]
    by_hand = []
    for i, source in enumerate(sources):
        if i == 1:
            w = dict(zip(SD_LORA.blocks, [0.5, 1, 1, 0, 0, -1, 2, 0.25, 1, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5]))
        else:
            w = BLOCK_TABLES["sd"].preset("OUTALL")
        by_hand.append(source.with_layers({m: LowRank(lr.A, lr.B, scale=lr.scale * w[a1111_block(m)])
                                           for m, lr in source.layers.items()}))
    data = {"statistics": random_statistics(sources)} if spec.needs_statistics else {}  # regmean's input Grams
    ours = loramerge.merge(sources, method=method, block_weights=weighting, seed=3, **data)
    reference = loramerge.merge(by_hand, method=method, seed=3, **data)
    for module in SD_MODULES:
        torch.testing.assert_close(ours.delta(module, torch.float64), reference.delta(module, torch.float64),
                                   rtol=1e-6, atol=1e-7)
    assert ours.report.parameters["block_weights"][:2] == ["OUTALL", [0.5, 1, 1, 0, 0, -1, 2, 0.25, 1, 1, 1, 1, 1,
                                                                      0.5, 0.5, 0.5, 0.5]]


def test_linear_merge_with_block_weights_is_the_weighted_sum():
    a, b = _sd_adapter(0, SD_MODULES), _sd_adapter(1, SD_MODULES)
    merged = loramerge.merge([a, b], weights=[0.7, -0.4], block_weights=["IND", "BASE=2", "2:M00=3"])
    ind = BLOCK_TABLES["sd"].preset("IND")
    for module in SD_MODULES:
        block = a1111_block(module)
        wa = 2.0 if block == "BASE" else ind[block]  # rules come before the preset
        wb = 3.0 if block == "M00" else 1.0  # source 2's own weighting replaces the shared one
        expected = 0.7 * wa * a.delta(module, torch.float64) - 0.4 * wb * b.delta(module, torch.float64)
        torch.testing.assert_close(merged.delta(module, torch.float64), expected, rtol=1e-5,
                                   atol=1e-6 * float(expected.abs().max()))


def test_weighted_loha_and_lokr_stay_in_their_own_factors(tmp_path):
    """A LyCORIS output keeps a weighted LoHa or LoKr factored (one factor scaled), not expanded."""
    g = gen(6)
    loha, lokr = "lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
    w1a, w1b, w2a, w2b = randn(12, 2, g=g), randn(2, 10, g=g), randn(12, 2, g=g), randn(2, 10, g=g)
    k1, k2a, k2b = randn(3, 2, g=g), randn(4, 2, g=g), randn(2, 5, g=g)
    tensors = {f"{loha}.hada_w1_a": w1a, f"{loha}.hada_w1_b": w1b, f"{loha}.hada_w2_a": w2a, f"{loha}.hada_w2_b": w2b,
               f"{loha}.alpha": torch.tensor(1.0), f"{lokr}.lokr_w1": k1, f"{lokr}.lokr_w2_a": k2a,
               f"{lokr}.lokr_w2_b": k2b, f"{lokr}.alpha": torch.tensor(2.0)}
    safetensors.torch.save_file(tensors, str(tmp_path / "lyco.safetensors"))
    out = loramerge.convert(tmp_path / "lyco.safetensors", tmp_path / "weighted.safetensors",
                            block_weights="layers.0=0.5,layers.1=-2")
    with safetensors.safe_open(str(out), "pt") as f:
        keys = set(f.keys())
    assert {f"{loha}.hada_w1_a", f"{lokr}.lokr_w1"} <= keys and not any("lora_down" in k for k in keys)
    weighted = loramerge.load(out)
    expected = {"text_encoder.text_model.encoder.layers.0.mlp.fc1": 0.5 * ref_loha(w1a, w1b, w2a, w2b, 1.0, (12, 10)),
                "text_encoder.text_model.encoder.layers.1.self_attn.q_proj": -2 * ref_lokr(k1, k2a @ k2b, 2.0 / 2)}
    for module, delta in expected.items():
        torch.testing.assert_close(weighted.delta(module, torch.float64), delta, rtol=1e-5, atol=1e-6)


def test_flux_rules_name_double_and_single_blocks_in_either_spelling():
    names = ARCHITECTURES["flux"]
    modules = ["transformer.transformer_blocks.3.attn.to_q", "transformer.transformer_blocks.12.ff.net.2",
               "transformer.single_transformer_blocks.3.proj_out", "transformer.single_transformer_blocks.30.attn.to_k",
               "transformer.x_embedder", "text_encoder.text_model.encoder.layers.0.mlp.fc1"]
    g = gen(1)
    adapter = Adapter({m: LowRank(torch.randn(2, names.shapes[m][1], generator=g),
                                  torch.randn(names.shapes[m][0], 2, generator=g)) for m in modules},
                      config={"architectures": ["flux"]})
    cases = {
        "double_blocks.0-9=0.5": [0.5, 1, 1, 1, 1, 1],
        "transformer_blocks.0-12=0": [0, 0, 1, 1, 1, 1],  # not single_transformer_blocks
        "single_blocks.20-37=0,single_blocks.3=2": [1, 1, 2, 0, 1, 1],
        "single_transformer_blocks.3=2,.*blocks=0.5": [0.5, 0.5, 2, 0.5, 1, 1],  # first match wins
        "S30=0,IN=3,CLIP=0": [1, 1, 1, 0, 3, 0],
    }
    for text, expected in cases.items():
        (weighted,) = weigh_blocks([adapter], [text])
        assert [weighted[m].scale for m in modules] == expected, text
    vector = [0.0, 1.0, 2.0] + [0.5] * 19 + [0.25] * 38 + [1.0]
    (weighted,) = weigh_blocks([adapter], [",".join(map(str, vector))])
    assert [weighted[m].scale for m in modules] == [0.5, 0.5, 0.25, 0.25, 2.0, 0.0]


def test_rules_work_on_families_without_a_block_table():
    """A Wan-style LoRA (diffusers names, no table): rules on the module paths."""
    g = gen(2)
    modules = [f"transformer.blocks.{i}.attn1.to_q" for i in (0, 5, 15, 29)]
    adapter = Adapter({m: LowRank(torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)) for m in modules})
    (weighted,) = weigh_blocks([adapter], ["blocks.0-9=0.5,blocks.20-39=0"])
    assert [weighted[m].scale for m in modules] == [0.5, 0.5, 1.0, 0.0]


@pytest.mark.parametrize("family, rule, block", [("wan", "blocks.0", r"\.blocks\.0\."),
                                                 ("qwen_image", "transformer_blocks.0", r"\.transformer_blocks\.0\.")])
def test_rules_on_trainer_files_of_newer_families(tmp_path, family, rule, block):
    """A ComfyUI-layout file of a family with no block table: rules work, a preset is refused naming the family."""
    pytest.importorskip("diffusers")
    from tests.family_fixtures import build, linear_modules
    from tests.family_fixtures import random_adapter as family_adapter

    adapter = family_adapter(linear_modules(build(family)))
    path = adapter.save(tmp_path / "lora.safetensors", format="comfyui")
    out = loramerge.convert(path, tmp_path / "weighted.safetensors", block_weights=f"{rule}=0.25")
    weighted = loramerge.load(out)
    hit = [m for m in adapter.modules if re.search(block, m)]
    assert hit and len(hit) < len(adapter.modules)
    for module in adapter.modules:
        expected = (0.25 if module in hit else 1.0) * adapter.delta(module, torch.float64)
        torch.testing.assert_close(weighted.delta(module, torch.float64), expected, rtol=1e-5, atol=1e-6)
    result = run_cli("convert", path, "-o", tmp_path / "preset.safetensors", "--block-weights", "OUTALL")
    assert_clean_failure(result, "need a block table", f"this LoRA is for {family}")


def test_modules_outside_every_block_keep_weight_one_and_are_named():
    modules = ["unet.time_embedding.linear_1", "unet.down_blocks.0.attentions.0.proj_in"]
    adapter = _sd_adapter(0, modules)
    with pytest.warns(loramerge.LoramergeWarning, match=r"1 module\(s\) lie outside every block .*time_embedding"):
        (weighted,) = weigh_blocks([adapter], ["NONE"])
    assert [weighted[m].scale for m in modules] == [adapter[modules[0]].scale, 0.0]


def test_a_locon_module_outside_the_short_list_needs_the_full_vector():
    adapter = _sd_adapter(0, ["unet.down_blocks.0.downsamplers.0.conv", "unet.down_blocks.0.attentions.0.proj_in"])
    with pytest.raises(InvalidParameter, match=r"in block IN03, which the 17-entry .* give the 26-entry"):
        weigh_blocks([adapter], [",".join(["1"] * 17)])
    full = [1.0] * 26
    full[SD_FULL.blocks.index("IN03")] = 0.25
    (weighted,) = weigh_blocks([adapter], [",".join(map(str, full))])
    assert weighted["unet.down_blocks.0.downsamplers.0.conv"].scale == pytest.approx(0.25 * adapter[
        "unet.down_blocks.0.downsamplers.0.conv"].scale)
    (weighted,) = weigh_blocks([adapter], ["INS"])  # presets cover the full list by region
    assert weighted["unet.down_blocks.0.downsamplers.0.conv"].scale == adapter["unet.down_blocks.0.downsamplers.0.conv"].scale


def test_block_weighting_parses_per_source_forms():
    bw = BlockWeighting.parse(["ALL0.5", "1:OUTS", "1:BASE=0", "3:1,0,0,0,0,0,0,0,0,0,0,1"], sources=3)
    assert bw.shared.preset == "ALL0.5"
    assert bw.for_source(0).preset == "OUTS" and bw.for_source(0).filters == ("BASE",)
    assert bw.for_source(1) is bw.shared
    assert len(bw.for_source(2).vector) == 12
    with pytest.raises(InvalidParameter, match="names source 3, but there are 2 sources"):
        BlockWeighting.parse(["3:ALL"], sources=2)
    with pytest.raises(InvalidParameter, match="not also"):
        BlockWeighting.parse(["ALL", "NONE"])


# --------------------------------------------------------------------------------------- folding


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_fold_with_block_weights_adds_each_blocks_share(tmp_path, kind):
    pytest.importorskip("diffusers")
    from tests.test_fold_sd import (
        assert_state_close,
        expected_state,
        kohya_lora,
        models,
        read_all,
        write_checkpoint,
    )

    components = models(kind)
    base = write_checkpoint(tmp_path / "base.safetensors", kind, components)
    tensors, deltas = kohya_lora(kind, components, seed=5)  # every Linear and Conv2d: a LoCon
    safetensors.torch.save_file(tensors, str(tmp_path / "lora.safetensors"))
    full = SDXL_FULL if kind == "sdxl" else SD_FULL
    vector = [round(0.1 * ((3 * i) % 17) - 0.4, 2) for i in range(len(full.blocks))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", loramerge.LoramergeWarning)  # time embeddings, conv_out: outside every block
        result = loramerge.fold(base, tmp_path / "lora.safetensors", output=tmp_path / "out.safetensors",
                                block_weights=[",".join(map(str, vector))])
    weight_of = dict(zip(full.blocks, vector))
    scaled = {m: d * weight_of.get(a1111_block(m), 1.0) for m, d in deltas.items()}
    assert_state_close(read_all(tmp_path / "out.safetensors"), expected_state(kind, components, scaled))
    assert result.recipe["adapters"][0]["block_weights"] == vector


# ------------------------------------------------------------------------- diffusers as the consumer


def test_diffusers_per_block_scales_match_our_weighted_file(tmp_path):
    """diffusers' set_adapters block scales (transformer layers of down/mid/up blocks, text encoders)
    on the LoRA give the same model outputs as our block-weighted file loaded at scale 1."""
    pytest.importorskip("diffusers")
    from tests.test_formats_consumer import _random_adapter, _sdxl_outputs, _sdxl_pipeline

    pipe = _sdxl_pipeline()
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    # Transformer layers and text encoders only: the layers diffusers' block scales reach.
    adapter = _random_adapter(models, seed=4, skip=lambda p: p.startswith("unet") and ".attentions." not in p)
    adapter.config["architectures"] = ["sdxl"]
    path = adapter.save(tmp_path / "lora.safetensors", format="kohya")
    # The tiny UNet has SDXL's first two levels: IN04 IN05 (down_blocks.1), M00, OUT00–OUT02 (up_blocks.0).
    vector = {"BASE": 0.6, "IN04": 0.5, "IN05": -1.0, "M00": 0.25, "OUT00": 2.0, "OUT01": 0.0, "OUT02": 1.5}
    weighted = loramerge.convert(path, tmp_path / "weighted.safetensors",
                                 block_weights=",".join(str(vector.get(b, 1.0)) for b in SDXL_LORA.blocks))

    theirs = _sdxl_pipeline()
    theirs.load_lora_weights(str(path), adapter_name="style")
    theirs.set_adapters(["style"], adapter_weights=[{
        "unet": {"down": {"block_1": [0.5, -1.0]}, "mid": 0.25, "up": {"block_0": [2.0, 0.0, 1.5]}},
        "text_encoder": 0.6, "text_encoder_2": 0.6}])
    ours = _sdxl_pipeline()
    ours.load_lora_weights(str(weighted))
    base = _sdxl_outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    for got, expected, plain in zip(_sdxl_outputs(ours.unet, ours.text_encoder, ours.text_encoder_2),
                                    _sdxl_outputs(theirs.unet, theirs.text_encoder, theirs.text_encoder_2), base):
        assert float((expected - plain).abs().max()) > 1e-3 * float(plain.abs().max())  # the LoRA matters
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


# -------------------------------------------------------------------------------- CLI and recipes


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks")
    modules = _one_per_block("sdxl", kohya_default_targets("sdxl"))
    deltas = _sdxl_kohya_file(root / "a.safetensors", modules, seed=1)
    _sdxl_kohya_file(root / "b.safetensors", modules, seed=2)
    return root, modules, deltas


def test_cli_combine_fold_convert_take_block_weights(sdxl_file, tmp_path):
    root, modules, deltas = sdxl_file
    result = run_cli("combine", root / "a.safetensors", root / "b.safetensors", "-o", tmp_path / "m.safetensors",
                     "--block-weights", "OUTALL", "--block-weights", "2:NONE", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    merged = loramerge.load(tmp_path / "m.safetensors")
    outall = BLOCK_TABLES["sdxl"].preset("OUTALL")
    for module in modules:
        torch.testing.assert_close(merged.delta(module, torch.float64), outall[a1111_block(module)] * deltas[module],
                                   rtol=1e-5, atol=1e-6 * float(deltas[module].abs().max()))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["parameters"]["block_weights"] == ["OUTALL", "NONE"]
    result = run_cli("convert", root / "a.safetensors", "-o", tmp_path / "c.safetensors", "--block-weights",
                     "IN0[4-8]=0,BASE=0.5")
    assert result.exit_code == 0, result.output
    converted = loramerge.load(tmp_path / "c.safetensors")
    for module in modules:
        block = a1111_block(module)
        w = 0.0 if block.startswith("IN") else 0.5 if block == "BASE" else 1.0
        torch.testing.assert_close(converted.delta(module, torch.float64), w * deltas[module], rtol=1e-5,
                                   atol=1e-6 * float(deltas[module].abs().max()))


def test_recipe_block_weights_run_and_are_saved(sdxl_file, tmp_path):
    root, modules, deltas = sdxl_file
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""\
sources:
  - path: {root / 'a.safetensors'}
    block_weights: [0, 1, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
  - path: {root / 'b.safetensors'}
block_weights:
  - OUTS
  - {{filter: M00, value: 2}}
method: linear
output:
  path: {tmp_path / 'out'}
  format: diffusers
""")
    result = run_cli("run", recipe, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "block weights 0,1,1,1,1,1,0.5,0.5,0.5,0.5,0.5,0.5" in result.output and "block weights OUTS; M00=2" in result.output
    result = run_cli("run", recipe)
    assert result.exit_code == 0, result.output
    merged = loramerge.load(tmp_path / "out")
    b = loramerge.load(root / "b.safetensors")
    outs = BLOCK_TABLES["sdxl"].preset("OUTS")
    mine = dict(zip(SDXL_LORA.blocks, [0, 1, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]))
    for module in modules:
        block = a1111_block(module)
        expected = mine[block] * deltas[module] + (2.0 if block == "M00" else outs[block]) * b.delta(module, torch.float64)
        torch.testing.assert_close(merged.delta(module, torch.float64), expected, rtol=1e-5, atol=1e-6)
    saved = (tmp_path / "out" / "loramerge_recipe.yaml").read_text()
    rerun = run_cli("run", tmp_path / "out" / "loramerge_recipe.yaml", "-o", tmp_path / "again")
    assert rerun.exit_code == 0, rerun.output + saved
    again = loramerge.load(tmp_path / "again")
    for module in modules:
        torch.testing.assert_close(again.delta(module), merged.delta(module))


@pytest.mark.parametrize("args, fragments", [
    (["--block-weights", "1,0,1"], ["block-weight vector has", "got 3"]),
    (["--block-weights", "OUTSIDE"], ["unknown block-weight preset 'OUTSIDE'", "OUTALL"]),
    (["--block-weights", ",".join(["1"] * 17)], ["a.safetensors", "vector of 17 entries fits no block list",
                                                 "SDXL LoRA takes 12"]),
    (["--block-weights", "double_blocks.0-9=0.5"], ["block rule double_blocks.0-9=0.5 matches no module"]),
    (["--block-weights", "3:ALL"], ["names source 3, but there are 2 sources"]),
    (["--block-weights", "x=y"], ["'y' is not a number"]),
    (["--block-weights", "0.5"], ["one number is a source weight"]),
    (["--block-weights", "1:double_blocks.0-9=0.5"], ["matches no module of source 1"]),
    (["--rank", "4", "--sv-ratio", "2"], ["choose one rank policy, not rank and sv_ratio"]),
    (["--energy", "0.9", "--sv-fro", "0.9"], ["choose one rank policy, not energy and sv_fro"]),
])
def test_bad_block_weights_and_rank_options_fail_cleanly(sdxl_file, tmp_path, args, fragments):
    root, _, _ = sdxl_file
    out = tmp_path / "m.safetensors"
    result = run_cli("combine", root / "a.safetensors", root / "b.safetensors", "-o", out, "--method", "svd", *args)
    assert_clean_failure(result, *fragments)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_block_vectors_need_a_family_with_a_block_table(tmp_path):
    g = gen(0)
    adapter = Adapter({"model.layers.0.self_attn.q_proj": LowRank(torch.randn(2, 8, generator=g),
                                                                  torch.randn(8, 2, generator=g))})
    path = adapter.save(tmp_path / "peft")
    result = run_cli("convert", path, "-o", tmp_path / "out", "--block-weights", "OUTALL")
    assert_clean_failure(result, "need a block table", "rules instead")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UnsupportedAdapter):
        weigh_blocks([adapter], [",".join(["1"] * 12)])
    result = run_cli("convert", path, "-o", tmp_path / "out", "--block-weights", "layers.0=0.5")
    assert result.exit_code == 0, result.output
    module = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(loramerge.load(tmp_path / "out").delta(module), 0.5 * adapter.delta(module))
