"""kohya / A1111 files: reading, names, scales, conv and Tucker, Flux fused qkv, DoRA, writing, hashes, merges."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from loramerge import (
    Adapter,
    IncompatibleAdapters,
    LowRank,
    UnknownFormat,
    UnsupportedAdapter,
    load,
    merge,
)
from loramerge.io.formats.sd_names import ARCHITECTURES
from tests.sd_fixtures import (
    assert_delta,
    delta_of,
    gen,
    kohya_module,
    lora_factors,
    randn,
    ref_lora,
    ref_tucker_locon,
)

SD1_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
SD1_CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
SD1_PROJ = "lora_unet_down_blocks_0_attentions_0_proj_in"
SD1_TE = "lora_te_text_model_encoder_layers_0_mlp_fc1"
SD1_TE_Q = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"


def save(tmp_path, tensors, name="lora.safetensors", metadata=None):
    path = tmp_path / name
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def sd1_file(tmp_path, seed=0, name="lora.safetensors"):
    """A small SD 1.x LoCon: attention linear, 3×3 conv, 1×1 conv and text-encoder modules."""
    g = gen(seed)
    spec = {
        SD1_Q: ((8, 8), 4, 2.0),
        SD1_CONV: ((8, 8, 3, 3), 3, 1.5),
        SD1_PROJ: ((8, 8, 1, 1), 2, 2.0),
        SD1_TE: ((16, 8), 4, None),  # no alpha: scale 1
    }
    tensors, refs = {}, {}
    for module, (shape, rank, alpha) in spec.items():
        down, up = lora_factors(shape, rank, g)
        tensors.update(kohya_module(module, down, up, alpha))
        refs[module] = ref_lora(down, up, alpha)
    return save(tmp_path, tensors, name), refs


def test_reads_sd1_names_scales_and_conv_shapes(tmp_path):
    path, refs = sd1_file(tmp_path)
    adapter = load(path)
    assert adapter.source_format == "kohya"
    assert adapter.config["architectures"][0] == "sd1"
    names = {
        SD1_Q: "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        SD1_CONV: "unet.down_blocks.0.resnets.0.conv1",
        SD1_PROJ: "unet.down_blocks.0.attentions.0.proj_in",
        SD1_TE: "text_encoder.text_model.encoder.layers.0.mlp.fc1",
    }
    assert sorted(adapter.modules) == sorted(names.values())
    for kohya, canonical in names.items():
        assert_delta(delta_of(adapter[canonical]), refs[kohya])
    assert adapter[names[SD1_CONV]].kind == "conv" and adapter[names[SD1_CONV]].delta_shape == (8, 8, 3, 3)
    assert adapter[names[SD1_TE]].scale == 1.0  # missing alpha means alpha = rank
    assert adapter[names[SD1_Q]].scale == 0.5


def test_a1111_scale_tensor_overrides_alpha(tmp_path):
    g = gen(1)
    down, up = lora_factors((8, 8), 4, g)
    tensors = kohya_module(SD1_TE_Q, down, up, 4.0)
    tensors[f"{SD1_TE_Q}.scale"] = torch.tensor(0.25)
    lr = load(save(tmp_path, tensors))["text_encoder.text_model.encoder.layers.1.self_attn.q_proj"]
    assert lr.scale == 0.25


def test_tucker_lora_mid_folds_exactly(tmp_path):
    g = gen(2)
    r = 3
    down = randn(r, 8, 1, 1, g=g)
    mid = randn(r, r, 3, 3, g=g)
    up = randn(8, r, 1, 1, g=g)
    tensors = {f"{SD1_CONV}.lora_down.weight": down, f"{SD1_CONV}.lora_mid.weight": mid,
               f"{SD1_CONV}.lora_up.weight": up, f"{SD1_CONV}.alpha": torch.tensor(1.0)}
    adapter = load(save(tmp_path, tensors), format="lycoris")
    lr = adapter["unet.down_blocks.0.resnets.0.conv1"]
    assert lr.rank == r and lr.delta_shape == (8, 8, 3, 3)
    assert_delta(delta_of(lr), ref_tucker_locon(down, mid, up, 1.0))


def test_kohya_round_trip_keeps_names_and_deltas_with_one_common_alpha(tmp_path):
    path, refs = sd1_file(tmp_path)
    adapter = load(path)
    out = adapter.save(tmp_path / "again.safetensors")
    assert out.is_file()
    original = safetensors.torch.load_file(str(path))
    written = safetensors.torch.load_file(str(out))
    assert set(written) == set(original) | {f"{SD1_TE}.alpha"}
    # alpha·r per module: 2 (q, rank 4), 1.5 (conv, rank 3), 2 (proj, rank 2), 4 (te, rank 4, no alpha).
    assert {float(written[k]) for k in written if k.endswith(".alpha")} == {2.0}
    for module in (SD1_Q, SD1_PROJ):  # already at alpha 2: stored bit for bit
        for part in ("lora_down.weight", "lora_up.weight"):
            assert torch.equal(written[f"{module}.{part}"], original[f"{module}.{part}"])
    for module, ref in refs.items():
        got = ref_lora(written[f"{module}.lora_down.weight"], written[f"{module}.lora_up.weight"],
                       float(written[f"{module}.alpha"]))
        assert_delta(got, ref)
    again = load(out)
    for m in adapter.modules:
        assert_delta(delta_of(again[m]), delta_of(adapter[m]))


def test_sdxl_diffusers_spelled_kohya_names_resolve_and_are_written_in_sgm_spelling(tmp_path):
    g = gen(3)
    down, up = lora_factors((640, 2048), 2, g)
    spelled = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k"
    adapter = load(save(tmp_path, kohya_module(spelled, down, up, 1.0)))
    module = "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"
    assert adapter.modules == [module] and adapter.config["architectures"] == ["sdxl"]
    out = adapter.save(tmp_path / "sgm.safetensors")
    keys = safetensors.torch.load_file(str(out))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.lora_down.weight" in keys
    assert_delta(delta_of(load(out)[module]), ref_lora(down, up, 1.0))


def _data_section(path):
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return raw[8 + size:]


def test_hashes_follow_kohya_and_are_computed_after_the_cast(tmp_path):
    g = gen(4)
    tensors = {}
    for i in range(4):  # > 1 MiB in fp16 so the legacy hash reads real data
        down, up = lora_factors((1280, 5120), 32, g)
        tensors.update(kohya_module(f"lora_te2_text_model_encoder_layers_{i}_mlp_fc2", down, up, 16.0))
    adapter = load(save(tmp_path, tensors))
    out = adapter.save(tmp_path / "half.safetensors", dtype="fp16")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert stored[next(k for k in stored if k.endswith("lora_down.weight"))].dtype == torch.float16
    # Model hash: SHA-256 of everything after the header of the file as written.
    assert meta["sshs_model_hash"] == hashlib.sha256(_data_section(out)).hexdigest()
    # Legacy hash: an independent serialisation with only the ss_* metadata, 64 KiB at 1 MiB.
    ss_only = {k: v for k, v in meta.items() if k.startswith("ss_")}
    blob = safetensors.torch.save(stored, metadata=ss_only)
    assert len(blob) > 0x110000
    assert meta["sshs_legacy_hash"] == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    fp32 = adapter.save(tmp_path / "full.safetensors", dtype="fp32")
    with safe_open(str(fp32), "pt") as f:
        assert f.metadata()["sshs_model_hash"] != meta["sshs_model_hash"]


def test_metadata_has_minimal_ss_keys_and_the_merge_recipe(tmp_path):
    path, _ = sd1_file(tmp_path)
    merged = merge([load(path), load(path)], method="linear", weights=[0.7, 0.3])
    out = merged.save(tmp_path / "merged.safetensors", format="kohya")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_network_dim"] == "8"  # both linear modules: rank 4 + 4
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "Dynamic"  # conv ranks 3 + 3 and 2 + 2
    recipe = json.loads(meta["loramerge"])
    assert recipe["method"] == "linear" and recipe["weights"] == [0.7, 0.3] and len(recipe["sources"]) == 2


def test_kohya_merge_is_the_exact_weighted_sum_including_conv(tmp_path):
    a_path, _ = sd1_file(tmp_path, seed=5, name="a.safetensors")
    b_path, _ = sd1_file(tmp_path, seed=6, name="b.safetensors")
    a, b = load(a_path), load(b_path)
    for method, kwargs in (("linear", {}), ("cat", {}), ("svd", {"rank": 100})):
        merged = merge([a, b], method=method, weights=[0.6, -1.2], **kwargs)
        for module in a.modules:
            expected = 0.6 * delta_of(a[module]) - 1.2 * delta_of(b[module])
            assert_delta(delta_of(merged[module]), expected)
        conv = merged["unet.down_blocks.0.resnets.0.conv1"]
        assert conv.kind == "conv" and conv.A.shape[1:] == (8, 3, 3) and conv.B.shape[2:] == (1, 1)
    out = merge([a, b], method="svd", rank=2)["unet.down_blocks.0.resnets.0.conv1"]
    dense = (delta_of(a["unet.down_blocks.0.resnets.0.conv1"]) + delta_of(b["unet.down_blocks.0.resnets.0.conv1"])).reshape(8, -1)
    s = torch.linalg.svdvals(dense)
    err = torch.linalg.norm(out.product(torch.float64).reshape(8, -1) - dense)
    assert float(err) == pytest.approx(float(s[2:].square().sum().sqrt()), rel=1e-4)  # Eckart–Young optimum


def test_unknown_key_layouts_list_the_first_unrecognised_keys(tmp_path):
    g = gen(7)
    down, up = lora_factors((8, 8), 2, g)
    tensors = kohya_module(SD1_Q, down, up, 1.0)
    tensors[f"{SD1_Q}.weird_tensor"] = torch.zeros(2)
    with pytest.raises(UnknownFormat, match=r"1 key\(s\) in no kohya/LyCORIS LoRA layout: .*weird_tensor"):
        load(save(tmp_path, tensors))
    with pytest.raises(UnknownFormat, match=r"first keys: foo\.bar"):
        load(save(tmp_path, {"foo.bar": torch.zeros(2)}, name="odd.safetensors"))


def test_mixed_architectures_in_one_file_are_refused(tmp_path):
    g = gen(8)
    tensors = {}
    for name, shape in (("lora_unet_input_blocks_4_1_proj_in", (640, 640)), ("lora_unet_double_blocks_0_img_attn_proj", (3072, 3072))):
        down, up = lora_factors(shape, 1, g)
        tensors.update(kohya_module(name, down, up, 1.0))
    with pytest.raises(IncompatibleAdapters, match=r"different architectures.*(SDXL.*Flux|Flux.*SDXL)"):
        load(save(tmp_path, tensors))


def test_merging_loras_of_different_architectures_is_refused(tmp_path):
    g = gen(9)
    sd1 = save(tmp_path, kohya_module(SD1_Q, *lora_factors((320, 320), 2, g), 1.0), "sd1.safetensors")
    down, up = lora_factors((3072, 3072), 1, g)
    flux = save(tmp_path, kohya_module("lora_unet_double_blocks_0_img_attn_proj", down, up, 1.0), "flux.safetensors")
    with pytest.raises(IncompatibleAdapters, match="different model architectures"):
        merge([sd1, flux])
    assert merge([load(sd1), load(flux)], ignore_base_mismatch=True).modules  # the override still works


def test_partly_unknown_names_are_listed_and_fully_unknown_files_stay_opaque(tmp_path):
    g = gen(10)
    known = kohya_module(SD1_Q, *lora_factors((8, 8), 2, g), 1.0)
    unknown = kohya_module("lora_unet_joint_blocks_0_x_block_attn_qkv", *lora_factors((24, 8), 2, g), 2.0)
    with pytest.raises(UnknownFormat, match=r"joint_blocks_0_x_block_attn_qkv.*--base"):
        load(save(tmp_path, {**known, **unknown}))
    opaque = load(save(tmp_path, unknown, "sd3.safetensors"))
    assert opaque.modules == ["lora_unet_joint_blocks_0_x_block_attn_qkv"] and "architectures" not in opaque.config
    out = merge([opaque, opaque], weights=[0.5, 0.5]).save(tmp_path / "sd3-merged.safetensors", format="kohya")
    written = safetensors.torch.load_file(str(out))
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in written
    assert_delta(delta_of(load(out)["lora_unet_joint_blocks_0_x_block_attn_qkv"]),
                               delta_of(opaque["lora_unet_joint_blocks_0_x_block_attn_qkv"]))


def test_base_checkpoint_resolves_names_and_checks_shapes(tmp_path):
    base = save(tmp_path, {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.zeros(8, 8, 1, 1),
        "model.diffusion_model.input_blocks.1.1.proj_in.bias": torch.zeros(8),
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(16, 8),
    }, "base.safetensors")
    g = gen(11)
    d1, u1 = lora_factors((8, 8, 1, 1), 2, g)
    d2, u2 = lora_factors((16, 8), 2, g)
    lora = save(tmp_path, {**kohya_module("lora_unet_input_blocks_1_1_proj_in", d1, u1, 1.0),
                           **kohya_module("lora_te_text_model_encoder_layers_0_mlp_fc1", d2, u2, None)})
    adapter = load(lora, base=base)
    assert sorted(adapter.modules) == ["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1",
                                       "model.diffusion_model.input_blocks.1.1.proj_in"]
    assert_delta(delta_of(adapter["model.diffusion_model.input_blocks.1.1.proj_in"]), ref_lora(d1, u1, 1.0))
    written = safetensors.torch.load_file(str(adapter.save(tmp_path / "back.safetensors")))
    assert {k.split(".")[0] for k in written} == {"lora_unet_input_blocks_1_1_proj_in",
                                                  "lora_te_text_model_encoder_layers_0_mlp_fc1"}
    wrong = save(tmp_path, kohya_module("lora_unet_input_blocks_1_1_proj_in", *lora_factors((4, 8, 1, 1), 2, g), 1.0),
                 "wrong.safetensors")
    with pytest.raises(IncompatibleAdapters, match=r"is \(8, 8, 1, 1\)"):
        load(wrong, base=base)
    missing = save(tmp_path, kohya_module("lora_unet_input_blocks_2_1_proj_in", d1, u1, 1.0), "missing.safetensors")
    with pytest.raises(UnknownFormat, match="input_blocks_2_1_proj_in"):
        load(missing, base=base)


# -- Flux fused q/k/v -------------------------------------------------------------------------

H = 8  # tiny Flux width: fused q/k/v has 3·H rows, single-block linear1 3·H + 4·H
QKV = "lora_unet_double_blocks_0_img_attn_qkv"
Q, K, V = (f"transformer.transformer_blocks.0.attn.{n}" for n in ("to_q", "to_k", "to_v"))


def test_fused_qkv_splits_exactly_and_fuses_back_at_the_same_rank(tmp_path):
    g = gen(12)
    down, up = lora_factors((3 * H, H), 4, g)
    adapter = load(save(tmp_path, kohya_module(QKV, down, up, 2.0)))
    assert sorted(adapter.modules) == sorted([Q, K, V])
    fused = ref_lora(down, up, 2.0)
    for i, m in enumerate((Q, K, V)):
        assert adapter[m].rank == 4
        assert_delta(delta_of(adapter[m]), fused[i * H:(i + 1) * H])
    written = safetensors.torch.load_file(str(adapter.save(tmp_path / "back.safetensors")))
    assert written[f"{QKV}.lora_down.weight"].shape == (4, H) and float(written[f"{QKV}.alpha"]) == 2.0
    torch.testing.assert_close(ref_lora(written[f"{QKV}.lora_down.weight"], written[f"{QKV}.lora_up.weight"], 2.0), fused)


def test_block_diagonal_split_qkv_keeps_each_part_small_and_fuses_back_with_the_alpha_correction(tmp_path):
    """kohya's split_qkv: up is block-diagonal with r/3 columns per part; alpha is per part."""
    g = gen(13)
    r = 2
    downs = [lora_factors((H, H), r, g)[0] for _ in range(3)]
    ups = [lora_factors((H, H), r, g)[1] for _ in range(3)]
    up = torch.block_diag(*ups)
    tensors = kohya_module(QKV, torch.cat(downs), up, 1.0)  # stored alpha 1 for rank 3r: scale 1/(3r)
    adapter = load(save(tmp_path, tensors))
    assert [adapter[m].rank for m in (Q, K, V)] == [r, r, r]
    for i, m in enumerate((Q, K, V)):
        assert_delta(delta_of(adapter[m]), ups[i].double() @ downs[i].double() / (3 * r))
    # Written back fused: block-diagonal at rank 3r, alpha = scale·3r so alpha/rank gives the scale.
    written = safetensors.torch.load_file(str(adapter.save(tmp_path / "back.safetensors")))
    assert written[f"{QKV}.lora_down.weight"].shape[0] == 3 * r
    assert float(written[f"{QKV}.alpha"]) == pytest.approx(1.0)


def test_separate_qkv_from_diffusers_fuse_block_diagonally_with_their_own_scales(tmp_path):
    g = gen(14)
    parts = {}
    for m, rank, scale in ((Q, 2, 0.5), (V, 3, 2.0)):  # no k: its rows are zero
        down, up = lora_factors((H, H), rank, g)
        parts[m] = LowRank(A=down, B=up, scale=scale)
    adapter = Adapter(parts)
    written = safetensors.torch.load_file(str(adapter.save(tmp_path / "fused.safetensors", format="kohya")))
    down, up, alpha = written[f"{QKV}.lora_down.weight"], written[f"{QKV}.lora_up.weight"], float(written[f"{QKV}.alpha"])
    assert down.shape == (5, H) and alpha == pytest.approx(5.0)  # scales differ: baked, alpha = rank
    fused = ref_lora(down, up, alpha)
    torch.testing.assert_close(fused[:H], delta_of(parts[Q]))
    assert torch.count_nonzero(fused[H:2 * H]) == 0
    torch.testing.assert_close(fused[2 * H:], delta_of(parts[V]))


def test_single_block_linear1_and_final_modulation_swap(tmp_path):
    g = gen(15)
    d1, u1 = lora_factors((7 * H, H), 3, g)
    d2, u2 = lora_factors((2 * H, H), 2, g)
    tensors = {**kohya_module("lora_unet_single_blocks_0_linear1", d1, u1, 1.5),
               **kohya_module("lora_unet_final_layer_adaLN_modulation_1", d2, u2, 2.0)}
    adapter = load(save(tmp_path, tensors))
    s = "transformer.single_transformer_blocks.0."
    fused = ref_lora(d1, u1, 1.5)
    assert_delta(delta_of(adapter[s + "attn.to_v"]), fused[2 * H:3 * H])
    assert_delta(delta_of(adapter[s + "proj_mlp"]), fused[3 * H:])
    final = ref_lora(d2, u2, 2.0)
    assert_delta(delta_of(adapter["transformer.norm_out.linear"]), torch.cat([final[H:], final[:H]]))
    written = safetensors.torch.load_file(str(adapter.save(tmp_path / "back.safetensors")))
    back = ref_lora(written["lora_unet_final_layer_adaLN_modulation_1.lora_down.weight"],
                    written["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"],
                    float(written["lora_unet_final_layer_adaLN_modulation_1.alpha"]))
    torch.testing.assert_close(back, final)


# -- DoRA -------------------------------------------------------------------------------------


def test_dora_scale_is_read_for_folding_and_refused_by_merges(tmp_path):
    g = gen(16)
    down, up = lora_factors((8, 8), 2, g)
    tensors = kohya_module(SD1_Q, down, up, 1.0)
    tensors[f"{SD1_Q}.dora_scale"] = torch.rand(8, 1, generator=g)
    adapter = load(save(tmp_path, tensors))
    lr = adapter["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert lr.magnitude.shape == (8,)
    torch.testing.assert_close(lr.magnitude, tensors[f"{SD1_Q}.dora_scale"][:, 0])
    with pytest.raises(UnsupportedAdapter, match="DoRA"):
        merge([adapter, adapter])
    written = safetensors.torch.load_file(str(adapter.save(tmp_path / "dora.safetensors")))
    assert torch.equal(written[f"{SD1_Q}.dora_scale"], tensors[f"{SD1_Q}.dora_scale"])
    # diffusers (PEFT-style) holds a per-output DoRA magnitude
    again = load(adapter.save(tmp_path / "dora-diffusers", format="diffusers"))
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    torch.testing.assert_close(again[module].magnitude.reshape(-1), lr.magnitude)
    tensors[f"{SD1_Q}.dora_scale"] = torch.rand(1, 8, generator=g)  # old input-axis convention
    old_axis = load(save(tmp_path, tensors, "dora_in.safetensors"))
    assert old_axis[module].magnitude.shape == (1, 8) and old_axis[module].magnitude_axis == "in"
    with pytest.raises(UnsupportedAdapter, match="DoRA"):
        old_axis.save(tmp_path / "dora-in-diffusers", format="diffusers")


def test_tables_cover_flux_fused_rows():
    t = ARCHITECTURES["flux"].kohya["lora_unet_single_blocks_3_linear1"]
    assert [p.size for p in t.pieces] == [3072, 3072, 3072, 12288] and t.shape == (21504, 3072)


def test_conversion_keeps_training_metadata_but_not_stale_hashes(tmp_path):
    g = gen(17)
    tensors = kohya_module(SD1_Q, *lora_factors((8, 8), 2, g), 1.0)
    meta = {"ss_tag_frequency": '{"a": {"cat": 3}}', "ss_network_dim": "2", "sshs_model_hash": "old",
            "modelspec.hash_sha256": "0xold", "modelspec.title": "cats"}
    out = load(save(tmp_path, tensors, metadata=meta)).save(tmp_path / "converted.safetensors")
    with safe_open(str(out), "pt") as f:
        written = f.metadata()
    assert written["ss_tag_frequency"] == meta["ss_tag_frequency"] and written["modelspec.title"] == "cats"
    assert "modelspec.hash_sha256" not in written and written["sshs_model_hash"] != "old"
    assert json.loads(written["loramerge"])["source_format"] == "kohya"
