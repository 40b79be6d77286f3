"""MoE LoRAs: PEFT adapters on fused expert parameters (``target_parameters``) read, written, merged and converted."""

from __future__ import annotations

import copy

import pytest
import torch

import loramerge
from loramerge import Adapter, LowRank
from loramerge.io.experts import parse_expert_name, to_fused, to_per_expert
from loramerge.merge.methods import available_methods
from tests.moe_fixtures import EXPERT_TARGETS, tiny_moe, tokens
from tests.peft_fixtures import make_peft_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("fused expert parameters are transformers 5's layout", allow_module_level=True)

KINDS = ["qwen3_moe", "gpt_oss"]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for kind in KINDS:
        model = tiny_moe(kind)
        adapters = [
            make_peft_adapter(model, root / f"{kind}_{i}", seed=i, base_model_name=None, r=2 + i, lora_alpha=4,
                              target_modules=["q_proj"], target_parameters=EXPERT_TARGETS)
            for i in range(2)
        ]
        out[kind] = (model, adapters)
    return out


def _peft_logits(model, folders, weights=None):
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(folders[0]), adapter_name="a0")
    for i, folder in enumerate(folders[1:], 1):
        pm.load_adapter(str(folder), adapter_name=f"a{i}")
    pm.base_model.set_adapter([f"a{i}" for i in range(len(folders))])
    with torch.no_grad():
        return pm(tokens()).logits


def _param_deltas(model, folder) -> dict[str, torch.Tensor]:
    """PEFT's get_delta_weight of every ParamWrapper, keyed ``module.param``."""
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(folder))
    out = {}
    for name, module in pm.base_model.model.named_modules():
        if type(module).__name__ == "ParamWrapper":
            clean = name.replace(".base_layer", "")
            out[f"{clean}.{module.parameter_name}"] = module.get_delta_weight("default").detach()
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_reader_gives_each_expert_peft_delta(moe, kind):
    model, folders = moe[kind]
    adapter = loramerge.load(folders[0])
    experts = [n for n in adapter if parse_expert_name(n)]
    assert len(experts) == 2 * 4 and "model.layers.0.self_attn.q_proj" in adapter
    transposed = kind == "gpt_oss"
    for key, delta in _param_deltas(model, folders[0]).items():
        for e in range(delta.shape[0]):
            ours = adapter[f"{key}[{e}]"].product()
            torch.testing.assert_close(ours.T if transposed else ours, delta[e], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_written_adapter_loads_in_peft_with_the_same_logits(moe, kind, tmp_path):
    model, folders = moe[kind]
    out = loramerge.load(folders[0]).save(tmp_path / "again")
    torch.testing.assert_close(_peft_logits(model, [out]), _peft_logits(model, [folders[0]]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_linear_merge_matches_peft_with_both_adapters_active(moe, kind, tmp_path):
    model, folders = moe[kind]
    merged = loramerge.merge(folders, method="linear")
    assert merged["model.layers.0.mlp.experts.down_proj[1]"].rank == 2 + 3
    out = merged.save(tmp_path / "merged")
    torch.testing.assert_close(_peft_logits(model, [out]), _peft_logits(model, folders), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", [m.name for m in available_methods() if not m.needs_statistics])
def test_every_method_merges_each_expert_as_its_own_module(moe, method):
    _, folders = moe["qwen3_moe"]
    sources = [loramerge.load(f) for f in folders]
    kwargs = {"rank": 3} if method in ("svd", "ties", "tsv") else {}
    merged = loramerge.merge(sources, method=method, weights=[0.6, 0.8], **kwargs)
    name = "model.layers.0.mlp.experts.gate_up_proj[2]"
    alone = loramerge.merge([s.with_layers({name: s[name]}) for s in sources], method=method, weights=[0.6, 0.8],
                            **kwargs)
    torch.testing.assert_close(merged.delta(name), alone.delta(name), rtol=0, atol=0)
    assert {n for n in merged if parse_expert_name(n)} == {n for n in sources[0] if parse_expert_name(n)}


@pytest.mark.parametrize("layout", ["qwen2_moe", "mixtral"])
def test_per_expert_conversion_round_trips_exactly(moe, layout):
    adapter = loramerge.load(moe["qwen3_moe"][1][0])
    split = to_per_expert(adapter, layout)
    gate = "model.layers.0.mlp.experts.2.gate_proj" if layout == "qwen2_moe" else \
        "model.layers.0.block_sparse_moe.experts.2.w1"
    up = gate.replace("gate_proj", "up_proj").replace(".w1", ".w3")
    fused = adapter["model.layers.0.mlp.experts.gate_up_proj[2]"].product(torch.float64)
    torch.testing.assert_close(torch.cat([split[gate].product(torch.float64), split[up].product(torch.float64)]), fused)
    back = to_fused(split, layout)
    assert set(back) == set(adapter)
    for name in adapter:
        torch.testing.assert_close(back.delta(name, torch.float64), adapter.delta(name, torch.float64))


def test_writer_pads_experts_to_one_rank_and_fills_missing_experts(tmp_path):
    g = torch.Generator().manual_seed(0)
    layers = {
        "m.experts.down_proj[0]": LowRank(torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), scale=0.5),
        "m.experts.down_proj[2]": LowRank(torch.randn(3, 6, generator=g), torch.randn(5, 3, generator=g)),
    }
    back = loramerge.load(Adapter(layers).save(tmp_path / "a"))
    assert back.config["target_parameters"] == ["m.experts.down_proj"]
    assert sorted(back) == ["m.experts.down_proj[0]", "m.experts.down_proj[1]", "m.experts.down_proj[2]"]
    assert back["m.experts.down_proj[1]"].rank == 3 and not back.delta("m.experts.down_proj[1]").any()
    for name, lr in layers.items():
        torch.testing.assert_close(back.delta(name), lr.base_delta(), rtol=1e-6, atol=1e-6)


def test_several_unknown_parameters_on_one_module_are_refused(moe, tmp_path):
    import json
    import shutil

    folder = tmp_path / "odd"
    shutil.copytree(moe["qwen3_moe"][1][0], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_parameters"] = ["mlp.experts.w_in", "mlp.experts.w_out"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(loramerge.UnsupportedAdapter, match="order PEFT nested them"):
        loramerge.load(folder)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens()).logits


def _folded_logits(folder) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return _logits(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval())


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss", "mixtral"])
def test_fold_of_fused_expert_lora_matches_peft_merge_and_unload(kind, tmp_path):
    model = tiny_moe(kind)
    model.save_pretrained(tmp_path / "base")
    adapter = make_peft_adapter(model, tmp_path / "ad", base_model_name=None, r=2, lora_alpha=4,
                                target_modules=["q_proj"], target_parameters=EXPERT_TARGETS)
    result = loramerge.fold(tmp_path / "base", adapter, output=tmp_path / "out")
    assert any("experts" in name for name in result.changed)
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).merge_and_unload()
    expected = _logits(merged)
    assert not torch.allclose(expected, _logits(model), atol=1e-3)
    torch.testing.assert_close(_folded_logits(tmp_path / "out"), expected, rtol=1e-5, atol=1e-5)


def test_per_expert_mixtral_lora_folds_into_the_per_expert_checkpoint(tmp_path):
    model = tiny_moe("mixtral")
    model.save_pretrained(tmp_path / "base")
    fused = make_peft_adapter(model, tmp_path / "ad", base_model_name=None, r=2, lora_alpha=4,
                              target_parameters=EXPERT_TARGETS)
    per_expert = to_per_expert(loramerge.load(fused), "mixtral")
    assert "model.layers.0.block_sparse_moe.experts.3.w2" in per_expert
    folder = per_expert.save(tmp_path / "per_expert")
    assert loramerge.load(folder).config["target_modules"]  # plain modules, no target_parameters
    loramerge.fold(tmp_path / "base", folder, output=tmp_path / "out")
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(fused)).merge_and_unload()
    torch.testing.assert_close(_folded_logits(tmp_path / "out"), _logits(merged), rtol=1e-5, atol=1e-5)


def test_expert_lora_that_fits_no_expert_tensor_is_refused(tmp_path):
    model = tiny_moe("qwen3_moe")
    model.save_pretrained(tmp_path / "base")
    odd = Adapter({"model.layers.0.mlp.experts.down_proj[9]": LowRank(torch.ones(1, 24), torch.ones(32, 1))})
    with pytest.raises(loramerge.IncompatibleAdapters, match=r"down_proj\[9\]"):
        loramerge.fold(tmp_path / "base", odd, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_converts_fused_experts_to_per_expert_modules_and_back(moe, tmp_path):
    from tests.cli_helpers import run_cli

    source = moe["qwen3_moe"][1][0]
    result = run_cli("convert", source, "-o", tmp_path / "split", "--experts", "split")
    assert result.exit_code == 0, result.output
    split = loramerge.load(tmp_path / "split")
    assert "model.layers.0.mlp.experts.1.up_proj" in split and not split.config.get("target_parameters")
    result = run_cli("convert", tmp_path / "split", "-o", tmp_path / "fused", "--experts", "fuse")
    assert result.exit_code == 0, result.output
    fused, original = loramerge.load(tmp_path / "fused"), loramerge.load(source)
    assert set(fused) == set(original)
    for name in original:
        torch.testing.assert_close(fused.delta(name), original.delta(name), rtol=1e-5, atol=1e-6)
