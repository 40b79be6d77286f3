"""``verify``: folds and merges checked on the model, with PEFT's merge_and_unload as an independent fold."""

from __future__ import annotations

import copy
import json

import pytest
from safetensors.torch import load_file, save_file

import loramerge
from loramerge.errors import IncompatibleAdapters, InvalidParameter
from loramerge.runtime.resident import Runtime
from tests.cli_helpers import assert_clean_failure, run_cli
from tests.runtime_fixtures import char_tokenizer, write_jsonl

TAMPERED = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def case(world, tmp_path_factory):
    """The world's adapters a and b (weights 0.5, 0.7) folded by loramerge and by PEFT, and merged."""
    from peft import PeftModel

    root = tmp_path_factory.mktemp("verify")
    adapters = [world["adapters"]["a"], world["adapters"]["b"]]
    weights = [0.5, 0.7]
    ours = loramerge.fold(world["base"], adapters, weights=weights, output=root / "folded").path
    peft = PeftModel.from_pretrained(copy.deepcopy(world["model"]), str(adapters[0]), adapter_name="a")
    peft.load_adapter(str(adapters[1]), adapter_name="b")
    peft.add_weighted_adapter(["a", "b"], weights, "mix", combination_type="cat")
    peft.set_adapter("mix")
    peft_folded = root / "peft-folded"
    peft.merge_and_unload().save_pretrained(str(peft_folded))
    char_tokenizer().save_pretrained(str(peft_folded))
    merged = loramerge.merge(adapters, weights=weights).save(root / "merged")
    ties = loramerge.merge(adapters, method="ties", weights=weights).save(root / "ties")
    tampered = root / "tampered"
    loramerge.fold(world["base"], adapters, weights=weights, output=tampered)
    tensors = load_file(tampered / "model.safetensors")
    tensors[TAMPERED] = tensors[TAMPERED] * 1.05
    save_file(tensors, tampered / "model.safetensors", metadata={"format": "pt"})
    return {"adapters": adapters, "weights": weights, "ours": ours, "peft": peft_folded, "merged": merged,
            "ties": ties, "tampered": tampered, "root": root}


@pytest.fixture(scope="module")
def base(world):
    """The base model loaded once for the Python-API checks (verify takes a Runtime as well as a folder)."""
    return Runtime.load(world["base"], mode="hooks")


@pytest.mark.parametrize("which", ["ours", "peft"])
def test_a_fold_shows_rounding_only(world, case, which):
    result = loramerge.verify(world["base"], case["adapters"], weights=case["weights"], folded=case[which])
    assert result.passed, result.summary()
    assert result.max_relative_error < 1e-5 and result.top1_agreement == 1.0 and result.mean_kl < 1e-9
    assert len(result.prompts) == 8 and result.culprit is None


def test_an_exact_merge_passes_and_ties_shows_its_gap_and_the_module(base, case):
    exact = loramerge.verify(base, case["adapters"], weights=case["weights"], merged=case["merged"])
    assert exact.passed and exact.max_relative_error < 1e-5
    gap = loramerge.verify(base, case["adapters"], weights=case["weights"], merged=case["ties"], samples=4)
    assert not gap.passed and gap.max_relative_error > 1e-2 and gap.top1_agreement < 1.0
    assert gap.culprit in loramerge.load(case["ties"]).modules
    assert gap.culprit_error == max(gap.tried.values())
    assert f"the difference comes from {gap.culprit}" in gap.failure()


def test_a_tampered_tensor_fails_and_is_named(world, case, tmp_path):
    report = tmp_path / "verify.json"
    result = run_cli("verify", world["base"], *case["adapters"], "--weights", "0.5,0.7", "--folded", case["tampered"],
                     "--json", report, "-q")
    assert_clean_failure(result, "differs from the unmerged adapters", f"the difference comes from {TAMPERED}")
    assert "coverage: 12 module(s) of 2 adapter(s) matched to 10 base weight(s)" in result.stdout
    saved = json.loads(report.read_text())
    assert saved["passed"] is False and saved["culprit"] == TAMPERED
    assert saved["overall"]["max_relative_error"] > saved["tolerance"]


def test_the_cli_passes_a_good_fold_and_prints_coverage(world, case):
    result = run_cli("verify", world["base"], *case["adapters"], "--weights", "0.5,0.7", "--folded", case["ours"],
                     "--samples", "3", "--length", "10")
    assert result.exit_code == 0, result.output
    assert "model.layers.0.self_attn.q_proj.weight" in result.stdout  # the coverage table
    assert "untouched linear modules (no adapter changes them): model.layers.*.self_attn.k_proj ×2" in result.stdout
    assert "on 3 input(s)" in result.stdout and "within tolerance" in result.stdout


def test_prompts_from_a_file_name_the_worst_row(world, base, case):
    result = loramerge.verify(base, case["adapters"], weights=case["weights"], merged=case["ties"],
                              prompts=world["data"]["add"], locate=False)
    assert len(result.prompts) == len(world["data"]["add"].read_text().splitlines())
    assert result.worst.label.startswith("row ") and "of add.jsonl" in result.worst.label
    assert result.culprit is None


def test_an_unmatched_module_is_an_error_and_a_dropped_module_is_listed(base, case):
    merged = loramerge.load(case["merged"])
    dropped = merged.with_layers({k: v for k, v in merged.layers.items() if "down_proj" not in k})
    result = loramerge.verify(base, case["adapters"], weights=case["weights"], merged=dropped, samples=4)
    assert not result.passed
    assert "model.layers.0.mlp.down_proj" in result.coverage.missing_in_merged
    assert "down_proj" in (result.culprit or "")
    stray = merged.with_layers({"model.layers.0.mlp.gate_prj": merged["model.layers.0.mlp.down_proj"]})
    with pytest.raises(IncompatibleAdapters, match=r"module model.layers.0.mlp.gate_prj not found"):
        loramerge.verify(base, case["adapters"], merged=stray)


def test_verify_needs_one_candidate_and_prompt_rows_within_context(world, base, case, tmp_path):
    with pytest.raises(InvalidParameter, match="exactly one of"):
        loramerge.verify(base, case["adapters"])
    long = write_jsonl(tmp_path / "long.jsonl", [{"text": "y" * 80}])
    assert_clean_failure(run_cli("verify", world["base"], *case["adapters"], "--merged", case["merged"], "--prompts",
                                 long), "long.jsonl: row 1: 81 tokens, longer than the model's context of 64")
