"""RegMean: the method against a dense float64 formula, the runtime's Grams against hooks on PEFT's own model."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

import loramerge
from loramerge.errors import InvalidParameter, RecipeError
from loramerge.merge.statistics import InputStatistics
from loramerge.runtime.resident import Runtime
from loramerge.runtime.statistics import input_statistics
from tests.cli_helpers import assert_clean_failure, run_cli
from tests.method_fixtures import random_adapter
from tests.peft_fixtures import peft_deltas
from tests.runtime_fixtures import ROWS, char_tokenizer

OFF = 0.7


def shrink(G: torch.Tensor, a: float) -> torch.Tensor:
    return a * G + (1 - a) * torch.diag(torch.diagonal(G))


def regmean_reference(deltas: list[torch.Tensor | None], weights: list[float], grams: list[torch.Tensor],
                      a: float) -> torch.Tensor:
    """(Σ wᵢ ΔWᵢ G̃ᵢ)(Σ G̃ᵢ)⁻¹ densely in float64; an absent ΔWᵢ is zero but its Gram still counts."""
    shrunk = [shrink(G.double(), a) for G in grams]
    numerator = sum(w * D.double() @ G for D, w, G in zip(deltas, weights, shrunk) if D is not None)
    return numerator @ torch.linalg.inv(sum(shrunk))


def random_gram(n: int, seed: int) -> torch.Tensor:
    X = torch.randn(3 * n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (X.T @ X / (3 * n)).float()


def test_the_method_is_the_dense_formula_with_absent_modules_and_embeddings():
    a = random_adapter(1, rank=3, scale=0.5)
    b = random_adapter(2, rank=5, scale=2.0)
    b = b.with_layers({k: v for k, v in b.layers.items() if k != "layer.down"})  # only a has layer.down
    emb = loramerge.LowRank(torch.randn(2, 30), torch.randn(8, 2), kind="embedding")
    a = a.with_layers({**a.layers, "embed": emb})
    weights = [0.8, -0.4]
    grams = [{m: random_gram(lr.matrix_shape[1], seed=10 * i + j) for j, (m, lr) in enumerate(a.layers.items())
              if lr.kind == "linear"} for i in range(2)]
    merged = loramerge.merge([a, b], method="regmean", weights=weights, statistics=InputStatistics(grams),
                             off_diagonal=OFF, compute_dtype="fp64", dtype="fp64")
    for module in ("layer.q", "layer.up", "layer.down"):
        deltas = [s.delta(module, torch.float64) if module in s.layers else None for s in (a, b)]
        expected = regmean_reference(deltas, weights, [g[module] for g in grams], OFF)
        got = merged.delta(module, torch.float64)
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-8 * float(expected.abs().max())), module
        assert merged[module].rank == sum(s[module].rank for s in (a, b) if module in s.layers)
    # Not Linear: the mean (1/T)·Σ wᵢ ΔWᵢ over the T sources, marked in the report.
    assert torch.allclose(merged.delta("embed", torch.float64), weights[0] / 2 * a.delta("embed", torch.float64),
                          atol=1e-6)
    rows = {r.module: r for r in merged.report.modules}
    assert rows["embed"].extra["fallback_mean"] == 1.0 and rows["layer.q"].extra["fallback_mean"] == 0.0


def test_off_diagonal_zero_is_a_per_channel_weighted_average():
    a, b = random_adapter(3), random_adapter(4)
    grams = [{m: random_gram(lr.matrix_shape[1], seed=i + j) for j, (m, lr) in enumerate(a.layers.items())}
             for i in range(2)]
    merged = loramerge.merge([a, b], method="regmean", statistics=InputStatistics(grams), off_diagonal=0.0)
    d = [torch.diagonal(g["layer.q"]).double() for g in grams]
    expected = (a.delta("layer.q", torch.float64) * d[0] + b.delta("layer.q", torch.float64) * d[1]) / (d[0] + d[1])
    assert torch.allclose(merged.delta("layer.q", torch.float64), expected, atol=1e-5)


def independent_grams(world, source: str, rows: list[dict], modules: list[str]) -> dict[str, torch.Tensor]:
    """Σ xxᵀ / tokens at each module's input, hooked on PEFT's own PeftModel, one row at a time, float64."""
    from peft import PeftModel

    tokenizer = char_tokenizer()
    peft = PeftModel.from_pretrained(copy.deepcopy(world["model"]), str(world["adapters"][source])).eval()
    sums = {m: None for m in modules}
    handles = []
    for module in modules:
        def hook(_, args, name=module):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = x.T @ x if sums[name] is None else sums[name] + x.T @ x
        handles.append(peft.base_model.model.get_submodule(module).register_forward_pre_hook(hook))
    tokens = 0
    for row in rows:
        if "text" in row:
            ids = tokenizer(row["text"])["input_ids"]
        else:
            completion = row["completion"] if "completion" in row else row["choices"][row["answer"]]
            ids = tokenizer(row["prompt"])["input_ids"] + tokenizer(completion, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            peft(input_ids=torch.tensor([ids]))
        tokens += len(ids)
    for h in handles:
        h.remove()
    return {m: s / tokens for m, s in sums.items()}


@pytest.fixture(scope="module")
def sources(world):
    """Adapters a, b and emb (emb without the full embedding copy PEFT saves) with tasks add, pick, prose."""
    emb = loramerge.load(world["adapters"]["emb"])
    emb = emb.with_layers(emb.layers, full_weights={})
    adapters = [loramerge.load(world["adapters"]["a"]), loramerge.load(world["adapters"]["b"]), emb]
    data = [world["data"]["add"], world["data"]["pick"], world["data"]["prose"]]
    return adapters, data, ["a", "b", "emb"], [ROWS["add"], ROWS["pick"], ROWS["prose"]]


def test_collected_grams_match_hooks_on_peft(world, sources):
    adapters, data, names, rows = sources
    runtime = Runtime.load(world["base"])
    stats = input_statistics(runtime, adapters, data, batch_size=2)
    linear = [m for m in dict.fromkeys(m for a in adapters for m in a.layers) if "embed" not in m]
    assert set(stats.grams[0]) == set(linear)
    for i, (name, source_rows) in enumerate(zip(names, rows)):
        expected = independent_grams(world, name, source_rows, linear)
        for module in linear:
            assert torch.allclose(stats.grams[i][module].double(), expected[module], rtol=1e-5, atol=1e-6), (name, module)
    assert stats.tokens[0] == sum(len(r["prompt"]) + 1 + len(r["completion"]) for r in ROWS["add"])


def test_merge_with_model_and_data_matches_the_dense_reference(world, sources, tmp_path):
    adapters, data, names, rows = sources
    weights = [1.0, 0.5, 0.8]
    merged = loramerge.merge(adapters, method="regmean", weights=weights, model=world["base"], data=data,
                             off_diagonal=OFF, stats=tmp_path / "stats", batch_size=3)
    linear = [m for m in merged.modules if "embed" not in m]
    grams = [independent_grams(world, name, r, linear) for name, r in zip(names, rows)]
    deltas = [peft_deltas(world["model"], world["adapters"][name]) for name in names]
    for module in linear:
        expected = regmean_reference([d.get(module) for d in deltas], weights, [g[module] for g in grams], OFF)
        got = merged.delta(module, torch.float64)
        assert (got - expected).norm() / expected.norm() < 1e-4, module
    embed = "model.embed_tokens"
    assert torch.allclose(merged.delta(embed), weights[2] / 3 * adapters[2].delta(embed), atol=1e-5)

    # The statistics are cached: the same merge again never loads the model.
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although the statistics were cached")

    original = Runtime.load
    Runtime.load = no_model  # type: ignore[method-assign]
    try:
        again = loramerge.merge(adapters, method="regmean", weights=weights, model=world["base"], data=data,
                                off_diagonal=OFF, stats=tmp_path / "stats", batch_size=3)
    finally:
        Runtime.load = original  # type: ignore[method-assign]
    assert all(torch.equal(again.delta(m), merged.delta(m)) for m in merged.modules)
    assert len(list((tmp_path / "stats").glob("*.safetensors"))) == 3
    reranked = loramerge.merge(adapters, method="regmean", model=world["base"], data=data, stats=tmp_path / "stats",
                               rank=2)
    assert {lr.rank for lr in reranked.layers.values()} == {2}


def test_regmean_from_the_cli_and_its_recipe(world, sources, tmp_path):
    data = sources[1]
    folders = [world["adapters"]["a"], world["adapters"]["b"]]
    out = tmp_path / "merged"
    result = run_cli("combine", *folders, "-m", "regmean", "--model", world["base"], "--data", data[0], "--data",
                     data[1], "-o", out, "--off-diagonal", "0.9", "--stats", tmp_path / "stats")
    assert result.exit_code == 0, result.output
    expected = loramerge.merge(folders, method="regmean", model=world["base"], data=data[:2], off_diagonal=0.9)
    merged = loramerge.load(out)
    assert all(torch.allclose(merged.delta(m), expected.delta(m), atol=1e-6) for m in expected.modules)
    recipe = yaml.safe_load((out / "loramerge_recipe.yaml").read_text())
    assert recipe["method"] == "regmean" and recipe["parameters"] == {"off_diagonal": 0.9}
    assert recipe["model"].endswith("base") and recipe["sources"][1]["data"].endswith("pick.jsonl")
    rerun = run_cli("run", out / "loramerge_recipe.yaml", "-o", tmp_path / "again")
    assert rerun.exit_code == 0, rerun.output
    again = loramerge.load(tmp_path / "again")
    assert all(torch.allclose(again.delta(m), merged.delta(m), atol=1e-6) for m in merged.modules)


def test_regmean_without_data_and_data_without_regmean_are_refused(world, sources, tmp_path):
    adapters, data, _, _ = sources
    with pytest.raises(InvalidParameter, match="method 'regmean' needs data"):
        loramerge.merge(adapters, method="regmean")
    with pytest.raises(InvalidParameter, match=r"got 2 data file\(s\) for 3 source\(s\)"):
        loramerge.merge(adapters, method="regmean", model=world["base"], data=data[:2])
    folders = [world["adapters"]["a"], world["adapters"]["b"]]
    assert_clean_failure(run_cli("combine", *folders, "-m", "regmean", "-o", tmp_path / "x"),
                         "method 'regmean' needs data", "--model BASE --data")
    assert_clean_failure(run_cli("combine", *folders, "--model", world["base"], "--data", data[0], "--data", data[1],
                                 "-o", tmp_path / "y"), "method 'linear' does not use data")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"sources": [str(f) for f in folders], "method": "regmean",
                                      "model": str(world["base"])}))
    with pytest.raises(RecipeError, match=r"r.yaml:\d+: sources\[0\].data: method 'regmean' needs one data file"):
        loramerge.load_recipe(recipe)
