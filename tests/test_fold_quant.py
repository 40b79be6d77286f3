"""Folding into quantized bases: QLoRA's dequant(quant(W)) (--base-quant), pre-quantized checkpoints (bitsandbytes
4/8-bit written by transformers, FP8, GPTQ, AWQ), and quantized output (--quantize, --keep-quant)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import loramerge
from loramerge.io.checkpoint import open_checkpoint
from loramerge.io.quant import bnb4, fp8
from tests.cli_helpers import assert_clean_failure, run_cli
from tests.peft_fixtures import make_peft_adapter
from tests.quant_fixtures import ADAPTED, bnb_checkpoint, fp8_checkpoint, int4_checkpoint, tiny_quant_llama

bnb_functional = pytest.importorskip("bitsandbytes.functional")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

BNB = {
    "nf4_double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.bfloat16),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    model = tiny_quant_llama()
    model.save_pretrained(root / "base")
    adapter = make_peft_adapter(model.float(), root / "adapter", base_model_name=None, r=4, lora_alpha=8,
                                target_modules=list(ADAPTED))
    deltas = {}
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model).float(), str(adapter))
    for name, module in pm.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            deltas[f"{name}.weight"] = module.get_delta_weight("default").detach().double()
    return root, model, adapter, deltas


def _bnb_dequantized(folder) -> dict[str, torch.Tensor]:
    """Every quantized weight of a transformers-loaded bitsandbytes model, dequantized by bitsandbytes itself."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), device_map="cpu")
    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if type(weight).__name__ == "Params4bit":
            out[f"{name}.weight"] = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
        elif type(weight).__name__ == "Int8Params":
            out[f"{name}.weight"] = bnb_functional.int8_vectorwise_dequant(weight.data, weight.SCB)
    return out


def _within_one_ulp(got: torch.Tensor, exact: torch.Tensor) -> bool:
    """``got`` (bfloat16) is ``exact`` rounded to bfloat16, up to one unit in the last place (float32 accumulation)."""
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp(min=1e-30))) - 7)
    return bool(((got.double() - exact).abs() <= ulp).all())


def _check_fold(out, reference: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor], dtype=torch.bfloat16):
    """Unadapted weights equal the reference bit for bit (in ``dtype``); adapted ones are reference + ΔW rounded once."""
    folded = open_checkpoint(out)
    for name, expected in reference.items():
        got = folded.read(name)
        assert got.dtype == dtype, name
        if name in deltas:
            assert _within_one_ulp(got, expected.double() + deltas[name]), name
            assert not torch.equal(got, expected.to(dtype))
        else:
            assert torch.equal(got, expected.to(dtype)), name


@pytest.mark.parametrize("kind", list(BNB))
def test_prequantized_bitsandbytes_base_is_dequantized_exactly(llama, tmp_path, kind):
    root, _, adapter, deltas = llama
    quantized = bnb_checkpoint(root / "base", tmp_path / "q", **BNB[kind])
    reference = _bnb_dequantized(quantized)
    assert len(reference) == 14  # 7 linears × 2 layers; lm_head stays in bf16
    loramerge.fold(quantized, adapter, output=tmp_path / "out")
    _check_fold(tmp_path / "out", reference, deltas)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    recipe = json.loads((tmp_path / "out" / "loramerge.json").read_text())
    assert sorted(recipe["quantization"]["dequantized"]) == sorted(reference)
    names = set(open_checkpoint(tmp_path / "out").tensors)
    assert not any(n.endswith((".SCB", ".absmax", ".weight_format")) or "quant_state" in n for n in names)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert type(loaded.model.layers[0].self_attn.q_proj) is torch.nn.Linear


@pytest.mark.parametrize("quant_type", bnb4.QUANT_TYPES)
def test_base_quant_folds_into_the_weights_transformers_quantizes(llama, tmp_path, quant_type):
    root, _, adapter, deltas = llama
    # the QLoRA base: transformers loads the bf16 checkpoint in 4-bit; bitsandbytes dequantizes each weight
    reference = _bnb_dequantized(bnb_checkpoint(root / "base", tmp_path / "q", **{
        **BNB["fp4"], "bnb_4bit_quant_type": quant_type}))
    result = loramerge.fold(root / "base", adapter, output=tmp_path / "out", base_quant=quant_type)
    _check_fold(tmp_path / "out", reference, deltas)
    folded, base = open_checkpoint(tmp_path / "out"), open_checkpoint(root / "base")
    for kept in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(folded.read(kept), base.read(kept))
    quantization = result.recipe["quantization"]
    assert sorted(quantization["quantized"]) == sorted(reference) and quantization["kept"] == ["lm_head"]


def test_base_quant_with_double_quant_uses_the_double_quantized_scales(llama, tmp_path):
    root, _, adapter, deltas = llama
    spec = loramerge.BaseQuant("nf4", blocksize=128, double_quant=True)
    loramerge.fold(root / "base", adapter, output=tmp_path / "out", base_quant=spec)
    base = open_checkpoint(root / "base")
    reference = {name: bnb4.fake_quantize_4bit(base.read(name), "nf4", 128, True)
                 for name in base.tensors if name.endswith("proj.weight")}
    _check_fold(tmp_path / "out", reference, deltas)
    plain = {name: bnb4.fake_quantize_4bit(base.read(name), "nf4", 128, False) for name in reference}
    assert any(not torch.equal(plain[n], reference[n]) for n in reference)


def test_base_quant_of_gpt2_quantizes_the_transposed_conv1d_weights(tmp_path):
    from tests.peft_fixtures import tiny_gpt2

    model = tiny_gpt2().to(torch.bfloat16)
    config = model.config
    config.n_embd, config.n_inner = 64, 128
    model = transformers.GPT2LMHeadModel(config).to(torch.bfloat16).eval()
    model.save_pretrained(tmp_path / "base")
    adapter = make_peft_adapter(model.float(), tmp_path / "ad", base_model_name=None, r=2, target_modules=["c_attn"])
    reference = _bnb_dequantized(bnb_checkpoint(tmp_path / "base", tmp_path / "q", **BNB["fp4"]))
    loramerge.fold(tmp_path / "base", adapter, output=tmp_path / "out", base_quant="fp4")
    folded = open_checkpoint(tmp_path / "out")
    assert torch.equal(folded.read("transformer.h.0.mlp.c_fc.weight").T, reference["transformer.h.0.mlp.c_fc.weight"])


def test_quantize_nf4_writes_a_checkpoint_transformers_loads_in_4bit(llama, tmp_path):
    root, _, adapter, _ = llama
    loramerge.fold(root / "base", adapter, output=tmp_path / "plain", base_quant="nf4")
    result = loramerge.fold(root / "base", adapter, output=tmp_path / "q", base_quant="nf4", quantize="nf4")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert len(result.recipe["quantization"]["written_quantized"]["tensors"]) == 14
    dequantized = _bnb_dequantized(tmp_path / "q")
    plain = open_checkpoint(tmp_path / "plain")
    assert len(dequantized) == 14
    for name, value in dequantized.items():
        assert torch.equal(value, bnb4.fake_quantize_4bit(plain.read(name), "nf4")), name


def test_fp8_base_matches_transformers_dequantization_and_keep_quant_writes_fp8(llama, tmp_path):
    root, _, adapter, deltas = llama
    quantized = fp8_checkpoint(root / "base", tmp_path / "fp8")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(quantized), quantization_config=transformers.FineGrainedFP8Config(dequantize=True), dtype=torch.float32)
    reference = {f"{n}.weight": m.weight.data for n, m in model.named_modules() if n.endswith("proj")}
    loramerge.fold(quantized, adapter, output=tmp_path / "out")
    _check_fold(tmp_path / "out", reference, deltas)
    loramerge.fold(quantized, adapter, output=tmp_path / "kept", keep_quant=True)
    kept, folded = open_checkpoint(tmp_path / "kept"), open_checkpoint(tmp_path / "out")
    config = json.loads((tmp_path / "kept" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"
    for name in reference:
        assert kept.tensors[name].dtype == "F8_E4M3"
        q, scale_inv = fp8.quantize_fp8(folded.read(name))
        assert torch.equal(kept.read(name).view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(kept.read(name + "_scale_inv"), scale_inv)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_int4_base_is_dequantized_and_requantizing_is_refused(llama, tmp_path, method):
    root, _, adapter, deltas = llama
    quantized, exact = int4_checkpoint(root / "base", tmp_path / "q", method)
    loramerge.fold(quantized, adapter, output=tmp_path / "out")
    _check_fold(tmp_path / "out", exact, deltas)
    assert not any(n.endswith((".qweight", ".qzeros", ".scales", ".g_idx")) for n in open_checkpoint(tmp_path / "out").tensors)
    with pytest.raises(loramerge.UnsupportedAdapter, match="calibration data"):
        loramerge.fold(quantized, adapter, output=tmp_path / "kept", keep_quant=True)
    assert not (tmp_path / "kept").exists()


def test_unknown_quantization_is_refused_naming_it(llama, tmp_path):
    root, _, adapter, _ = llama
    import shutil

    shutil.copytree(root / "base", tmp_path / "hqq")
    config = json.loads((tmp_path / "hqq" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "hqq", "bits": 3}
    (tmp_path / "hqq" / "config.json").write_text(json.dumps(config))
    with pytest.raises(loramerge.UnsupportedAdapter, match="quantized with hqq"):
        loramerge.fold(tmp_path / "hqq", adapter, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert_clean_failure(run_cli("fold", tmp_path / "hqq", adapter, "-o", tmp_path / "out"), "hqq")
    assert not (tmp_path / "out").exists()


def test_cli_base_quant_and_refusals(llama, tmp_path):
    root, _, adapter, _ = llama
    result = run_cli("fold", root / "base", adapter, "-o", tmp_path / "out", "--base-quant", "nf4", "--blocksize", "128",
                     "--double-quant")
    assert result.exit_code == 0, result.output
    recipe = json.loads((tmp_path / "out" / "loramerge.json").read_text())
    assert recipe["quantization"]["base_quant"] == {"quant_type": "nf4", "blocksize": 128, "double_quant": True,
                                                    "skip_modules": None}
    assert_clean_failure(run_cli("fold", root / "base", adapter, "-o", tmp_path / "o2", "--keep-quant"), "not quantized")
    assert_clean_failure(run_cli("fold", root / "base", adapter, "-o", tmp_path / "o3", "--base-quant", "nf4",
                                 "--blocksize", "100"), "block size")


@pytest.mark.parametrize("kind", ["nf4_double", "int8"])
def test_keep_quant_writes_the_bitsandbytes_format_again(llama, tmp_path, kind):
    root, _, adapter, _ = llama
    quantized = bnb_checkpoint(root / "base", tmp_path / "q", **BNB[kind])
    loramerge.fold(quantized, adapter, output=tmp_path / "plain")
    result = loramerge.fold(quantized, adapter, output=tmp_path / "kept", keep_quant=True)
    assert len(result.recipe["quantization"]["written_quantized"]["tensors"]) == 14
    config = json.loads((tmp_path / "kept" / "config.json").read_text())
    assert config["quantization_config"] == json.loads((quantized / "config.json").read_text())["quantization_config"]
    plain = open_checkpoint(tmp_path / "plain")
    for name, value in _bnb_dequantized(tmp_path / "kept").items():  # transformers loads it quantized
        weight = plain.read(name)
        if kind == "int8":
            codes, scb, _ = bnb_functional.int8_vectorwise_quant(weight)
            expected = bnb_functional.int8_vectorwise_dequant(codes, scb)
        else:
            expected = bnb4.fake_quantize_4bit(weight, "nf4", 64, double_quant=True)
        assert torch.equal(value, expected), name


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _rows_in_steps(view, name: str, step: int) -> torch.Tensor:
    """Tensor ``name`` of a base view, read as the fold reads it: ``step`` rows at a time through ``mapped``."""
    with view.mapped(name) as rows:
        return torch.cat([rows[s:s + step].clone() for s in range(0, view.tensors[name].shape[0], step)])


@pytest.mark.parametrize("quant_type", bnb4.QUANT_TYPES)
def test_base_quant_rows_are_bitsandbytes_bits_whatever_the_row_blocks(llama, quant_type):
    from loramerge.io.quant.view import BaseQuant, open_base

    root = llama[0]
    base = open_checkpoint(root / "base")
    for blocksize, double in [(64, False), (128, True), (256, False)]:  # 128 and 256: blocks straddle rows
        view = open_base(root / "base", base_quant=BaseQuant(quant_type, blocksize, double))
        assert len(view.decoders) == 14
        for name in view.decoders:
            weight = base.read(name)
            expected = bnb4.fake_quantize_4bit(weight, quant_type, blocksize, double)
            if not double:
                packed, state = bnb_functional.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type)
                assert torch.equal(_bits(bnb_functional.dequantize_4bit(packed, state)), _bits(expected)), name
            for step in (3, 64, weight.shape[0]):
                assert torch.equal(_bits(_rows_in_steps(view, name, step)), _bits(expected)), (name, step)


@pytest.mark.parametrize("kind", ["nf4_double", "fp4"])
def test_prequantized_rows_are_bitsandbytes_bits_whatever_the_row_blocks(llama, tmp_path, kind):
    from loramerge.io.quant.view import open_base

    quantized = bnb_checkpoint(llama[0] / "base", tmp_path / "q", **BNB[kind])
    reference = _bnb_dequantized(quantized)
    view = open_base(quantized)
    for name, expected in reference.items():
        for step in (3, 64, expected.shape[0]):
            assert torch.equal(_bits(_rows_in_steps(view, name, step)), _bits(expected)), (name, step)
