"""LyCORIS LoHa, LoKr and full modules: exact B@A expansions against the dense products."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from loramerge import UnsupportedAdapter, convert, load
from loramerge.io.formats import detect_format
from tests.sd_fixtures import assert_delta, delta_of, gen, randn, ref_loha, ref_lokr

TE_FC1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"  # SD1 (3072, 768), tiny here (12, 10)
TE_FC1_MODULE = "text_encoder.text_model.encoder.layers.0.mlp.fc1"
SD1_CONV = "lora_unet_down_blocks_1_resnets_0_conv1"  # SD1 (640, 320, 3, 3)
SD1_CONV_MODULE = "unet.down_blocks.1.resnets.0.conv1"


def save(tmp_path, tensors, name="lyco.safetensors"):
    path = tmp_path / name
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_loha_is_exact_with_rank_r1_r2(tmp_path):
    g = gen(0)
    w1a, w1b, w2a, w2b = randn(12, 2, g=g), randn(2, 10, g=g), randn(12, 3, g=g), randn(3, 10, g=g)
    tensors = {f"{TE_FC1}.hada_w1_a": w1a, f"{TE_FC1}.hada_w1_b": w1b, f"{TE_FC1}.hada_w2_a": w2a,
               f"{TE_FC1}.hada_w2_b": w2b, f"{TE_FC1}.alpha": torch.tensor(1.0)}
    path = save(tmp_path, tensors)
    assert detect_format(path).name == "lycoris"
    adapter = load(path)
    lr = adapter[TE_FC1_MODULE]
    assert adapter.source_format == "lycoris" and adapter.config["algorithms"][TE_FC1_MODULE] == "loha"
    assert lr.rank == 6  # r₁·r₂ = 2·3
    assert_delta(delta_of(lr), ref_loha(w1a, w1b, w2a, w2b, 1.0, (12, 10)))


def test_loha_conv_uses_the_table_shape_and_caps_the_rank_exactly(tmp_path):
    g = gen(1)
    r = 2
    w1a, w1b = randn(640, r, g=g, scale=0.1), randn(r, 320 * 9, g=g, scale=0.1)
    w2a, w2b = randn(640, r, g=g, scale=0.1), randn(r, 320 * 9, g=g, scale=0.1)
    tensors = {f"{SD1_CONV}.hada_w1_a": w1a, f"{SD1_CONV}.hada_w1_b": w1b, f"{SD1_CONV}.hada_w2_a": w2a,
               f"{SD1_CONV}.hada_w2_b": w2b, f"{SD1_CONV}.alpha": torch.tensor(4.0)}
    lr = load(save(tmp_path, tensors))[SD1_CONV_MODULE]
    assert lr.kind == "conv" and lr.delta_shape == (640, 320, 3, 3) and lr.rank == 4
    assert_delta(delta_of(lr), ref_loha(w1a, w1b, w2a, w2b, 4.0, (640, 320, 3, 3)))

    big = {f"{TE_FC1}.hada_w1_a": randn(12, 4, g=g), f"{TE_FC1}.hada_w1_b": randn(4, 10, g=g),
           f"{TE_FC1}.hada_w2_a": randn(12, 4, g=g), f"{TE_FC1}.hada_w2_b": randn(4, 10, g=g)}
    capped = load(save(tmp_path, big, "big.safetensors"))[TE_FC1_MODULE]
    assert capped.rank == 10  # 16 > min(12, 10): stored as the exact dense product
    ref = ref_loha(*(big[f"{TE_FC1}.hada_{k}"] for k in ("w1_a", "w1_b", "w2_a", "w2_b")), 4.0, (12, 10))
    assert_delta(delta_of(capped), ref)  # no alpha: scale 1 (alpha = 4 = rank)


def test_loha_tucker_conv(tmp_path):
    g = gen(2)
    r = 2
    t1, t2 = randn(r, r, 3, 3, g=g), randn(r, r, 3, 3, g=g)
    w1a, w1b, w2a, w2b = randn(r, 640, g=g), randn(r, 320, g=g), randn(r, 640, g=g), randn(r, 320, g=g)
    tensors = {f"{SD1_CONV}.hada_t1": t1, f"{SD1_CONV}.hada_t2": t2, f"{SD1_CONV}.hada_w1_a": w1a,
               f"{SD1_CONV}.hada_w1_b": w1b, f"{SD1_CONV}.hada_w2_a": w2a, f"{SD1_CONV}.hada_w2_b": w2b,
               f"{SD1_CONV}.alpha": torch.tensor(1.0)}
    lr = load(save(tmp_path, tensors))[SD1_CONV_MODULE]
    assert lr.delta_shape == (640, 320, 3, 3) and lr.rank == 4
    assert_delta(delta_of(lr), ref_loha(w1a, w1b, w2a, w2b, 1.0, None, t1=t1, t2=t2))


@pytest.mark.parametrize("layout", ["w1-full/w2-factored", "w1-factored/w2-full", "both-factored", "both-full"])
def test_lokr_follows_the_kronecker_rank_rule(tmp_path, layout):
    g = gen(3)
    a, b, c, d, r = 2, 5, 6, 2, 3  # (12, 10) = (a·c, b·d)
    w1 = randn(a, b, g=g)
    w2 = randn(c, d, g=g)
    tensors = {f"{TE_FC1}.alpha": torch.tensor(1.5)}
    if layout.startswith("w1-full") or layout == "both-full":
        tensors[f"{TE_FC1}.lokr_w1"] = w1
        rank1 = min(a, b)
    else:
        w1a, w1b = randn(a, 1, g=g), randn(1, b, g=g)
        tensors.update({f"{TE_FC1}.lokr_w1_a": w1a, f"{TE_FC1}.lokr_w1_b": w1b})
        w1, rank1 = w1a @ w1b, 1
    if layout.endswith("w2-full") or layout == "both-full":
        tensors[f"{TE_FC1}.lokr_w2"] = w2
        rank2 = min(c, d)
    else:
        w2a, w2b = randn(c, r, g=g), randn(r, d, g=g)
        tensors.update({f"{TE_FC1}.lokr_w2_a": w2a, f"{TE_FC1}.lokr_w2_b": w2b})
        w2, rank2 = w2a @ w2b, r
    # scale = alpha / (rank of the factored part; w2's first); both full: no rank, scale 1.
    scale = {"w1-full/w2-factored": 1.5 / r, "w1-factored/w2-full": 1.5 / 1, "both-factored": 1.5 / r, "both-full": 1.0}[layout]
    lr = load(save(tmp_path, tensors))[TE_FC1_MODULE]
    assert lr.rank == min(rank1 * rank2, 10)
    assert_delta(delta_of(lr), ref_lokr(w1, w2, scale))


def test_lokr_conv_full_and_tucker_w2(tmp_path):
    g = gen(4)
    w1 = randn(4, 2, g=g)  # (640, 320) = (4·160, 2·160)
    w2 = randn(160, 160, 3, 3, g=g, scale=0.1)
    full = {f"{SD1_CONV}.lokr_w1": w1, f"{SD1_CONV}.lokr_w2": w2}
    lr = load(save(tmp_path, full))[SD1_CONV_MODULE]
    assert lr.delta_shape == (640, 320, 3, 3)
    assert_delta(delta_of(lr), ref_lokr(w1, w2, 1.0))

    r = 2
    t2, w2a, w2b = randn(r, r, 3, 3, g=g), randn(r, 160, g=g), randn(r, 160, g=g)
    tucker = {f"{SD1_CONV}.lokr_w1": w1, f"{SD1_CONV}.lokr_t2": t2, f"{SD1_CONV}.lokr_w2_a": w2a,
              f"{SD1_CONV}.lokr_w2_b": w2b, f"{SD1_CONV}.alpha": torch.tensor(1.0)}
    lr = load(save(tmp_path, tucker, "tucker.safetensors"))[SD1_CONV_MODULE]
    w2_dense = torch.einsum("ijkl,ip,jr->prkl", t2.double(), w2a.double(), w2b.double())
    assert lr.rank == 2 * r
    assert_delta(delta_of(lr), ref_lokr(w1, w2_dense, 1.0 / r))


def test_full_diff_is_kept_bit_exact(tmp_path):
    g = gen(5)
    diff = randn(12, 10, g=g)
    lr = load(save(tmp_path, {f"{TE_FC1}.diff": diff}))[TE_FC1_MODULE]
    assert lr.rank == 10
    assert torch.equal(lr.product(), diff)


def test_base_dependent_algorithms_are_refused_by_name(tmp_path):
    tensors = {f"{TE_FC1}.oft_blocks": torch.zeros(4, 3, 3), f"{TE_FC1}.alpha": torch.tensor(1.0)}
    with pytest.raises(UnsupportedAdapter, match=f"{TE_FC1} is a LyCORIS OFT update"):
        load(save(tmp_path, tensors), format="lycoris")


def test_lycoris_converts_to_kohya_with_equal_deltas(tmp_path):
    g = gen(6)
    tensors = {f"{TE_FC1}.hada_w1_a": randn(12, 2, g=g), f"{TE_FC1}.hada_w1_b": randn(2, 10, g=g),
               f"{TE_FC1}.hada_w2_a": randn(12, 2, g=g), f"{TE_FC1}.hada_w2_b": randn(2, 10, g=g),
               f"{TE_FC1}.alpha": torch.tensor(3.0)}
    source = save(tmp_path, tensors)
    kept = convert(source, tmp_path / "same.safetensors")  # default: LyCORIS again, the LoHa unexpanded
    assert set(safetensors.torch.load_file(str(kept))) == set(tensors)
    out = convert(source, tmp_path / "locon.safetensors", to="kohya")
    written = safetensors.torch.load_file(str(out))
    assert set(written) == {f"{TE_FC1}.lora_down.weight", f"{TE_FC1}.lora_up.weight", f"{TE_FC1}.alpha"}
    again = load(out)
    assert again.source_format == "kohya"
    assert_delta(delta_of(again[TE_FC1_MODULE]), delta_of(load(source)[TE_FC1_MODULE]))
