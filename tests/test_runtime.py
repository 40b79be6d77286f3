"""The resident-model runtime: adapters applied in memory match PEFT (unmerged PeftModel and merge_and_unload)."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

import loramerge
from loramerge.errors import IncompatibleAdapters, MissingDependency, UnsupportedAdapter, UnsupportedModel
from loramerge.runtime.resident import Runtime
from tests.cli_helpers import assert_clean_failure, run_cli
from tests.fold_models import tiny_gpt2, tiny_llama
from tests.peft_fixtures import make_peft_adapter
from tests.runtime_fixtures import VOCAB, char_tokenizer, random_ids, save_model


def peft_model(model, *folders, weights=None):
    """PEFT's unmerged model with one adapter, or the exact weighted sum of several (combination 'cat')."""
    from peft import PeftModel

    wrapped = PeftModel.from_pretrained(copy.deepcopy(model), str(folders[0]), adapter_name="s0").eval()
    if len(folders) > 1 or weights is not None:
        for i, folder in enumerate(folders[1:], start=1):
            wrapped.load_adapter(str(folder), adapter_name=f"s{i}")
        names = [f"s{i}" for i in range(len(folders))]
        wrapped.add_weighted_adapter(names, list(weights or [1.0] * len(folders)), "mix", combination_type="cat")
        wrapped.set_adapter("mix")
    return wrapped


@pytest.fixture(scope="module")
def gpt2_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    model = tiny_gpt2()
    targets = ["c_attn", "c_proj", "c_fc"]
    a = make_peft_adapter(model, root / "a", seed=3, r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True)
    b = make_peft_adapter(model, root / "b", seed=4, r=2, lora_alpha=2, target_modules=targets[:2], fan_in_fan_out=True)
    return model, a, b


@pytest.mark.parametrize("mode", ["patch", "hooks"])
def test_llama_adapter_matches_unmerged_peft(world, mode):
    model, folder = world["model"], world["adapters"]["a"]
    ids = random_ids(2, 12, VOCAB)
    expected = peft_model(model, folder)(input_ids=ids).logits
    runtime = Runtime(copy.deepcopy(model), mode=mode)
    with runtime.applied(folder):
        got = runtime.logits(ids)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["patch", "hooks"])
def test_weighted_sum_with_embeddings_matches_peft_cat(world, mode):
    model, adapters = world["model"], world["adapters"]
    ids = random_ids(2, 12, VOCAB, seed=1)
    expected = peft_model(model, adapters["a"], adapters["emb"], weights=[0.6, -1.3])(input_ids=ids).logits
    runtime = Runtime(copy.deepcopy(model), mode=mode)
    runtime.apply([adapters["a"], adapters["emb"]], [0.6, -1.3])
    assert torch.allclose(runtime.logits(ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["patch", "hooks"])
def test_gpt2_conv1d_weights_are_applied_transposed(gpt2_case, mode):
    model, a, b = gpt2_case
    ids = torch.randint(0, 80, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = peft_model(model, a, b, weights=[1.0, 0.5])(input_ids=ids).logits
    runtime = Runtime(copy.deepcopy(model), mode=mode)
    with runtime.applied([a, b], [1.0, 0.5]):
        got = runtime.logits(ids)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_patched_weights_equal_merge_and_unload(world):
    model, folder = world["model"], world["adapters"]["b"]
    merged = peft_model(model, folder).merge_and_unload()
    runtime = Runtime(copy.deepcopy(model))
    runtime.apply(folder)
    expected = dict(merged.named_parameters())
    for name, param in runtime.model.named_parameters():
        assert torch.allclose(param, expected[name], atol=1e-6), name


def test_restore_and_swaps_are_exact_and_never_reload(world):
    model, adapters = world["model"], world["adapters"]
    runtime = Runtime(copy.deepcopy(model))
    before = {k: v.clone() for k, v in runtime.model.state_dict().items()}
    runtime.apply(adapters["b"])
    alone = {k: v.clone() for k, v in runtime.model.state_dict().items()}
    runtime.apply(adapters["a"])  # a swap: b's modules restored, a's applied, from the saved originals
    runtime.apply(adapters["b"])
    assert all(torch.equal(v, alone[k]) for k, v in runtime.model.state_dict().items())
    with runtime.applied(adapters["a"]):
        assert runtime.applied_adapters[0][0].source == str(adapters["a"])
    assert runtime.applied_adapters == []
    assert all(torch.equal(v, before[k]) for k, v in runtime.model.state_dict().items())


def test_hooks_leave_weights_alone_and_the_context_manager_removes_them(world):
    runtime = Runtime(copy.deepcopy(world["model"]), mode="hooks")
    ids = random_ids(1, 8, VOCAB)
    base = runtime.logits(ids)
    weights = {k: v.clone() for k, v in runtime.model.state_dict().items()}
    with runtime:
        runtime.apply(world["adapters"]["a"])
        assert all(torch.equal(v, weights[k]) for k, v in runtime.model.state_dict().items())
        assert not torch.allclose(runtime.logits(ids), base)
    assert torch.equal(runtime.logits(ids), base)


def test_a_tied_lm_head_is_hooked_so_the_embedding_keeps_its_weight(tmp_path):
    model = tiny_llama(tie=True, vocab=VOCAB)
    folder = make_peft_adapter(model, tmp_path / "head", r=2, lora_alpha=2, target_modules=["lm_head"])
    ids = random_ids(1, 8, VOCAB)
    expected = peft_model(model, folder)(input_ids=ids).logits
    runtime = Runtime(copy.deepcopy(model))  # patch mode, but lm_head shares the embedding
    embedding = runtime.model.get_input_embeddings().weight.clone()
    runtime.apply(loramerge.load(folder).with_layers(loramerge.load(folder).layers, full_weights={}))
    assert torch.equal(runtime.model.get_input_embeddings().weight, embedding)
    assert torch.allclose(runtime.logits(ids), expected, atol=1e-5)


def test_load_keeps_the_checkpoint_dtype_unless_told(world, tmp_path):
    bf16 = save_model(tiny_llama(vocab=VOCAB, dtype=torch.bfloat16), tmp_path / "bf16")
    assert Runtime.load(bf16, device="cpu").dtype == torch.bfloat16
    assert Runtime.load(bf16, device="cpu", dtype="fp32").dtype == torch.float32
    runtime = Runtime.load(world["base"], device="auto")
    assert runtime.kind == "causal" and runtime.dtype == torch.float32
    assert runtime.tokenizer("ab")["input_ids"] == char_tokenizer()("ab")["input_ids"]


def test_an_unmatched_module_names_the_adapter_and_the_module(world):
    adapter = loramerge.load(world["adapters"]["a"])
    bad = adapter.with_layers({"model.layers.0.self_attn.q_prj": adapter["model.layers.0.self_attn.q_proj"]})
    with pytest.raises(IncompatibleAdapters, match=r"module model.layers.0.self_attn.q_prj not found.*nearest: "
                                                   r"model.layers.0.self_attn.q_proj.weight"):
        Runtime(copy.deepcopy(world["model"])).apply(bad)


def test_adapters_for_another_base_are_refused_before_anything_changes(world, tmp_path):
    wider = tiny_llama(vocab=VOCAB, hidden=48)
    other = make_peft_adapter(wider, tmp_path / "wide", r=2, lora_alpha=2, target_modules=["q_proj"])
    runtime = Runtime(copy.deepcopy(world["model"]))
    before = {k: v.clone() for k, v in runtime.model.state_dict().items()}
    with pytest.raises(IncompatibleAdapters, match=r"wide: module model.layers.0.self_attn.q_proj has a linear update "
                                                   r"of shape \(48, 48\) but base tensor"):
        runtime.apply([world["adapters"]["a"], other])
    assert all(torch.equal(v, before[k]) for k, v in runtime.model.state_dict().items())


def test_dora_is_refused_in_memory(world):
    adapter = loramerge.load(world["adapters"]["a"])
    module = adapter.modules[0]
    dora = adapter.with_layers({module: loramerge.LowRank(adapter[module].A, adapter[module].B,
                                                          magnitude=torch.ones(adapter[module].out_features))})
    with pytest.raises(UnsupportedAdapter, match=f"module {module} is DoRA"):
        Runtime(copy.deepcopy(world["model"])).apply(dora)


def test_a_model_type_transformers_cannot_load_is_a_clear_error(tmp_path):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "config.json").write_text(json.dumps({"model_type": "toy"}))
    with pytest.raises(UnsupportedModel, match=r"toy: model type 'toy' is not one transformers"):
        Runtime.load(tmp_path / "toy")


def test_a_missing_tokenizer_is_a_clear_error(tmp_path):
    folder = save_model(tiny_llama(vocab=VOCAB), tmp_path / "no-tokenizer")
    with pytest.raises(UnsupportedModel, match="no-tokenizer: no tokenizer could be loaded"):
        _ = Runtime.load(folder).tokenizer


def test_without_the_eval_extra_commands_say_how_to_install_it(world, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(MissingDependency, match=r'pip install "loramerge\[eval\]"'):
        Runtime.load(world["base"])
    result = run_cli("eval", world["base"], "--data", world["data"]["add"])
    assert_clean_failure(result, "needs transformers", 'pip install "loramerge[eval]"')


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                               num_heads=4, decoder_start_token_id=0)).eval()


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=32)).eval()


@pytest.mark.parametrize(("build", "kind", "targets"), [(tiny_t5, "seq2seq", ["q", "v", "wo"]),
                                                         (tiny_bert, "encoder", ["query", "value", "dense"])])
def test_seq2seq_and_encoder_models_come_for_free(tmp_path, build, kind, targets):
    model = build()
    folder = make_peft_adapter(model, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=targets)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    reference = peft_model(model, folder)
    inputs = {"decoder_input_ids": ids} if kind == "seq2seq" else {}
    with torch.no_grad():
        out = reference(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs)
    expected = out.logits if kind == "seq2seq" else out.last_hidden_state
    for mode in ("patch", "hooks"):
        runtime = Runtime(copy.deepcopy(model), mode=mode)
        assert runtime.kind == kind
        with runtime.applied(folder):
            assert torch.allclose(runtime.logits(ids), expected, atol=1e-5), mode
