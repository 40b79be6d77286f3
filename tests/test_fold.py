"""fold: PEFT's merge_and_unload is the oracle, on tiny transformers models and toy modules."""

from __future__ import annotations

import copy
import errno
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from loramerge import Adapter, LowRank, fold, load, merge
from loramerge.cli import main
from loramerge.errors import (
    CorruptFile,
    IncompatibleAdapters,
    InvalidParameter,
    LoramergeWarning,
    OutputExists,
    PickleRefused,
    UnsupportedAdapter,
    WriteFailed,
)
from loramerge.fold.record import file_sha256
from loramerge.io.checkpoint import open_checkpoint
from loramerge.io.shards import ShardWriter
from tests.fold_models import (
    load_toy,
    make_adapter,
    peft_adapted,
    peft_merged,
    save_base,
    save_toy,
    tiny_gpt2,
    tiny_llama,
    toy,
)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = torch.tensor([[1, 5, 9, 33, 2, 71, 8]])


def folded_state(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(folder)
    return {name: ckpt.read(name) for name in ckpt.tensors}


def max_diff(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    common = set(ours) & set(ref)
    assert common, "no tensors in common"
    return max(float((ours[n].double() - ref[n].double()).abs().max()) for n in common)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory, llama):
    return save_base(llama, tmp_path_factory.mktemp("llama") / "base", max_shard_size="30KB")


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory, llama):
    return make_adapter(llama, tmp_path_factory.mktemp("ad") / "lora", seed=3, target_modules=ALL_LINEAR)


# ------------------------------------------------------------------------------ oracle comparisons


def test_sharded_llama_matches_peft_and_keeps_layout(tmp_path, llama, llama_base, llama_adapter):
    result = fold(llama_base, llama_adapter, output=tmp_path / "out")
    ref = peft_merged(llama, [llama_adapter]).state_dict()
    ours = folded_state(tmp_path / "out")
    assert max_diff(ours, ref) <= 1e-6
    assert set(ours) == set(open_checkpoint(llama_base).tensors)
    # Every weight the adapter targets changed, nothing else did.
    base = folded_state(llama_base)
    changed = {n for n in ours if not torch.equal(ours[n], base[n])}
    assert changed == set(result.changed) and len(changed) == 2 * len(ALL_LINEAR)
    # Same shard files, same tensor placement, plain files copied, recipe written.
    in_index = json.loads((llama_base / "model.safetensors.index.json").read_text())
    out_index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == in_index["weight_map"] and len(set(in_index["weight_map"].values())) >= 4
    assert out_index["metadata"]["total_size"] == in_index["metadata"]["total_size"]
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "out" / name).read_bytes() == (llama_base / name).read_bytes()
    recipe = json.loads((tmp_path / "out" / "loramerge.json").read_text())
    assert recipe["adapters"][0]["files"]["adapter_model.safetensors"] == file_sha256(
        llama_adapter / "adapter_model.safetensors")
    assert recipe["command"] == "fold" and recipe["dtype"] == "keep"


def test_output_loads_in_transformers_with_adapted_logits(tmp_path, llama, llama_base, llama_adapter):
    from transformers import LlamaForCausalLM

    fold(llama_base, llama_adapter, output=tmp_path / "out")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        ours = model(TOKENS).logits
        adapted = peft_adapted(llama, llama_adapter)(TOKENS).logits
        base = llama(TOKENS).logits
    assert float((ours - base).abs().max()) > 1e-2  # the adapter matters
    assert torch.allclose(ours, adapted, atol=1e-4)


def test_rslora_and_rank_alpha_patterns(tmp_path, llama, llama_base):
    adapter = make_adapter(
        llama, tmp_path / "ad", seed=5, target_modules=["q_proj", "v_proj", "down_proj", "up_proj"], r=4,
        lora_alpha=6, use_rslora=True, rank_pattern={"down_proj": 2, "layers.1.self_attn.v_proj": 6},
        alpha_pattern={"up_proj": 3},
    )
    fold(llama_base, adapter, output=tmp_path / "out")
    assert max_diff(folded_state(tmp_path / "out"), peft_merged(llama, [adapter]).state_dict()) <= 1e-6


def test_gpt2_conv1d_including_square_layers(tmp_path):
    from transformers import GPT2LMHeadModel

    model = tiny_gpt2()
    base = save_base(model, tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "ad", target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    fold(base, adapter, output=tmp_path / "out")
    ref = peft_merged(model, [adapter]).state_dict()
    assert max_diff(folded_state(tmp_path / "out"), ref) <= 1e-6
    assert open_checkpoint(base).tensors["transformer.h.0.attn.c_proj.weight"].shape == (24, 24)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(TOKENS).logits, peft_adapted(model, adapter)(TOKENS).logits, atol=1e-4)


def test_gpt2_square_conv1d_with_wrong_fan_in_fan_out_flag(tmp_path):
    """A saved fan_in_fan_out can be wrong (PEFT records the last layer's); the base layout decides."""
    model = tiny_gpt2()
    base = save_base(model, tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "ad", target_modules=["c_proj"], fan_in_fan_out=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["fan_in_fan_out"] = False
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    fold(base, adapter, output=tmp_path / "out")
    assert max_diff(folded_state(tmp_path / "out"), peft_merged(model, [adapter]).state_dict()) <= 1e-6


def test_toy_embedding_conv2d_linear(tmp_path):
    model = toy()
    base = save_toy(model, tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "ad", target_modules=["emb", "conv", "point", "fc"], r=3, lora_alpha=5)
    fold(base, adapter, output=tmp_path / "out")
    assert max_diff(folded_state(tmp_path / "out"), peft_merged(model, [adapter]).state_dict()) <= 1e-6


def test_lora_bias_modules_to_save_and_trained_biases(tmp_path):
    model = toy()
    base = save_toy(model, tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "ad", target_modules=["fc", "conv"], lora_bias=True,
                           modules_to_save=["head"])
    # Give modules_to_save a trained value, as training would.
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(model), adapter, is_trainable=True)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p))
    pm.save_pretrained(tmp_path / "ad2")
    adapter = tmp_path / "ad2"
    assert load(adapter).full_weights and any(lr.bias is not None for lr in load(adapter).layers.values())
    fold(base, adapter, output=tmp_path / "out")
    ours, ref = folded_state(tmp_path / "out"), peft_merged(model, [adapter]).state_dict()
    assert max_diff(ours, ref) <= 1e-6
    assert not torch.equal(ours["head.weight"], model.state_dict()["head.weight"])
    assert not torch.equal(ours["fc.bias"], model.state_dict()["fc.bias"])

    biased = make_adapter(model, tmp_path / "ad3", target_modules=["fc"], bias="all")
    fold(base, biased, output=tmp_path / "out3")
    assert max_diff(folded_state(tmp_path / "out3"), peft_merged(model, [biased]).state_dict()) <= 1e-6


@pytest.mark.parametrize("case", ["llama", "gpt2", "toy"])
def test_dora_matches_peft(tmp_path, case):
    if case == "llama":
        model, targets = tiny_llama(seed=2), ["q_proj", "down_proj", "lm_head"]
        base = save_base(model, tmp_path / "base")
    elif case == "gpt2":
        model, targets = tiny_gpt2(seed=2), ["c_attn", "c_proj"]
        base = save_base(model, tmp_path / "base")
    else:
        model, targets = toy(seed=2), ["emb", "conv", "fc"]
        base = save_toy(model, tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "ad", target_modules=targets, use_dora=True,
                           fan_in_fan_out=case == "gpt2")
    assert any(lr.magnitude is not None for lr in load(adapter).layers.values())
    fold(base, adapter, output=tmp_path / "out")
    assert max_diff(folded_state(tmp_path / "out"), peft_merged(model, [adapter]).state_dict()) <= 2e-6


def test_two_dora_adapters_fold_sequentially_like_peft(tmp_path, llama, llama_base):
    a = make_adapter(llama, tmp_path / "a", seed=11, target_modules=["q_proj", "v_proj"], use_dora=True)
    b = make_adapter(llama, tmp_path / "b", seed=12, target_modules=["q_proj", "o_proj"], use_dora=True, r=2)
    fold(llama_base, [a, b], output=tmp_path / "out")
    assert max_diff(folded_state(tmp_path / "out"), peft_merged(llama, [a, b]).state_dict()) <= 2e-6
    with pytest.raises(UnsupportedAdapter, match="one after another"):
        fold(llama_base, [a, b], output=tmp_path / "svd", method="svd", rank=4)
    with pytest.raises(InvalidParameter, match="cannot be subtracted"):
        fold(llama_base, a, output=tmp_path / "neg", weights=[-1])
    assert not (tmp_path / "svd").exists() and not (tmp_path / "neg").exists()


def test_several_adapters_weighted_sum_and_svd(tmp_path, llama, llama_base, llama_adapter):
    other = make_adapter(llama, tmp_path / "b", seed=9, target_modules=["q_proj", "k_proj"], r=2, lora_alpha=2)
    both = peft_merged(llama, [llama_adapter, other]).state_dict()
    fold(llama_base, [llama_adapter, other], output=tmp_path / "sum")
    assert max_diff(folded_state(tmp_path / "sum"), both) <= 1e-6

    sources = [load(llama_adapter), load(other)]
    fold(llama_base, [llama_adapter, other], output=tmp_path / "w", weights=[0.7, -0.3])
    base = folded_state(llama_base)
    expected = {n: t.double() for n, t in base.items()}
    for adapter, w in zip(sources, [0.7, -0.3]):
        for module in adapter.modules:
            expected[f"{module}.weight"] += w * adapter.delta(module, torch.float64)
    assert max_diff(folded_state(tmp_path / "w"), expected) <= 1e-6

    result = fold(llama_base, [llama_adapter, other], output=tmp_path / "svd", method="svd", rank=3,
                  weights=[0.7, -0.3])
    merged = merge(sources, method="svd", rank=3, weights=[0.7, -0.3], dtype=torch.float32)
    expected = {n: t.double() for n, t in base.items()}
    for module in merged.modules:
        expected[f"{module}.weight"] += merged.delta(module, torch.float64)
    assert max_diff(folded_state(tmp_path / "svd"), expected) <= 1e-6
    assert result.merge_report is not None and result.merge_report.method == "svd"


def test_negative_weight_unfolds(tmp_path, llama_base, llama_adapter):
    fold(llama_base, llama_adapter, output=tmp_path / "on")
    fold(tmp_path / "on", llama_adapter, output=tmp_path / "off", weights=[-1.0])
    assert max_diff(folded_state(tmp_path / "off"), folded_state(llama_base)) <= 1e-6
    recipe = json.loads((tmp_path / "off" / "loramerge.json").read_text())
    assert recipe["base"]["recipe"]["command"] == "fold"  # the history is kept


def test_bf16_rounds_once(tmp_path):
    model = tiny_llama(seed=4, dtype=torch.bfloat16)
    base = save_base(model, tmp_path / "base")
    adapter = make_adapter(model.float(), tmp_path / "ad", target_modules=ALL_LINEAR)
    fold(base, adapter, output=tmp_path / "out")
    ours = folded_state(tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in ours.values())
    exact = peft_merged(model.float(), [adapter]).state_dict()  # the float32 fold of the same bf16 weights
    worst_ulps = 0.0
    for name, t in ours.items():
        ulp = exact[name].abs().clamp_min(1e-30) * 2.0**-7
        worst_ulps = max(worst_ulps, float(((t.double() - exact[name].double()).abs() / ulp).max()))
    assert worst_ulps <= 0.5 + 1e-3  # correctly rounded once
    twice = peft_merged(model, [adapter]).state_dict()  # PEFT on the bf16 model rounds twice
    assert max_diff(ours, twice) <= 0.02


def test_dtype_change_and_reshard(tmp_path, llama, llama_base, llama_adapter):
    from transformers import LlamaForCausalLM

    fold(llama_base, llama_adapter, output=tmp_path / "one", shard_size="1GB")
    assert sorted(p.name for p in (tmp_path / "one").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    fold(llama_base, llama_adapter, output=tmp_path / "many", shard_size="8KB", dtype="fp16")
    shards = sorted(p.name for p in (tmp_path / "many").glob("*.safetensors"))
    assert len(shards) >= 5 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for path in (tmp_path / "many").glob("*.safetensors"):
        ckpt = open_checkpoint(tmp_path / "many")
        data = sum(t.nbytes for t in ckpt.tensors_in(path))
        assert data <= 8000 or len(ckpt.tensors_in(path)) == 1
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert json.loads((tmp_path / "many" / "config.json").read_text())["dtype"] == "float16"
    one, many = folded_state(tmp_path / "one"), folded_state(tmp_path / "many")
    assert all(t.dtype == torch.float16 for t in many.values())
    assert all(torch.equal(many[n], one[n].half()) for n in one)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "many", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(model(TOKENS).logits, peft_adapted(llama, llama_adapter)(TOKENS).logits, atol=2e-2)


def test_adapter_trained_on_inner_model(tmp_path, llama, llama_base):
    inner = make_adapter(llama.model, tmp_path / "ad", target_modules=["q_proj"])
    assert load(inner).modules[0].startswith("layers.")
    fold(llama_base, inner, output=tmp_path / "out")
    ours, base = folded_state(tmp_path / "out"), folded_state(llama_base)
    delta = load(inner).delta("layers.0.self_attn.q_proj")
    assert torch.allclose(ours["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"] + delta,
                          atol=1e-6)


# ---------------------------------------------------------------------------------- tied embeddings


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    model = tiny_llama(tie=True, seed=6)
    root = tmp_path_factory.mktemp("tied")
    base = save_base(model, root / "base")
    assert "lm_head.weight" not in open_checkpoint(base).tensors
    return model, base, root


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_tied_embeddings(tmp_path, tied, target):
    from transformers import LlamaForCausalLM

    model, base, _ = tied
    adapter = make_adapter(model, tmp_path / "ad", target_modules=[target, "q_proj"])
    with pytest.raises(UnsupportedAdapter, match="tied"):
        fold(base, adapter, output=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

    # untie: both matrices written, the flag cleared, and the model is the adapted model exactly.
    fold(base, adapter, output=tmp_path / "untied", tied_embeddings_mode="untie")
    assert json.loads((tmp_path / "untied" / "config.json").read_text())["tie_word_embeddings"] is False
    state = folded_state(tmp_path / "untied")
    assert "lm_head.weight" in state and not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "untied").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(TOKENS).logits, peft_adapted(model, adapter)(TOKENS).logits, atol=1e-4)

    # shared: PEFT's merge_and_unload, which changes the shared matrix for both uses.
    fold(base, adapter, output=tmp_path / "shared", tied_embeddings_mode="shared")
    state = folded_state(tmp_path / "shared")
    assert "lm_head.weight" not in state
    assert max_diff(state, peft_merged(model, [adapter]).state_dict()) <= 1e-6
    assert json.loads((tmp_path / "shared" / "config.json").read_text())["tie_word_embeddings"] is True


def test_untouched_tied_embeddings_need_no_choice(tmp_path, tied):
    model, base, _ = tied
    adapter = make_adapter(model, tmp_path / "ad", target_modules=["q_proj"])
    fold(base, adapter, output=tmp_path / "out")
    assert max_diff(folded_state(tmp_path / "out"), peft_merged(model, [adapter]).state_dict()) <= 1e-6


# ------------------------------------------------------------------------------------- bad input


def test_pickle_base_refused_unless_allowed(tmp_path, llama, llama_adapter):
    base = tmp_path / "base"
    llama.save_pretrained(base)
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    (base / "model.safetensors").unlink()
    torch.save(state, base / "pytorch_model.bin")
    with pytest.raises(PickleRefused, match="allow-pickle"):
        fold(base, llama_adapter, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    fold(base, llama_adapter, output=tmp_path / "out", allow_pickle=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if "safetensors" in p.name or ".bin" in p.name) == [
        "model.safetensors"]
    assert max_diff(folded_state(tmp_path / "out"), peft_merged(llama, [llama_adapter]).state_dict()) <= 1e-6


def test_module_not_found_names_nearest(tmp_path, llama_base):
    g = torch.Generator().manual_seed(0)
    adapter = Adapter({"model.layers.0.self_attn.q_prj": LowRank(torch.randn(2, 32, generator=g),
                                                                  torch.randn(32, 2, generator=g))})
    with pytest.raises(IncompatibleAdapters, match=r"q_prj not found.*nearest: model\.layers\.0\.self_attn\.q_proj"):
        fold(llama_base, adapter, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shape_mismatch(tmp_path, llama_base):
    adapter = Adapter({"model.layers.0.mlp.down_proj": LowRank(torch.ones(2, 30), torch.ones(32, 2))})
    with pytest.raises(IncompatibleAdapters, match=r"down_proj.*shape \(32, 30\).*shape \(32, 48\)"):
        fold(llama_base, adapter, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_base_model_mismatch_warns_or_refuses(tmp_path, llama_base, llama_adapter):
    config = json.loads((llama_adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/other-model"
    other = tmp_path / "ad"
    shutil.copytree(llama_adapter, other)
    (other / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(LoramergeWarning, match="other-model"):
        result = fold(llama_base, other, output=tmp_path / "out")
    assert result.warnings
    with pytest.raises(IncompatibleAdapters, match="other-model"):
        fold(llama_base, other, output=tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoramergeWarning)
        fold(llama_base, llama_adapter, output=tmp_path / "same")  # its own base: no warning


def test_index_naming_missing_shard(tmp_path, llama_base, llama_adapter):
    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    shard = sorted(base.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CorruptFile, match=f"missing.*|{shard.name}"):
        fold(base, llama_adapter, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_shard(tmp_path, llama_base, llama_adapter):
    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    shard = sorted(base.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CorruptFile, match="truncated"):
        fold(base, llama_adapter, output=tmp_path / "out")


def test_disk_full_while_writing_leaves_nothing(tmp_path, monkeypatch, llama_base, llama_adapter):
    calls = {"n": 0}
    original = ShardWriter.write_parts

    def failing(self, name, parts):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, name, parts)

    monkeypatch.setattr(ShardWriter, "write_parts", failing)
    with pytest.raises(WriteFailed, match="no space left"):
        fold(llama_base, llama_adapter, output=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary folder


def test_not_enough_free_space_is_refused_up_front(tmp_path, monkeypatch, llama_base, llama_adapter):
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
    with pytest.raises(WriteFailed, match="needs"):
        fold(llama_base, llama_adapter, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tmp_path, llama_base, llama_adapter):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(OutputExists):
        fold(llama_base, llama_adapter, output=tmp_path / "out")
    fold(llama_base, llama_adapter, output=tmp_path / "out", force=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "loramerge.json").exists()


def test_bad_options(tmp_path, llama_base, llama_adapter):
    with pytest.raises(InvalidParameter, match="weight"):
        fold(llama_base, llama_adapter, output=tmp_path / "o", weights=[1, 2])
    with pytest.raises(InvalidParameter, match="shard-size"):
        fold(llama_base, llama_adapter, output=tmp_path / "o", shard_size="lots")
    with pytest.raises(InvalidParameter, match="dtype"):
        fold(llama_base, llama_adapter, output=tmp_path / "o", dtype="fp64")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------- CLI


def test_cli_fold(tmp_path, llama, llama_base, llama_adapter):
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(main, ["fold", str(llama_base), str(llama_adapter), "-o", str(out), "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    assert all(t.dtype == torch.bfloat16 for t in folded_state(out).values())
    result = runner.invoke(main, ["fold", str(out), str(llama_adapter), "-o", str(tmp_path / "back"),
                                  "--weights", "-1", "--dtype", "fp32"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("case", ["missing-base", "exists", "module", "strict", "pickle"])
def test_cli_errors_are_one_line(tmp_path, llama_base, llama_adapter, case):
    out = tmp_path / "out"
    args = ["fold", str(llama_base), str(llama_adapter), "-o", str(out)]
    if case == "missing-base":
        args[1] = str(tmp_path / "nope")
    elif case == "exists":
        out.mkdir()
        (out / "x").write_text("x")
    elif case == "module":
        bad = Adapter({"model.layers.0.self_attn.q_prj": LowRank(torch.ones(1, 32), torch.ones(32, 1))})
        args[2] = str(bad.save(tmp_path / "bad"))
    elif case == "strict":
        config = json.loads((llama_adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "someone/other"
        shutil.copytree(llama_adapter, tmp_path / "ad")
        (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(config))
        args[2] = str(tmp_path / "ad")
        args.append("--strict")
    elif case == "pickle":
        base = tmp_path / "pk"
        base.mkdir()
        shutil.copy(llama_base / "config.json", base)
        torch.save({"w": torch.zeros(1)}, base / "pytorch_model.bin")
        args[1] = str(base)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output
    if case != "exists":
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_cli_warning_is_printed(tmp_path, llama_base, llama_adapter):
    config = json.loads((llama_adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/other"
    shutil.copytree(llama_adapter, tmp_path / "ad")
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["fold", str(llama_base), str(tmp_path / "ad"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0 and "warning: " in result.output and "someone/other" in result.output


def test_toy_model_output_runs(tmp_path):
    model = toy()
    base = save_toy(model, tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "ad", target_modules=["emb", "conv", "fc"])
    fold(base, adapter, output=tmp_path / "out")
    image = torch.randn(1, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_toy(tmp_path / "out")(TOKENS % 40, image)
        adapted = peft_adapted(model, adapter)(TOKENS % 40, image)
    assert torch.allclose(ours, adapted, atol=1e-5)


def test_disk_full_in_the_background_writer(tmp_path, monkeypatch, llama_base, llama_adapter):
    def full(self, name, source):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ShardWriter, "_copy", full)
    with pytest.raises(WriteFailed, match="no space left"):
        fold(llama_base, llama_adapter, output=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
