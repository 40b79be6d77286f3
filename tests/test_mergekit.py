"""mergekit configs run as they are, and give the model mergekit itself gives (mergekit is the oracle).

The configs use mergekit's own vocabulary: ``base+lora`` models, per-layer gradients, ``filter``
rules, ``lambda``, ``normalize``. mergekit folds each LoRA into a copy of the base with PEFT and
merges whole weights; loramerge merges the updates and folds once. The two outputs must agree to
float32 rounding.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from loramerge.recipe.reader import load_recipe
from tests.cli_helpers import assert_clean_failure, run_cli
from tests.fold_models import make_adapter, save_base, tiny_llama


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit")
    model = tiny_llama()
    base = save_base(model, root / "base")
    a = make_adapter(model, root / "lora_a", seed=1, target_modules=["q_proj", "v_proj", "down_proj"])
    b = make_adapter(model, root / "lora_b", seed=2, target_modules=["q_proj", "k_proj", "down_proj"])
    return root, base, a, b


def run_mergekit(config: dict, out, cache) -> dict[str, torch.Tensor]:
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(lora_merge_cache=str(cache), device="cpu", copy_tokenizer=False, write_model_card=False,
                           quiet=True))
    return load_file(out / "model.safetensors")


def run_loramerge(config: dict, path, out) -> tuple[dict[str, torch.Tensor], str]:
    path.write_text(yaml.safe_dump(config))
    result = run_cli("run", path, "-o", out)
    assert result.exit_code == 0, result.output
    return load_file(out / "model.safetensors"), result.stdout


def assert_same_model(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], base) -> None:
    reference = load_file(base / "model.safetensors")
    assert set(ours) == set(theirs)
    changed = 0
    for name, tensor in theirs.items():
        moved = float((tensor.double() - reference[name].double()).abs().max())
        changed += moved > 1e-3
        diff = float((ours[name].double() - tensor.double()).abs().max())
        assert diff < 1e-5, (name, diff, moved)
    assert changed >= 6  # the merge did change the adapted weights


@pytest.mark.parametrize("case", ["ties", "linear"])
def test_mergekit_configs_give_mergekit_models(parts, case):
    root, base, a, b = parts
    if case == "ties":  # gradients, filters, per-model densities, lambda; TIES divides by the agreeing weights
        config = {
            "models": [
                {"model": f"{base}+{a}", "parameters": {"weight": [0.2, 0.9], "density": 0.6}},
                {"model": f"{base}+{b}", "parameters": {
                    "weight": [{"filter": "self_attn", "value": 0.7}, {"value": 0.4}], "density": 0.5}},
                {"model": str(base)},
            ],
            "merge_method": "ties", "base_model": str(base), "dtype": "float32", "parameters": {"lambda": 0.9},
        }
    else:  # linear normalizes by the sum of the weights
        config = {
            "models": [{"model": f"{base}+{a}", "parameters": {"weight": 3.0}},
                       {"model": f"{base}+{b}", "parameters": {"weight": [1.0, 2.0]}}],
            "merge_method": "linear", "dtype": "float32",
        }
    theirs = run_mergekit(config, root / f"mk-{case}", root / "cache")
    ours, stdout = run_loramerge(config, root / f"{case}.yml", root / f"lm-{case}")
    assert "is a mergekit config" in stdout
    assert_same_model(ours, theirs, base)


def test_dare_rescale_is_mergekits_l1(parts):
    pytest.importorskip("mergekit")
    from mergekit.sparsify import RescaleNorm, rescaled_masked_tensor

    from loramerge.merge.methods.gta import RECIPES, sparsify_one

    delta = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    ours = sparsify_one(delta.clone(), RECIPES["dare_linear"], density=0.3, gamma=0.0, epsilon=0.0,
                        generator=lambda: torch.Generator().manual_seed(1), rescale="l1")
    theirs = rescaled_masked_tensor(delta, (ours != 0).to(delta.dtype), RescaleNorm.l1)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    paper = sparsify_one(delta.clone(), RECIPES["dare_linear"], density=0.3, gamma=0.0, epsilon=0.0,
                         generator=lambda: torch.Generator().manual_seed(1), rescale="inverse")
    assert torch.allclose(paper, torch.where(ours != 0, delta / 0.3, torch.zeros(())))


def test_semantics_key_selects_mergekit_defaults(parts, tmp_path):
    _, base, a, b = parts
    path = tmp_path / "native.yaml"
    path.write_text(f"base_model: {base}\nsemantics: mergekit\nmethod: ties\n"
                    f"sources:\n  - {{path: {a}, weight: 0.5}}\n  - {{path: {b}, weight: 0.5}}\n")
    recipe = load_recipe(path)
    params = {k: v.spec for k, v in recipe.parameters.items()}
    assert params == {"density": 1.0, "divide_by": "weights", "rescale": "none"}
    assert recipe.policy["max_error"].spec == 1e-6  # the whole dense result, as mergekit keeps it
    linear = tmp_path / "linear.yaml"
    linear.write_text(f"semantics: mergekit\nmethod: linear\nsources: [{a}, {b}]\n")
    recipe = load_recipe(linear)
    assert recipe.method == "task_arithmetic" and recipe.parameters["normalize"].spec is True


@pytest.mark.parametrize("extra,fragment", [
    ({"slices": [{"sources": [{"model": "m", "layer_range": [0, 2]}]}]}, "slices: layer slices stack"),
    ({"merge_method": "passthrough"}, "passthrough copies or stacks whole layers"),
    ({"merge_method": "slerp", "parameters": {"t": 0.5}}, "slerp interpolates whole weights"),
    ({"merge_method": "karcher"}, "'karcher' has no LoRA-update equivalent"),
    ({"merge_method": "della"}, "rescales the kept entries to the update's L1 norm"),
    ({"tokenizer_source": "union"}, "tokenizer surgery"),
    ({"tokenizer": {"source": "union"}}, "tokenizer surgery"),
    ({"chat_template": "chatml"}, "chat template"),
    ({"models": [{"model": "org/whole-model", "parameters": {"weight": 1.0}}]}, "whole model without a LoRA"),
    ({"models": [{"model": "base+a", "parameters": {"weight": 1}}, {"model": "other+b", "parameters": {"weight": 1}}]},
     "different base models"),
    ({"models": [{"model": "base+a"}]}, "requires parameters.weight"),
    ({"models": [{"model": "base+a", "parameters": {"weight": 1, "gamma": 0.1}}]}, "gamma"),
])
def test_what_is_not_a_lora_merge_is_one_exact_line(tmp_path, extra, fragment):
    config = {"models": [{"model": "base+a", "parameters": {"weight": 1.0}}], "merge_method": "ties",
              "base_model": "base", **extra}
    if "slices" in extra:
        config.pop("models")
    path = tmp_path / "mk.yml"
    path.write_text(yaml.safe_dump(config))
    assert_clean_failure(run_cli("run", path, "-o", tmp_path / "out"), "mk.yml", fragment)
