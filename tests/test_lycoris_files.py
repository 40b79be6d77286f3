"""Files that lycoris-lora 4.1.3 writes, read, inspected, converted and folded; the oracle is lycoris's own forward.

Regression tests for the four defects of issue 14 section 2, and for the writers of what the formats hold
(DoRA into PEFT/diffusers, ``diff_b``, LyCORIS files kept factored).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramerge import fold, load
from loramerge.io.formats import write_adapter
from tests.cli_helpers import assert_clean_failure, run_cli
from tests.family_fixtures import relative_error
from tests.lycoris_fixtures import build_models, load_pipeline, run_models, save_pipeline, write_lycoris

pytest.importorskip("lycoris")

CONFIGS = {
    "loha": dict(algo="loha", dim=2, alpha=1.0),
    "lokr": dict(algo="lokr", dim=2, alpha=1.0, factor=4),
    "lokr_tucker_rank1": dict(algo="lokr", dim=1, alpha=1.0, factor=4, use_tucker=True),
    "dora_in": dict(algo="locon", dim=2, alpha=1.0, dora_wd=True, wd_on_output=False),
    "dora_out": dict(algo="locon", dim=2, alpha=1.0, dora_wd=True, wd_on_output=True),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    unet, te = build_models()
    folder = save_pipeline(unet, te, tmp_path_factory.mktemp("lyco-base"))
    return folder, run_models(unet, te)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lyco-files")
    return {name: write_lycoris(folder, name, **config) for name, config in CONFIGS.items()}


def folded_outputs(base_folder, adapter_or_path, out):
    fold(base_folder, adapter_or_path, output=out, device="cpu")
    return run_models(*load_pipeline(out))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fold_of_a_lycoris_file_matches_lycoris_forward(name, base, files, tmp_path):
    """Covers the conv kernel (LoHa/LoKr conv_in 8×9×3×3), the input-axis DoRA on square convs, the rank-1
    Tucker LoKr, and transformers-5 text-encoder names, all through ``fold`` without --base."""
    file = files[name]
    sample, text = folded_outputs(base[0], file.path, tmp_path / "out")
    assert relative_error(sample, file.sample) < 1e-4
    assert relative_error(text, file.text) < 1e-4
    assert relative_error(file.sample, base[1][0]) > 1e-3


def test_conv_kernel_comes_from_the_base_and_kohya_output_keeps_it(base, files, tmp_path):
    path = files["loha"].path
    assert load_file(str(path))["lora_unet_conv_in.hada_w1_b"].shape[1] == 81  # what lycoris stores
    result = run_cli("inspect", path, "--base", base[0], "--json")
    assert result.exit_code == 0, result.output
    rows = {m["module"]: m for m in json.loads(result.stdout)["modules"]}
    conv_in = next(m for name, m in rows.items() if name.endswith("conv_in"))
    assert conv_in["kind"] == "conv" and conv_in["shape"] == [8, 9, 3, 3]

    out = tmp_path / "kohya.safetensors"
    assert run_cli("convert", path, "-o", out, "--to", "kohya", "--base", base[0]).exit_code == 0
    assert load_file(str(out))["lora_unet_conv_in.lora_down.weight"].ndim == 4
    sample, _ = folded_outputs(base[0], out, tmp_path / "folded")
    assert relative_error(sample, files["loha"].sample) < 1e-4


def test_a_conv_whose_kernel_nothing_knows_is_never_written_as_a_matrix(files, tmp_path):
    tensors = load_file(str(files["loha"].path))
    renamed = {k.replace("lora_unet_conv_in", "lora_unet_my_stem_conv"): v for k, v in tensors.items()
               if k.startswith("lora_unet_conv_in")}
    save_file(renamed, str(tmp_path / "custom.safetensors"))
    shown = run_cli("inspect", tmp_path / "custom.safetensors", "--json")
    assert json.loads(shown.stdout)["modules"][0]["kernel_unknown"] is True
    assert_clean_failure(run_cli("convert", tmp_path / "custom.safetensors", "-o", tmp_path / "k.safetensors",
                                 "--to", "kohya"), "lora_unet_my_stem_conv", "--base")
    # the LyCORIS writer keeps it as lycoris stored it
    result = run_cli("convert", tmp_path / "custom.safetensors", "-o", tmp_path / "l.safetensors", "--to", "lycoris")
    assert result.exit_code == 0, result.output
    again = load_file(str(tmp_path / "l.safetensors"))
    assert torch.equal(again["lora_unet_my_stem_conv.hada_w1_b"], renamed["lora_unet_my_stem_conv.hada_w1_b"])


def test_input_axis_dora_is_folded_on_its_own_axis(files):
    adapter = load(files["dora_in"].path)
    square = [m for m, lr in adapter.layers.items() if lr.kind == "conv" and lr.delta_shape[0] == lr.delta_shape[1]]
    assert square, "the fixture needs a square conv"
    assert all(adapter.layers[m].magnitude_axis == "in" for m in square)
    assert all(lr.magnitude_axis == "out" for lr in load(files["dora_out"].path).layers.values())


def test_transformers5_text_encoder_names_resolve_both_ways(base, files, tmp_path):
    adapter = load(files["loha"].path)
    assert any(m.startswith("text_encoder.text_model.encoder.layers.0") for m in adapter.layers)
    # classic names against a base saved by transformers 5 (no text_model level)
    tensors = load_file(str(files["dora_out"].path))
    classic = {k.replace("lora_te_encoder_", "lora_te_text_model_encoder_"): v for k, v in tensors.items()}
    save_file(classic, str(tmp_path / "classic.safetensors"))
    with_base = load(tmp_path / "classic.safetensors", base=base[0])
    assert any(m.startswith("text_encoder.encoder.layers.0") for m in with_base.layers)
    _, text = folded_outputs(base[0], with_base, tmp_path / "out")
    assert relative_error(text, files["dora_out"].text) < 1e-4


@pytest.mark.parametrize("name", ["lokr", "loha", "lokr_tucker_rank1"])
def test_resaving_a_lycoris_file_keeps_it_factored(name, files, tmp_path):
    source = files[name].path
    out = tmp_path / "again.safetensors"
    assert run_cli("convert", source, "-o", out).exit_code == 0
    before, after = load_file(str(source)), load_file(str(out))
    assert set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert out.stat().st_size < 1.2 * source.stat().st_size


@pytest.mark.parametrize("to", ["peft", "diffusers"])
def test_dora_is_written_to_peft_and_diffusers(to, base, files, tmp_path):
    adapter = load(files["dora_out"].path)
    out = write_adapter(adapter, tmp_path / to, format=to)
    again = load(out)
    assert all(lr.magnitude is not None for lr in again.layers.values())
    sample, text = folded_outputs(base[0], out, tmp_path / "folded")
    assert relative_error(sample, files["dora_out"].sample) < 1e-4
    assert relative_error(text, files["dora_out"].text) < 1e-4
