"""The CLI end to end: help texts with examples, inspect, combine with a report, demo, determinism."""

from __future__ import annotations

import hashlib
import json

import pytest
from click.testing import CliRunner

import loramerge
from loramerge.cli import main


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + (result.stderr or "")
    return result


@pytest.mark.parametrize("command", ["combine", "inspect", "demo", "methods"])
def test_every_command_help_shows_examples(command):
    assert "Examples:" in run(command, "--help").output


def test_inspect_json(llama_adapters):
    info = json.loads(run("inspect", llama_adapters["patterns"], "--json").output)
    assert info["format"] == "peft" and info["base_model"] == "tiny/llama" and info["dtype"] == "fp32"
    rows = {m["module"]: m for m in info["modules"]}
    assert rows["model.layers.0.mlp.up_proj"]["rank"] == 2
    assert rows["model.layers.0.mlp.gate_proj"]["alpha"] == 3
    assert rows["model.layers.0.mlp.gate_proj"]["scale"] == pytest.approx(0.5)
    assert info["parameter_count"] == loramerge.load(llama_adapters["patterns"]).parameter_count()
    text = run("inspect", llama_adapters["patterns"]).output
    assert "model.layers.0.mlp.up_proj" in text and "parameter_count" in text


def test_combine_writes_adapter_and_report(llama_adapters, tmp_path):
    out, report = tmp_path / "merged", tmp_path / "report.json"
    result = run("combine", llama_adapters["plain"], llama_adapters["rslora"], "-o", out, "--method", "svd",
                 "--rank", "3", "--weights", "0.6,-0.4", "--report", report)
    assert "wrote" in result.output
    merged = loramerge.load(out)
    assert {lr.rank for lr in merged.layers.values()} == {3}
    data = json.loads(report.read_text())
    assert data["method"] == "svd" and data["weights"] == [0.6, -0.4]
    assert len(data["modules"]) == len(merged)
    assert all(0.0 <= m["energy_kept"] <= 1.0 for m in data["modules"])


def test_combine_energy_policy_writes_per_module_ranks(llama_adapters, tmp_path):
    out = tmp_path / "energy"
    run("combine", llama_adapters["plain"], llama_adapters["patterns"], "-o", out, "--method", "svd", "--energy", "0.9")
    merged = loramerge.load(out)
    assert len({lr.rank for lr in merged.layers.values()}) > 1


def test_same_inputs_give_same_bytes(llama_adapters, tmp_path):
    digests = []
    for i in range(2):
        out = tmp_path / f"o{i}"
        run("combine", llama_adapters["plain"], llama_adapters["patterns"], "-o", out, "--method", "svd", "--rank", "2")
        digests.append(hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_methods_lists_registry():
    output = run("methods").output
    for method in loramerge.available_methods():
        assert method.name in output


def test_demo_saves_files_usable_by_other_commands(tmp_path):
    result = run("demo", "--save", tmp_path / "d")
    assert "linear" in result.output and "svd" in result.output
    adapters = sorted(p.name for p in (tmp_path / "d" / "adapters").iterdir())
    assert adapters == ["code", "math", "style"]
    assert (tmp_path / "d" / "base-model" / "config.json").exists()
    run("combine", tmp_path / "d/adapters/math", tmp_path / "d/adapters/code", "-o", tmp_path / "m")


def test_demo_table_reports_exact_linear(tmp_path):
    from loramerge.demo import run_demo

    rows = {r.method: r for r in run_demo(tmp_path)}
    assert rows["linear"].relative_error < 1e-6 and rows["cat"].relative_error < 1e-6
    assert rows["svd"].max_rank == 8 and 0 < rows["svd"].relative_error < 1


def test_demo_base_model_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from loramerge.demo import write_base_model

    model = AutoModelForCausalLM.from_pretrained(write_base_model(tmp_path / "base"))
    assert model.config.num_hidden_layers == 2
