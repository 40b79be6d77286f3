"""Every bad-input case gets one clear message naming the file (and module), through the API and the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loramerge
from tests.cli_helpers import assert_clean_failure, run_cli


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, **changes) -> Path:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return folder


def test_missing_path(tmp_path):
    with pytest.raises(loramerge.SourceNotFound, match="nowhere"):
        loramerge.load(tmp_path / "nowhere")
    out = tmp_path / "out"
    assert_clean_failure(run_cli("combine", tmp_path / "nowhere", "-o", out), "nowhere")
    assert not out.exists()


def test_truncated_safetensors(llama_adapters, tmp_path):
    folder = copy_adapter(llama_adapters["plain"], tmp_path / "a")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(loramerge.CorruptFile, match=r"adapter_model\.safetensors"):
        loramerge.load(folder)
    out = tmp_path / "out"
    assert_clean_failure(run_cli("combine", folder, "-o", out), "adapter_model.safetensors")
    assert not out.exists()


def test_garbage_header(llama_adapters, tmp_path):
    folder = copy_adapter(llama_adapters["plain"], tmp_path / "a")
    (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    assert_clean_failure(run_cli("inspect", folder), "not a readable safetensors file")


def test_missing_config(llama_adapters, tmp_path):
    folder = copy_adapter(llama_adapters["plain"], tmp_path / "a")
    (folder / "adapter_config.json").unlink()
    with pytest.raises(loramerge.ConfigNotFound, match=r"adapter_config\.json"):
        loramerge.load(folder)
    assert_clean_failure(run_cli("inspect", folder), "adapter_config.json")


def test_invalid_config_json(llama_adapters, tmp_path):
    folder = copy_adapter(llama_adapters["plain"], tmp_path / "a")
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(loramerge.CorruptFile, match="invalid JSON"):
        loramerge.load(folder)


def test_shape_mismatch_names_module_and_shapes(llama_adapters, tmp_path):
    folder = copy_adapter(llama_adapters["plain"], tmp_path / "wide")
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors[key] = torch.randn(40, 4)
    save_file(tensors, weights)
    with pytest.raises(loramerge.IncompatibleAdapters) as info:
        loramerge.merge([llama_adapters["plain"], folder])
    message = str(info.value)
    assert "model.layers.0.self_attn.q_proj" in message and "(32, 32)" in message and "(40, 32)" in message
    assert_clean_failure(run_cli("combine", llama_adapters["plain"], folder, "-o", tmp_path / "o"), "q_proj")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_factors(llama_adapters, tmp_path, bad):
    folder = copy_adapter(llama_adapters["plain"], tmp_path / "nan")
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"][0, 0] = bad
    save_file(tensors, weights)
    with pytest.raises(loramerge.NonFiniteValues, match=r"model\.layers\.1\.self_attn\.v_proj lora_A"):
        loramerge.load(folder)
    assert_clean_failure(run_cli("combine", folder, "-o", tmp_path / "o"), "NaN/Inf")


def test_weight_count_mismatch(llama_adapters, tmp_path):
    with pytest.raises(loramerge.InvalidParameter, match="3 weight"):
        loramerge.merge([llama_adapters["plain"], llama_adapters["rslora"]], weights=[1, 2, 3])
    out = tmp_path / "o"
    result = run_cli("combine", llama_adapters["plain"], llama_adapters["rslora"], "-o", out, "--weights", "1,2,3")
    assert_clean_failure(result, "3 weight(s) for 2 source(s)")
    assert not out.exists()


def test_unknown_method_lists_valid_ones(llama_adapters, tmp_path):
    with pytest.raises(loramerge.InvalidParameter, match="linear, cat, svd"):
        loramerge.merge([llama_adapters["plain"]], method="averaging")
    assert_clean_failure(run_cli("combine", llama_adapters["plain"], "-o", tmp_path / "o", "--method", "nope"),
                         "unknown method 'nope'", "linear")


def test_existing_output_is_not_overwritten(llama_adapters, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_clean_failure(run_cli("combine", llama_adapters["plain"], "-o", out), "--force")
    assert (out / "keep.txt").read_text() == "precious"
    result = run_cli("combine", llama_adapters["plain"], "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "adapter_config.json").exists()


def test_base_model_mismatch(llama_adapters, tmp_path):
    other = edit_config(copy_adapter(llama_adapters["rslora"], tmp_path / "other"), base_model_name_or_path="org/other")
    with pytest.raises(loramerge.IncompatibleAdapters, match="different base models"):
        loramerge.merge([llama_adapters["plain"], other])
    merged = loramerge.merge([llama_adapters["plain"], other], ignore_base_mismatch=True)
    assert merged.base_model == "tiny/llama"
    out = tmp_path / "o"
    assert_clean_failure(run_cli("combine", llama_adapters["plain"], other, "-o", out), "--ignore-base-mismatch")
    assert run_cli("combine", llama_adapters["plain"], other, "-o", out, "--ignore-base-mismatch").exit_code == 0


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"init_lora_weights": "pissa_niter_4"}, "modified base model"),
        ({"init_lora_weights": "olora"}, "modified base model"),
        ({"init_lora_weights": "corda"}, "modified base model"),
        ({"init_lora_weights": "loftq"}, "modified base model"),
        ({"layer_replication": [[0, 2]]}, "layer replication"),
        ({"alora_invocation_tokens": [1, 2]}, "aLoRA"),
        ({"use_bdlora": {"block": 2}}, "BD-LoRA"),
        ({"kasa_config": {"x": 1}}, "KaSA"),
        ({"velora_config": {"x": 1}}, "VeLoRA"),
        ({"monteclora_config": {"x": 1}}, "MonteCLoRA"),
        ({"arrow_config": {"x": 1}}, "Arrow"),
        ({"use_qalora": True}, "QA-LoRA"),
        ({"peft_type": "LOHA"}, "not LoRA"),
    ],
)
def test_unsupported_variants_are_refused(llama_adapters, tmp_path, changes, fragment):
    folder = edit_config(copy_adapter(llama_adapters["plain"], tmp_path / "v"), **changes)
    with pytest.raises(loramerge.UnsupportedAdapter, match=fragment):
        loramerge.load(folder)
    assert_clean_failure(run_cli("inspect", folder), "adapter_config.json")


def test_rank_in_config_must_match_tensors(llama_adapters, tmp_path):
    folder = edit_config(copy_adapter(llama_adapters["plain"], tmp_path / "r"), r=5)
    with pytest.raises(loramerge.CorruptFile, match="rank 4 in its weights but the config gives r=5"):
        loramerge.load(folder)


def test_unknown_layout(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(loramerge.UnknownFormat):
        loramerge.load(tmp_path / "x.txt")


def test_cat_refuses_a_rank(llama_adapters):
    with pytest.raises(loramerge.InvalidParameter, match="cat"):
        loramerge.merge([llama_adapters["plain"]], method="cat", rank=2)


def test_real_process_prints_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "loramerge", "combine", str(tmp_path / "missing"), "-o", str(tmp_path / "o")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()
