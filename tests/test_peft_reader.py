"""The PEFT reader against PEFT itself: the same ΔW for every module, layer type, scale rule and dtype."""

from __future__ import annotations

import pytest
import torch

import loramerge
from tests.peft_fixtures import make_peft_adapter, peft_deltas


def assert_same_deltas(adapter: loramerge.Adapter, oracle: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert set(adapter.modules) == set(oracle)
    for module, expected in oracle.items():
        got = adapter.delta(module)
        assert got.shape == expected.shape, module
        torch.testing.assert_close(got, expected, atol=atol, rtol=1e-5, msg=module)


@pytest.mark.parametrize("name", ["plain", "rslora", "patterns", "same_rank"])
def test_llama_adapters_match_peft_delta(llama, llama_adapters, name):
    adapter = loramerge.load(llama_adapters[name])
    assert adapter.source_format == "peft"
    assert adapter.base_model == "tiny/llama"
    assert_same_deltas(adapter, peft_deltas(llama, llama_adapters[name]))


def test_rank_and_alpha_patterns_are_applied(llama_adapters):
    adapter = loramerge.load(llama_adapters["patterns"])
    assert adapter["model.layers.0.mlp.up_proj"].rank == 2
    assert adapter["model.layers.1.self_attn.q_proj"].rank == 3
    assert adapter["model.layers.0.self_attn.q_proj"].rank == 6
    assert adapter["model.layers.0.mlp.gate_proj"].scale == pytest.approx(3 / 6)
    assert adapter["model.layers.0.self_attn.v_proj"].scale == pytest.approx(1.5 / 6)
    assert adapter["model.layers.1.self_attn.v_proj"].scale == pytest.approx(12 / 6)


def test_rslora_scale(llama_adapters):
    adapter = loramerge.load(llama_adapters["rslora"])
    assert adapter["model.layers.0.self_attn.q_proj"].scale == pytest.approx(4 / 8**0.5)


def test_gpt2_conv1d_is_transposed_in_base(gpt2, tmp_path):
    folder = make_peft_adapter(gpt2, tmp_path / "gpt2", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                               fan_in_fan_out=True)
    adapter = loramerge.load(folder)
    lr = adapter["transformer.h.0.attn.c_attn"]
    assert lr.fan_in_fan_out and lr.base_shape == (32, 96)
    assert_same_deltas(adapter, peft_deltas(gpt2, folder))


def test_conv_and_embedding(conv_net, tmp_path):
    folder = make_peft_adapter(conv_net, tmp_path / "conv", r=4, lora_alpha=6,
                               target_modules=["emb", "conv", "pointwise", "head"], base_model_name=None)
    adapter = loramerge.load(folder)
    assert adapter["emb"].kind == "embedding" and adapter["emb"].base_shape == (20, 6)
    assert adapter["conv"].kind == "conv" and adapter["conv"].delta_shape == (6, 3, 3, 3)
    assert adapter["pointwise"].delta_shape == (5, 6, 1, 1)
    assert_same_deltas(adapter, peft_deltas(conv_net, folder))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_adapters(llama, tmp_path, dtype):
    folder = make_peft_adapter(llama, tmp_path / "half", r=4, lora_alpha=8, target_modules=["q_proj"], dtype=dtype)
    adapter = loramerge.load(folder)
    assert adapter.dtype == dtype
    assert adapter["model.layers.0.self_attn.q_proj"].A.dtype == dtype
    assert_same_deltas(adapter, peft_deltas(llama, folder), atol=1e-2)


def test_pickle_adapter_needs_allow_pickle(llama, tmp_path):
    from safetensors.torch import load_file

    folder = make_peft_adapter(llama, tmp_path / "pkl", r=2, lora_alpha=2, target_modules=["q_proj"])
    tensors = load_file(folder / "adapter_model.safetensors")
    torch.save(tensors, folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(loramerge.PickleRefused, match="allow-pickle"):
        loramerge.load(folder)
    adapter = loramerge.load(folder, allow_pickle=True)
    assert_same_deltas(adapter, peft_deltas(llama, folder))


def test_dora_is_read_but_refused_in_merge(llama, tmp_path):
    folder = make_peft_adapter(llama, tmp_path / "dora", r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    adapter = loramerge.load(folder)
    assert adapter["model.layers.0.self_attn.q_proj"].magnitude is not None
    with pytest.raises(loramerge.UnsupportedAdapter, match="DoRA"):
        loramerge.merge([adapter, adapter])


def test_lora_bias_is_refused_in_merge(llama, tmp_path):
    folder = make_peft_adapter(llama, tmp_path / "bias", r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True)
    adapter = loramerge.load(folder)
    assert adapter["model.layers.0.self_attn.q_proj"].bias is not None
    with pytest.raises(loramerge.UnsupportedAdapter, match="lora_bias"):
        loramerge.merge([adapter])
