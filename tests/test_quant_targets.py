"""Which weights --base-quant quantizes: transformers' answer, and the on-disk cache that keeps it."""

from __future__ import annotations

import json

import pytest

from loramerge.io import cache
from loramerge.io.quant import targets as quant_targets
from loramerge.io.quant.targets import bnb_targets
from tests.peft_fixtures import tiny_gpt2, tiny_llama


def _config(model) -> dict:
    """The model's config.json as save_pretrained writes it (with ``architectures``)."""
    return dict(json.loads(model.config.to_json_string()), architectures=[type(model).__name__])


def _names(model) -> set[str]:
    return set(model.state_dict())


def _same(a, b) -> bool:
    return (a.weights, a.transposed, a.skipped, a.missing) == (b.weights, b.transposed, b.skipped, b.missing)


def _refuse_transformers(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("transformers was asked although the cache holds the answer")

    monkeypatch.setattr(quant_targets, "_linear_modules", refuse)


@pytest.fixture
def cache_folder(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("LORAMERGE_CACHE", str(folder))
    return folder


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_second_ask_reads_the_cache_and_gives_transformers_answer(make, cache_folder, monkeypatch):
    model = make()
    first = bnb_targets(_config(model), _names(model))
    assert first.weights and "lm_head" in first.skipped
    assert len(list((cache_folder / quant_targets.CACHE_SECTION).glob("*.json"))) == 1
    _refuse_transformers(monkeypatch)
    again = bnb_targets(_config(model), _names(model))
    assert _same(first, again)
    if make is tiny_gpt2:
        assert again.transposed and again.transposed <= set(again.weights)


def test_the_key_holds_the_config_and_the_skip_list(cache_folder, monkeypatch):
    model = tiny_llama()
    config, names = _config(model), _names(model)
    bnb_targets(config, names)
    skipping = bnb_targets(config, names, skip_modules=["lm_head", "down_proj"])
    assert not any(w.endswith("down_proj.weight") for w in skipping.weights) and "model.layers.0.mlp.down_proj" in skipping.skipped
    wider = dict(config, num_hidden_layers=config["num_hidden_layers"] + 1)
    calls = []
    real = quant_targets._linear_modules
    monkeypatch.setattr(quant_targets, "_linear_modules", lambda *a: calls.append(a) or real(*a))
    deeper = bnb_targets(wider, names)
    assert calls, "a different config must not be answered from another config's entry"
    assert deeper.missing, "the extra layer's modules are not in the checkpoint"


@pytest.mark.parametrize("garbage", ["not json", "[1, 2]", '[["a", "b", "c"]]', '{"weights": []}', '[["x", 1, 0]]'])
def test_a_broken_entry_is_a_miss(garbage, cache_folder):
    model = tiny_llama()
    fresh = bnb_targets(_config(model), _names(model))
    (entry,) = (cache_folder / quant_targets.CACHE_SECTION).glob("*.json")
    entry.write_text(garbage)
    assert _same(bnb_targets(_config(model), _names(model)), fresh)
    assert json.loads(entry.read_text())[0][0] == "model.layers.0.self_attn.q_proj"  # rewritten whole


def test_cache_off_or_unwritable_still_answers(tmp_path, monkeypatch):
    model = tiny_llama()
    monkeypatch.setenv("LORAMERGE_CACHE", "off")
    assert cache.cache_dir() is None
    off = bnb_targets(_config(model), _names(model))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LORAMERGE_CACHE", str(blocker / "cache"))  # a folder under a file cannot be made
    assert _same(bnb_targets(_config(model), _names(model)), off)
    assert blocker.read_text() == "" and list(tmp_path.iterdir()) == [blocker]
