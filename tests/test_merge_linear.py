"""linear, cat and svd against PEFT: exact sums, best rank-k approximations, PEFT's own svd, and logits."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import loramerge
from tests.peft_fixtures import peft_deltas

WEIGHTS = [0.7, -0.4, 1.3]
SOURCES = ["plain", "rslora", "patterns"]


def exact_sum(llama, llama_adapters, names, weights) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for name, w in zip(names, weights):
        for module, delta in peft_deltas(llama, llama_adapters[name]).items():
            total[module] = total.get(module, 0) + w * delta.double()
    return total


def load_in_peft(model, folder):
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(folder))
    peft_warnings = [w for w in caught if "peft" in w.filename and "Could not find a config" not in str(w.message)]
    return peft_model, peft_warnings


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("method", ["linear", "cat"])
def test_linear_and_cat_are_exact_after_loading_in_peft(llama, llama_adapters, tmp_path, method):
    merged = loramerge.merge([llama_adapters[n] for n in SOURCES], method=method, weights=WEIGHTS)
    out = merged.save(tmp_path / method)
    expected = exact_sum(llama, llama_adapters, SOURCES, WEIGHTS)
    oracle = peft_deltas(llama, out)
    assert set(oracle) == set(expected)
    for module, delta in expected.items():
        assert relative_error(oracle[module], delta) < 1e-5, module
        ranks = [loramerge.load(llama_adapters[n])[module].rank for n in SOURCES if module in loramerge.load(llama_adapters[n])]
        assert merged[module].rank == sum(ranks)


def test_merged_adapter_loads_in_peft_without_warnings(llama, llama_adapters, tmp_path):
    merged = loramerge.merge([llama_adapters[n] for n in SOURCES], method="svd", weights=WEIGHTS, rank=3)
    out = merged.save(tmp_path / "svd")
    _, caught = load_in_peft(llama, out)
    assert caught == [], [str(w.message) for w in caught]


def test_svd_is_the_best_rank_k_approximation(llama, llama_adapters, tmp_path):
    k = 3
    merged = loramerge.merge([llama_adapters[n] for n in SOURCES], method="svd", weights=WEIGHTS, rank=k)
    oracle = peft_deltas(llama, merged.save(tmp_path / "svd"))
    for module, delta in exact_sum(llama, llama_adapters, SOURCES, WEIGHTS).items():
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        assert relative_error(oracle[module], best) < 1e-4, module
        report = next(m for m in merged.report.modules if m.module == module)
        expected_error = float(S[k:].square().sum().sqrt() / S.square().sum().sqrt())
        assert report.relative_error == pytest.approx(expected_error, rel=1e-3, abs=1e-6)


def test_svd_default_rank_is_largest_source_rank(llama_adapters):
    merged = loramerge.merge([llama_adapters["plain"], llama_adapters["rslora"]], method="svd")
    assert merged["model.layers.0.self_attn.q_proj"].rank == 8  # sources 4 and 8
    assert merged["model.layers.0.mlp.down_proj"].rank == 4  # only "plain" has it


def test_svd_matches_peft_add_weighted_adapter(llama, llama_adapters):
    from peft import PeftModel

    weights = [0.7, -0.4]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(llama), str(llama_adapters["plain"]), adapter_name="a")
    peft_model.load_adapter(str(llama_adapters["same_rank"]), adapter_name="b")
    peft_model.add_weighted_adapter(["a", "b"], weights, "m", combination_type="svd", svd_rank=4)
    merged = loramerge.merge([llama_adapters["plain"], llama_adapters["same_rank"]], method="svd", weights=weights, rank=4)
    checked = 0
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "m" in module.lora_A:
            expected = module.get_delta_weight("m").detach().double()
            assert relative_error(merged.delta(name), expected) < 1e-4, name
            checked += 1
    assert checked == len(merged) == 6


def test_cat_matches_peft_cat(llama, llama_adapters):
    from peft import PeftModel

    weights = [1.5, -0.5]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(llama), str(llama_adapters["plain"]), adapter_name="a")
    peft_model.load_adapter(str(llama_adapters["rslora"]), adapter_name="b")
    peft_model.add_weighted_adapter(["a", "b"], weights, "m", combination_type="cat")
    merged = loramerge.merge([llama_adapters["plain"], llama_adapters["rslora"]], method="cat", weights=weights)
    # PEFT's merged config inherits use_rslora=False from "a", so its cat is exact here.
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "m" in module.lora_A:
            expected = module.get_delta_weight("m").detach().double()
            assert relative_error(merged.delta(name), expected) < 1e-5, name


def test_logits_through_peft_match_the_exact_sum(llama, llama_adapters, tmp_path):
    merged = loramerge.merge([llama_adapters[n] for n in SOURCES], weights=WEIGHTS)
    peft_model, _ = load_in_peft(llama, merged.save(tmp_path / "linear"))
    reference = copy.deepcopy(llama)
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for module, delta in exact_sum(llama, llama_adapters, SOURCES, WEIGHTS).items():
            params[f"{module}.weight"] += delta.float()
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = peft_model(tokens).logits
        expected = reference(tokens).logits
        base = llama(tokens).logits
    assert (expected - base).abs().max() > 1e-2  # the adapters change the model
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_negative_weights_subtract(llama_adapters):
    a = loramerge.load(llama_adapters["plain"])
    zero = loramerge.merge([a, a], weights=[1.0, -1.0], method="svd")
    for module in zero.modules:
        assert zero.delta(module).abs().max() < 1e-5


def test_union_of_modules(llama_adapters):
    a, b = loramerge.load(llama_adapters["plain"]), loramerge.load(llama_adapters["rslora"])
    merged = loramerge.merge([a, b], weights=[2.0, 1.0])
    assert set(merged.modules) == set(a.modules) | set(b.modules)
    only_b = "model.layers.0.self_attn.k_proj"
    torch.testing.assert_close(merged.delta(only_b), b.delta(only_b), atol=1e-6, rtol=1e-5)


def test_output_dtype_follows_sources_or_option(llama_adapters, tmp_path):
    merged = loramerge.merge([llama_adapters["plain"]], dtype="bf16")
    assert merged.dtype == torch.bfloat16
    out = merged.save(tmp_path / "bf16")
    assert loramerge.load(out).dtype == torch.bfloat16
    assert loramerge.load(merged.save(tmp_path / "fp16", dtype="fp16")).dtype == torch.float16
