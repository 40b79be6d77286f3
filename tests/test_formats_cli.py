"""The command line with image-generation formats: convert, combine --format, --from, --base and errors."""

from __future__ import annotations

import json

import safetensors.torch
import torch
from click.testing import CliRunner

from loramerge import load
from loramerge.cli import main
from tests.sd_fixtures import assert_delta, delta_of, gen, kohya_module, lora_factors

Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_down_blocks_1_resnets_0_conv1"


def kohya_file(path, seed):
    g = gen(seed)
    tensors = {**kohya_module(Q, *lora_factors((640, 640), 4, g), 2.0),
               **kohya_module(CONV, *lora_factors((640, 320, 3, 3), 2, g), 1.0)}
    safetensors.torch.save_file(tensors, str(path))
    return path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_convert_between_formats_keeps_every_delta(tmp_path):
    source = kohya_file(tmp_path / "lora.safetensors", 0)
    result = run("convert", source, "-o", tmp_path / "diff", "--to", "diffusers")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "diff" / "pytorch_lora_weights.safetensors").is_file()
    result = run("convert", tmp_path / "diff", "-o", tmp_path / "back.safetensors", "--to", "kohya", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    a, b, c = load(source), load(tmp_path / "diff"), load(tmp_path / "back.safetensors")
    assert (a.source_format, b.source_format, c.source_format) == ("kohya", "diffusers", "kohya")
    for m in a.modules:
        assert_delta(delta_of(b[m]), delta_of(a[m]))
        assert_delta(delta_of(c[m]), delta_of(a[m]))
    result = run("convert", source, "-o", tmp_path / "peft", "--to", "peft")
    assert result.exit_code == 0 and (tmp_path / "peft" / "adapter_config.json").is_file()


def test_convert_refuses_to_overwrite_and_reports_bad_input_in_one_line(tmp_path):
    source = kohya_file(tmp_path / "lora.safetensors", 1)
    (tmp_path / "out.safetensors").write_bytes(b"x")
    result = run("convert", source, "-o", tmp_path / "out.safetensors", "--to", "kohya")
    assert result.exit_code == 1 and "error:" in result.output and "--force" in result.output
    assert (tmp_path / "out.safetensors").read_bytes() == b"x"
    odd = tmp_path / "odd.safetensors"
    safetensors.torch.save_file({"some.key": torch.zeros(1)}, str(odd))
    result = run("convert", odd, "-o", tmp_path / "x", "--to", "peft")
    assert result.exit_code == 1 and "first keys: some.key" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "x").exists()
    result = run("convert", source, "-o", tmp_path / "y", "--from", "diffusers", "--to", "peft")
    assert result.exit_code == 1 and "no diffusers LoRA layout" in result.output


def test_combine_writes_the_first_sources_format_by_default_or_the_one_asked(tmp_path):
    a = kohya_file(tmp_path / "a.safetensors", 2)
    b = kohya_file(tmp_path / "b.safetensors", 3)
    result = run("combine", a, b, "-o", tmp_path / "merged.safetensors", "--weights", "0.5,0.25")
    assert result.exit_code == 0, result.output
    merged = load(tmp_path / "merged.safetensors")
    assert merged.source_format == "kohya"
    la, lb = load(a), load(b)
    for m in la.modules:
        assert_delta(delta_of(merged[m]), 0.5 * delta_of(la[m]) + 0.25 * delta_of(lb[m]))
    meta = safetensors.safe_open(str(tmp_path / "merged.safetensors"), "pt").metadata()
    assert json.loads(meta["loramerge"])["weights"] == [0.5, 0.25]
    result = run("combine", a, b, "-o", tmp_path / "svd", "--method", "svd", "--rank", "4", "--format", "diffusers")
    assert result.exit_code == 0, result.output
    assert load(tmp_path / "svd").source_format == "diffusers"


def test_inspect_and_base_option(tmp_path):
    base = tmp_path / "unet.safetensors"
    safetensors.torch.save_file({"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight": torch.zeros(640, 640),
                                 "down_blocks.1.resnets.0.conv1.weight": torch.zeros(640, 320, 3, 3)}, str(base))
    source = kohya_file(tmp_path / "lora.safetensors", 4)
    result = run("inspect", source, "--json", "--base", base)
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["format"] == "kohya"
    assert {m["module"] for m in info["modules"]} == {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                                                      "down_blocks.1.resnets.0.conv1"}
    assert {m["kind"] for m in info["modules"]} == {"linear", "conv"}
