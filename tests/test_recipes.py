"""YAML recipes: the examples in recipes/, per-module rules and gradients, validation errors, --set, --dry-run."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import loramerge
from loramerge import Adapter, LowRank
from loramerge.cli import main
from loramerge.demo import DEMO_ADAPTERS, build_demo_files
from loramerge.errors import RecipeError
from loramerge.merge.methods import REGISTRY, MergeMethod, Param
from loramerge.merge.methods.linear import concatenate
from loramerge.recipe.model import RECIPE_FILENAME
from loramerge.recipe.plan import plan_recipe
from loramerge.recipe.reader import load_recipe, parse_recipe
from loramerge.recipe.run import run_recipe

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    build_demo_files(root)
    return root


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def write(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def tensors(output: Path) -> dict[str, torch.Tensor]:
    files = [output] if output.is_file() else sorted(output.rglob("*.safetensors"))
    out = {}
    for f in files:
        out |= {f"{f.name}:{k}": v for k, v in load_file(f).items()}
    return out


# ---------------------------------------------------------------------- the examples


def test_there_are_examples():
    assert {"linear.yaml", "svd-energy.yaml", "per-module.yaml", "fold.yaml"} <= {p.name for p in EXAMPLES}


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_and_its_saved_recipe_reproduces_it(example, demo, tmp_path):
    out = tmp_path / "out"
    code, text = cli("run", str(example), "--set", f"base_dir={demo}", "-o", str(out))
    assert code == 0, text
    assert out.exists() and f"wrote {out}" in text
    first = tensors(out)
    assert first and all(torch.isfinite(t.float()).all() for t in first.values())
    if out.is_dir():
        assert (out / "README.md").is_file() and (out / RECIPE_FILENAME).is_file()
        again = tmp_path / "again"
        code, text = cli("run", str(out / RECIPE_FILENAME), "-o", str(again))
        assert code == 0, text
        second = tensors(again)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_dry_run_prints_the_plan_and_writes_nothing(example, demo, tmp_path):
    out = tmp_path / "out"
    code, text = cli("run", str(example), "--set", f"base_dir={demo}", "-o", str(out), "--dry-run")
    assert code == 0, text
    assert not out.exists()
    assert f"{demo}/adapters" in text and "modules (" in text
    assert "model.layers.0.self_attn.q_proj" in text


def test_linear_example_is_the_exact_weighted_sum(demo, tmp_path):
    merged = run_recipe(ROOT / "recipes" / "linear.yaml", sets=[f"base_dir={demo}"], output=tmp_path / "o")
    sources = [loramerge.load(demo / "adapters" / name) for name in DEMO_ADAPTERS]
    for module in merged.modules:
        exact = sum(w * s.delta(module, torch.float64) for s, w in zip(sources, (0.5, 0.3, 0.2)) if module in s)
        assert torch.allclose(merged.delta(module, torch.float64), exact, atol=1e-5)


def test_per_module_example_applies_rules_and_gradient_to_the_right_modules(demo):
    merged = run_recipe(ROOT / "recipes" / "per-module.yaml", sets=[f"base_dir={demo}"])
    sources = [loramerge.load(demo / "adapters" / name) for name in DEMO_ADAPTERS]
    for module in merged.modules:
        layer = int(module.split(".")[2])
        weights = (0.8 if ".mlp." in module else 0.4, 0.1 + 0.4 * layer, 0.2)
        exact = sum(w * s.delta(module, torch.float64) for s, w in zip(sources, weights) if module in s)
        rank = 8 if module.endswith(("self_attn.q_proj", "self_attn.v_proj")) else 4
        U, S, Vh = torch.linalg.svd(exact)
        k = min(rank, int((1e-9 * S[0] < S).sum()))
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        assert merged[module].rank == k, module
        assert torch.allclose(merged.delta(module, torch.float64), best, atol=1e-4), module


# ---------------------------------------------------------------------- schedules on a deeper toy model


def toy(seed: int, layers: int = 5) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for i in range(layers):
        for leaf in ("attn.q", "mlp.up"):
            mods[f"model.layers.{i}.{leaf}"] = LowRank(torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g))
    mods["lm_head"] = LowRank(torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g))
    return Adapter(mods, base_model="org/base")


def test_gradient_interpolates_over_depth_and_rules_take_the_first_match(tmp_path):
    a, b = toy(1), toy(2)
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    recipe = write(tmp_path, """
        sources:
          - path: a
            weight: [0.0, 1.0, 0.0]
          - path: b
            weight:
              - filter: attn
                value: [2.0, 4.0]
              - filter: layers\\.[0-2]\\.
                value: -1
              - value: 0.5
        method: linear
    """)
    merged = run_recipe(recipe)
    for module in merged.modules:
        layer = int(module.split(".")[2]) if "layers" in module else None
        t = layer / 4 if layer is not None else 1.0
        wa = 2 * t if t <= 0.5 else 2 * (1 - t)
        if "attn" in module:
            wb = 2.0 + 2.0 * t
        elif layer is not None and layer <= 2:
            wb = -1.0
        else:
            wb = 0.5
        expected = wa * a.delta(module, torch.float64) + wb * b.delta(module, torch.float64)
        assert torch.allclose(merged.delta(module, torch.float64), expected, atol=1e-5), module


def test_rank_rules_and_policy_per_module(tmp_path):
    toy(1).save(tmp_path / "a")
    toy(2).save(tmp_path / "b")
    recipe = write(tmp_path, """
        sources: [a, b]
        method: svd
        rank:
          - filter: mlp
            value: 1
          - filter: lm_head
            value: [2, 3]
        energy:
          - filter: attn
            value: 0.999999
    """)
    merged = run_recipe(recipe)
    assert all(merged[m].rank == 1 for m in merged.modules if ".mlp." in m)
    assert merged["lm_head"].rank == 3  # lm_head sits at t = 1
    assert all(merged[m].rank == 4 for m in merged.modules if ".attn." in m)  # rank-4 sum, energy ≈ 1


def test_set_edits_the_recipe_before_validation(tmp_path):
    toy(1).save(tmp_path / "a")
    toy(2).save(tmp_path / "b")
    recipe = write(tmp_path, """
        sources:
          - path: a
            weight: 0.5
          - path: b
        method: linear
    """)
    r = load_recipe(recipe, ["sources.0.weight=[0.1, 0.9]", "method=svd", "rank=2", "output.path=out"])
    assert r.method == "svd" and r.sources[0].weight.spec == [0.1, 0.9] and r.policy["rank"].spec == 2
    assert r.output.path == tmp_path / "out"
    by_module = {m.module: m for m in plan_recipe(r).modules}
    assert by_module["model.layers.0.attn.q"].weights == [pytest.approx(0.1), 1.0]
    assert by_module["model.layers.4.attn.q"].weights == [pytest.approx(0.9), 1.0]


def test_run_without_output_returns_the_adapter_and_writes_nothing(tmp_path):
    toy(1).save(tmp_path / "a")
    recipe = write(tmp_path, "sources: [a, a]\nmethod: linear\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    merged = run_recipe(recipe)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert torch.allclose(merged.delta("lm_head"), 2 * toy(1).delta("lm_head"), atol=1e-5)
    code, text = cli("run", str(recipe))
    assert code != 0 and "no output" in text


def test_existing_output_is_refused_before_merging(tmp_path):
    toy(1).save(tmp_path / "a")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    recipe = write(tmp_path, "sources: [a]\noutput: {path: out}\n")
    code, text = cli("run", str(recipe))
    assert code == 1 and "output exists" in text
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


# ---------------------------------------------------------------------- per-source parameters


@pytest.fixture
def toy_methods(monkeypatch):
    """Two methods to exercise per-source parameters: one takes a number or one per source, one a number only."""
    seen = []

    def floats(value):
        return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else float(value)

    def per_source(inputs, *, gains):
        if not isinstance(gains, tuple):
            gains = (gains,) * len(inputs.terms)
        seen.append((inputs.module, gains))
        from loramerge.merge.methods.base import ModuleInputs

        weights = [w * float(g) for w, g in zip(inputs.weights, gains)]
        return concatenate(ModuleInputs(inputs.module, inputs.terms, weights, inputs.seed))

    def shared(inputs, *, gain):
        return concatenate(type(inputs)(inputs.module, inputs.terms, [w * gain for w in inputs.weights], inputs.seed))

    monkeypatch.setitem(REGISTRY, "per_source_toy", MergeMethod(
        "per_source_toy", per_source, "test", "test", "test", params=(Param("gains", 1.0, floats, "gains"),)))
    monkeypatch.setitem(REGISTRY, "shared_toy", MergeMethod(
        "shared_toy", shared, "test", "test", "test", params=(Param("gain", 1.0, float, "gain"),)))
    return seen


def test_per_source_parameters_reach_the_method_as_one_value_per_source(tmp_path, toy_methods):
    toy(1).save(tmp_path / "a")
    toy(2).save(tmp_path / "b")
    recipe = write(tmp_path, """
        sources:
          - path: a
            parameters: {gains: 3.0}
          - path: b
            parameters:
              gains:
                - filter: lm_head
                  value: 5.0
        method: per_source_toy
        parameters:
          gains: 2.0
    """)
    merged = run_recipe(recipe)
    assert dict(toy_methods)["lm_head"] == (3.0, 5.0)
    assert dict(toy_methods)["model.layers.0.attn.q"] == (3.0, 2.0)
    expected = 3.0 * toy(1).delta("lm_head") + 5.0 * toy(2).delta("lm_head")
    assert torch.allclose(merged.delta("lm_head"), expected, atol=1e-5)


def test_a_method_that_takes_one_value_refuses_per_source_values_with_the_line(tmp_path, toy_methods):
    toy(1).save(tmp_path / "a")
    recipe = write(tmp_path, """
        sources:
          - path: a
          - path: a
            parameters:
              gain: 2.0
        method: shared_toy
    """)
    with pytest.raises(RecipeError, match=r"recipe\.yaml:5: sources\[1\]\.parameters\.gain: method 'shared_toy' "
                                          r"takes one 'gain' for all sources"):
        load_recipe(recipe)


# ---------------------------------------------------------------------- validation errors name the line


BAD = [
    ("sources: [a]\nmethd: svd\n", r":2: methd: unknown key \(did you mean 'method'\?\)"),
    ("sources:\n  - path: a\n    wieght: 0.5\n", r":3: sources\[0\]\.wieght: unknown key \(did you mean 'weight'\?\)"),
    ("sources:\n  - path: a\n    weight: heavy\n", r":3: sources\[0\]\.weight: a weight must be a finite number"),
    ("sources: [a]\nmethod: tiez\n", r":2: method: unknown method 'tiez'"),
    ("sources: [a]\nparameters:\n  density: 0.5\n", r":3: parameters\.density: method 'linear' has no parameter"),
    ("sources: [a]\nmethod: cat\nrank: 4\n", r":3: rank: method 'cat' keeps rank"),
    ("sources: [a]\nmethod: svd\nenergy: 1.5\n", r":3: energy: energy must be in \(0, 1\]"),
    ("sources: [a]\nmethod: svd\nrank: 4\nenergy: 0.9\n", r":4: energy: choose one rank policy"),
    ("sources: [a]\nrank: 2.5\n", r":2: rank: must be an integer"),
    ("sources: [a]\nseed: zero\n", r":2: seed: must be an integer"),
    ("sources:\n  - path: a\n    repo: org/x\n", r":2: sources\[0\]: give exactly one of `path`"),
    ("sources:\n  - path: a\n    revision: v1\n", r":3: sources\[0\]\.revision: only applies to a `repo` source"),
    ("sources:\n  - repo: not a repo\n", r":2: sources\[0\]\.repo: not a Hub repository id"),
    ("sources:\n  - path: a\n    weight:\n      - filter: '[unclosed'\n        value: 1\n",
     r":4: sources\[0\]\.weight\[0\]\.filter: not a valid regular expression"),
    ("sources:\n  - path: a\n    weight:\n      - filtr: x\n        value: 1\n",
     r":4: sources\[0\]\.weight\[0\]\.filtr: unknown key"),
    ("sources:\n  - path: a\n    weight: [1, two]\n", r":3: sources\[0\]\.weight\[1\]: must be a number"),
    ("sources: []\n", r":1: sources: must be a non-empty list"),
    ("method: svd\n", r":1: sources: missing"),
    ("sources: [a]\noutput:\n  dtype: fp8\n", r":3: output\.dtype: must be one of fp32, fp16, bf16"),
    ("sources: [a]\noutput:\n  push: {repo: me/x, privat: true}\n", r":3: output\.push\.privat: unknown key"),
    ("sources: [a]\nsources: [b]\n", r":2: sources: duplicate key \(first given at line 1\)"),
    ("sources: [a\nmethod: svd\n", r"recipe\.yaml:\d+: invalid YAML"),
    ("- a\n- b\n", r":1: the recipe must be a mapping with keys base_dir"),
    ("sources: [a]\noutput:\n  shard_size: 5GB\n", r":3: output\.shard_size: only applies to a fold recipe"),
    ("sources: [a]\ntied_embeddings: untie\n", r":2: tied_embeddings: only applies to a fold recipe"),
    ("sources: [a]\noutput:\n  dtype: keep\n", r":3: output\.dtype: `keep` only applies to a fold recipe"),
    ("base_model: m\nsources: [a]\noutput:\n  format: kohya\n", r":4: output\.format: a fold recipe writes a model"),
    ("base_model: m\nsources: [a]\ntied_embeddings: maybe\n", r":3: tied_embeddings: must be one of refuse, untie"),
    ("base_model: m\nsources: [a]\noutput:\n  shard_size: lots\n", r":4: output\.shard_size: must look like 5GB"),
    ("base_model: m\nsources: [a]\noutput:\n  shard_size: [1]\n", r":4: output\.shard_size: must be a size"),
]


@pytest.mark.parametrize(("text", "pattern"), BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_recipes_fail_with_file_line_and_key(tmp_path, text, pattern):
    recipe = write(tmp_path, text)
    with pytest.raises(RecipeError, match=r"recipe\.yaml" + pattern if pattern.startswith(":") else pattern):
        load_recipe(recipe)


def test_cli_prints_one_line_with_the_location(tmp_path):
    recipe = write(tmp_path, "sources: [a]\nmethod: svd\nenergy: 2\n")
    code, text = cli("run", str(recipe), "--dry-run")
    assert code == 1
    assert text.strip() == f"error: {recipe}:3: energy: energy must be in (0, 1], got 2"


def test_bad_set_assignments(tmp_path):
    recipe = write(tmp_path, "sources: [a]\n")
    with pytest.raises(RecipeError, match=r"--set sources\.3\.weight: sources is a list of 1"):
        load_recipe(recipe, ["sources.3.weight=1"])
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(recipe, ["seed"])
    with pytest.raises(RecipeError, match=r"--set seed: seed: must be an integer"):
        load_recipe(recipe, ["seed=abc"])


def test_missing_source_names_the_recipe_line(tmp_path):
    recipe = write(tmp_path, "sources:\n  - path: a\n  - path: nowhere\n")
    toy(1).save(tmp_path / "a")
    with pytest.raises(loramerge.SourceNotFound, match=r"recipe\.yaml:3: sources\[1\]: .*nowhere"):
        plan_recipe(load_recipe(recipe))


def test_conflicting_rules_for_one_module_fail_in_the_plan(tmp_path):
    toy(1).save(tmp_path / "a")
    recipe = write(tmp_path, "sources: [a]\nmethod: svd\nrank:\n  - filter: lm_head\n    value: 2\n"
                             "energy:\n  - filter: head\n    value: 0.9\n")
    with pytest.raises(loramerge.InvalidParameter, match="module lm_head: choose one rank policy"):
        plan_recipe(load_recipe(recipe))
    code, text = cli("run", str(recipe), "--dry-run")
    assert code == 1 and "module lm_head" in text


def test_a_rule_value_of_the_wrong_type_names_its_line(tmp_path):
    toy(1).save(tmp_path / "a")
    recipe = write(tmp_path, "sources: [a]\nmethod: svd\nenergy:\n  - filter: nothing-matches\n    value: 0.9\n"
                             "rank:\n  - filter: lm_head\n    value: 2\n  - value: 3\n  - filter: x\n    value: 0.5\n")
    with pytest.raises(RecipeError, match=r":11: rank\[2\]\.value: must be an integer"):
        load_recipe(recipe)


def test_parse_recipe_without_a_file_resolves_paths_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    toy(3).save(tmp_path / "x")
    r = parse_recipe("sources:\n  - path: x\n    weight: 2\n")
    merged = run_recipe(r)
    assert math.isclose(float(merged.delta("lm_head")[0, 0]), float(2 * toy(3).delta("lm_head")[0, 0]), rel_tol=1e-5)


def test_the_recipe_saved_by_combine_reproduces_it(demo, tmp_path):
    out, again = tmp_path / "combined", tmp_path / "again"
    code, text = cli("combine", str(demo / "adapters" / "math"), str(demo / "adapters" / "style"), "-o", str(out),
                     "--method", "svd", "--energy", "0.9", "--weights", "0.6,-0.4", "--dtype", "bf16")
    assert code == 0, text
    saved = (out / RECIPE_FILENAME).read_text()
    assert "weight: -0.4" in saved and "energy: 0.9" in saved and "dtype: bf16" in saved
    code, text = cli("run", str(out / RECIPE_FILENAME), "-o", str(again))
    assert code == 0, text
    first, second = tensors(out), tensors(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert next(iter(second.values())).dtype == torch.bfloat16
    code, text = cli("combine", str(demo / "adapters" / "math"), "-o", str(tmp_path / "bare"), "--no-card")
    assert code == 0 and sorted(p.name for p in (tmp_path / "bare").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]


# ---------------------------------------------------------------------- fold recipes


def raw_peft_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """Every module's ΔW in float64, straight from PEFT's files (scale α/r or α/√r, rank and alpha patterns)."""
    import json
    import re

    config = json.loads((folder / "adapter_config.json").read_text())
    state = load_file(folder / "adapter_model.safetensors")
    out = {}
    for key, A in state.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        B = state[key.replace(".lora_A.", ".lora_B.")]

        def pattern(table, default, module=module):
            return next((v for k, v in table.items() if re.fullmatch(rf"(.*\.)?{k}", module)), default)

        r = pattern(config.get("rank_pattern") or {}, config["r"])
        alpha = pattern(config.get("alpha_pattern") or {}, config["lora_alpha"])
        assert A.shape[0] == r
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        out[module] = scale * (B.double() @ A.double())
    return out


def model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from loramerge.io.checkpoint import open_checkpoint

    ckpt = open_checkpoint(folder)
    try:
        return {name: ckpt.read(name) for name in ckpt.tensors}
    finally:
        ckpt.release()


def test_fold_example_is_the_base_plus_the_weighted_sum(demo, tmp_path):
    out = tmp_path / "fold"
    result = run_recipe(ROOT / "recipes" / "fold.yaml", sets=[f"base_dir={demo}"], output=out)
    assert result.path == out and len(list(out.glob("model-0000*-of-00003.safetensors"))) == 3  # shard_size
    base = load_file(demo / "base-model" / "model.safetensors")
    math_d, code_d = raw_peft_deltas(demo / "adapters" / "math"), raw_peft_deltas(demo / "adapters" / "code")
    folded = model_tensors(out)
    assert folded.keys() == base.keys()
    changed = 0
    for name, W in base.items():
        module = name.removesuffix(".weight")
        parts = [w * d[module] for w, d in ((0.7, math_d), (0.3, code_d)) if module in d]
        if not parts:
            assert torch.equal(folded[name], W), name
            continue
        changed += 1
        expected = W.double() + sum(parts)
        assert folded[name].dtype == torch.float32
        assert torch.allclose(folded[name].double(), expected, rtol=0, atol=2e-7), name
    assert changed == 12 == len(result.changed)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # the re-sharded folder loads as is
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[q], folded[q])


def test_fold_recipe_with_per_module_weights_merges_first_and_reproduces(demo, tmp_path):
    recipe = write(tmp_path, f"""
        base_model: {demo}/base-model
        sources:
          - path: {demo}/adapters/math
            weight: [0.2, 1.0]
          - path: {demo}/adapters/style
            weight:
              - filter: \\.mlp\\.
                value: -0.5
              - value: 0.25
        output:
          path: out
          dtype: bf16
    """)
    plan = plan_recipe(load_recipe(recipe)).describe()
    assert "merge with linear and the per-module settings below, then fold" in plan
    assert "model.layers.1.mlp.up_proj" in plan and "weights 1,-0.5" in plan
    result = run_recipe(recipe)
    assert result.merge_report is not None and result.merge_report.method == "linear"
    base = load_file(demo / "base-model" / "model.safetensors")
    math_d, style_d = raw_peft_deltas(demo / "adapters" / "math"), raw_peft_deltas(demo / "adapters" / "style")
    folded = model_tensors(tmp_path / "out")
    for name, W in base.items():
        module = name.removesuffix(".weight")
        layer = int(module.split(".")[2]) if ".layers." in module else None
        expected = W.double()
        if module in math_d:
            expected = expected + (0.2 if layer == 0 else 1.0) * math_d[module]
        if module in style_d:
            expected = expected + (-0.5 if ".mlp." in module else 0.25) * style_d[module]
        got = folded[name]
        assert got.dtype == torch.bfloat16
        # One rounding to bf16 of the float32 result: within half a bf16 ulp (2⁻⁸ relative) of the exact value.
        assert bool(((got.double() - expected).abs() <= expected.abs() * 2**-8 * 1.01 + 1e-6).all()), name
    code, text = cli("run", str(tmp_path / "out" / RECIPE_FILENAME), "-o", str(tmp_path / "again"))
    assert code == 0, text
    again = model_tensors(tmp_path / "again")
    assert again.keys() == folded.keys() and all(torch.equal(again[k], folded[k]) for k in folded)


def test_fold_recipe_matches_peft_including_dora_and_refuses_per_module_dora(tmp_path):
    from tests.fold_models import make_adapter, peft_merged, save_base, tiny_llama

    model = tiny_llama(seed=3)
    save_base(model, tmp_path / "base")
    make_adapter(model, tmp_path / "a", seed=5, target_modules=["q_proj", "v_proj"], use_dora=True)
    make_adapter(model, tmp_path / "b", seed=6, target_modules=["q_proj", "o_proj"], r=2)
    recipe = write(tmp_path, "base_model: base\nsources: [a, b]\noutput: {path: out}\n")
    plan = plan_recipe(load_recipe(recipe)).describe()  # no merge checks: DoRA folds one after another
    assert "fold: the sources one after another" in plan and "fold plan: " in plan
    run_recipe(recipe)
    reference = peft_merged(model, [tmp_path / "a", tmp_path / "b"]).state_dict()
    folded = model_tensors(tmp_path / "out")
    assert max(float((folded[k].double() - reference[k].double()).abs().max()) for k in folded) <= 2e-6
    bad = write(tmp_path, "base_model: base\nsources:\n  - path: a\n    weight: [0.5, 1]\n  - b\n"
                          "output: {path: out2}\n", name="bad.yaml")
    with pytest.raises(loramerge.UnsupportedAdapter, match=r"is DoRA.*this fold recipe merges its sources first"):
        run_recipe(bad)
    assert not (tmp_path / "out2").exists()
    code, text = cli("run", str(bad), "--dry-run")
    assert code == 1 and "this fold recipe merges its sources first" in text


def test_fold_recipe_errors(demo, tmp_path):
    toy(1).save(tmp_path / "a")
    no_output = write(tmp_path, f"base_model: {demo}/base-model\nsources: [{demo}/adapters/math]\n")
    with pytest.raises(RecipeError, match=r"recipe\.yaml:1: base_model: a fold recipe writes a model folder"):
        run_recipe(no_output)
    mismatched = write(tmp_path, f"base_model: {demo}/base-model\nsources: [a]\noutput: {{path: out}}\n")
    code, text = cli("run", str(mismatched), "--dry-run")  # the dry run checks the base's tensors too
    assert code == 1 and text.startswith("error:")
    assert "lm_head.weight has shape (256, 64)" in text
    code, again = cli("run", str(mismatched))
    # The real run fails with the same error (it may warn about the base model first).
    assert code == 1 and again.splitlines()[-1] == text.splitlines()[-1] and not (tmp_path / "out").exists()
