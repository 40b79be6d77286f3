"""The PEFT writer: config fields, full-path rank patterns, metadata, dtype, atomic and --force outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import loramerge
from loramerge.core.adapter import Adapter, LowRank
from loramerge.io.formats.peft import full_path_patterns, pattern_key


def random_lowrank(out_f: int, in_f: int, rank: int, seed: int, scale: float = 1.0) -> LowRank:
    g = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g), scale)


def test_config_is_explicit_and_scale_is_baked(llama_adapters, tmp_path):
    merged = loramerge.merge([llama_adapters["patterns"], llama_adapters["rslora"]], weights=[0.5, 2.0])
    out = merged.save(tmp_path / "out")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["use_dora"] is False
    assert config["base_model_name_or_path"] == "tiny/llama"
    assert sorted(config["target_modules"]) == sorted(merged.modules)
    assert config["lora_alpha"] == config["r"]
    assert config["rank_pattern"] == config["alpha_pattern"]
    for module, lr in merged.layers.items():
        key = pattern_key(config["rank_pattern"], module)
        rank = config["rank_pattern"][key] if key else config["r"]
        assert rank == lr.rank
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    reread = loramerge.load(out)
    for module in merged.modules:
        assert reread[module].scale == 1.0
        torch.testing.assert_close(reread.delta(module), merged.delta(module))


def test_rank_patterns_survive_suffix_clashes():
    ranks = {"model.layers.0.q": 4, "vision.model.layers.0.q": 8, "text.q": 8, "q": 2}
    pattern = full_path_patterns(ranks, 8)
    for order in (pattern, dict(sorted(pattern.items())), dict(reversed(list(pattern.items())))):
        for module, rank in ranks.items():
            key = pattern_key(order, module)
            assert (order[key] if key else 8) == rank, (module, order)


def test_clashing_module_names_load_in_peft(tmp_path):
    from peft import PeftModel
    from torch import nn

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(6, 6)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(6, 6)
            self.sub = Inner()

        def forward(self, x):
            return self.sub.q(self.q(x))

    adapter = Adapter({"q": random_lowrank(6, 6, 2, 0), "sub.q": random_lowrank(6, 6, 3, 1)})
    out = adapter.save(tmp_path / "clash")
    peft_model = PeftModel.from_pretrained(Outer(), str(out))
    for name in ("q", "sub.q"):
        module = peft_model.base_model.model.get_submodule(name)
        torch.testing.assert_close(module.get_delta_weight("default"), adapter.delta(name))


def test_existing_output_needs_force(tmp_path):
    adapter = Adapter({"fc": random_lowrank(4, 3, 2, 0)})
    out = adapter.save(tmp_path / "out")
    with pytest.raises(loramerge.OutputExists, match="--force"):
        adapter.save(out)
    other = Adapter({"fc": random_lowrank(4, 3, 1, 5)})
    other.save(out, force=True)
    assert loramerge.load(out)["fc"].rank == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left behind


def test_failed_write_leaves_nothing(tmp_path):
    # an input-axis DoRA magnitude (old LyCORIS) has no PEFT form
    adapter = Adapter({"fc": LowRank(torch.ones(1, 3), torch.ones(4, 1), magnitude=torch.ones(1, 3), magnitude_axis="in")})
    with pytest.raises(loramerge.UnsupportedAdapter, match="DoRA"):
        adapter.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_embedding_and_conv_round_trip(conv_net, tmp_path):
    from tests.peft_fixtures import make_peft_adapter, peft_deltas

    folder = make_peft_adapter(conv_net, tmp_path / "src", r=3, lora_alpha=5, target_modules=["emb", "conv", "head"],
                               base_model_name=None)
    merged = loramerge.merge([folder, folder], weights=[0.25, 0.5], method="svd", rank=3)  # rank 3 is exact here
    oracle = peft_deltas(conv_net, merged.save(tmp_path / "out"))
    for module in merged.modules:
        torch.testing.assert_close(oracle[module], merged.delta(module), atol=1e-5, rtol=1e-4)
        source = loramerge.load(folder)
        torch.testing.assert_close(oracle[module], 0.75 * source.delta(module), atol=1e-5, rtol=1e-4)
