"""Folding BFL Flux control LoRAs (Canny, Depth): their ``img_in`` LoRA takes the control latents beside the image
latents, so Flux.1's ``x_embedder`` is widened from 64 to 128 inputs, ``[W, 0] + s·B·A``, and their q/k norm scales
replace the base's. The oracle is diffusers' own loader (``FluxPipeline.load_lora_weights``), which widens the
layer the same way, on a tiny Flux.1 with the released 64 input channels."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramerge import fold
from loramerge.errors import IncompatibleAdapters
from loramerge.io.formats import write_adapter
from tests.family_fixtures import TINY, linear_modules, random_adapter, relative_error, save
from tests.sd_checkpoints import UNET, flux_bfl_names, flux_from_bfl
from tests.test_family_layouts import control_file

diffusers = pytest.importorskip("diffusers")

CHANNELS = 64  # Flux.1's x_embedder input: 16 latent channels in 2×2 patches


def tiny_flux1(**config) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(**{**TINY["flux"].config, "in_channels": CHANNELS, **config}).eval()


def run(model, channels: int) -> torch.Tensor:
    """The model on image latents followed by control latents, the first ``channels`` of them."""
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 2 * CHANNELS, generator=g)[..., :channels]
    inputs = dict(hidden_states=latents, encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([1.0]),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.fixture
def control(tmp_path):
    """The base transformer folder, a control LoRA for it, and what diffusers' loader gives for the LoRA."""
    model = tiny_flux1()
    file, diffusers_named = control_file(model, tmp_path / "canny.safetensors")
    base = save("flux", model, tmp_path / "base")
    pipe = diffusers.FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                  tokenizer_2=None, transformer=tiny_flux1())
    pipe.load_lora_weights(dict(diffusers_named))
    assert pipe.transformer.config.in_channels == 2 * CHANNELS
    expected = run(pipe.transformer, 2 * CHANNELS)
    assert relative_error(expected, run(model, CHANNELS)) > 1e-3  # the control LoRA changes the output
    return base, file, expected


def test_control_lora_folds_into_a_transformer_folder_as_diffusers_loads_it(control, tmp_path):
    base, file, expected = control
    result = fold(base, file, output=tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["in_channels"] == 2 * CHANNELS and config["out_channels"] == CHANNELS
    assert result.recipe["config_changes"] == {"in_channels": 2 * CHANNELS, "out_channels": CHANNELS}
    folded = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "out").eval()
    assert folded.x_embedder.weight.shape == (folded.x_embedder.weight.shape[0], 2 * CHANNELS)
    assert relative_error(run(folded, 2 * CHANNELS), expected) < 1e-4
    weights = load_file(str(tmp_path / "out" / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(weights["x_embedder.bias"], load_file(str(base / "diffusion_pytorch_model.safetensors"))["x_embedder.bias"])


def test_control_lora_folds_into_a_pipeline_folder(control, tmp_path):
    base, file, expected = control
    pipeline = tmp_path / "pipeline"
    shutil.copytree(base, pipeline / "transformer")
    (pipeline / "model_index.json").write_text(json.dumps(
        {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    fold(pipeline, file, output=tmp_path / "out")
    folded = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "out" / "transformer").eval()
    assert folded.config.in_channels == 2 * CHANNELS and folded.config.out_channels == CHANNELS
    assert relative_error(run(folded, 2 * CHANNELS), expected) < 1e-4


def test_control_lora_folds_into_a_bfl_single_file(control, tmp_path):
    _, file, expected = control
    single = tmp_path / "flux1.safetensors"
    save_file({UNET + k: v.contiguous() for k, v in flux_bfl_names(tiny_flux1().state_dict()).items()}, str(single))
    fold(single, file, output=tmp_path / "out.safetensors")
    state = flux_from_bfl(load_file(str(tmp_path / "out.safetensors")))
    assert state["x_embedder.weight"].shape[1] == 2 * CHANNELS  # ComfyUI reads in_channels from img_in
    folded = tiny_flux1(in_channels=2 * CHANNELS, out_channels=CHANNELS)
    folded.load_state_dict(state)
    assert relative_error(run(folded, 2 * CHANNELS), expected) < 1e-4


def test_widening_is_refused_for_other_widths_and_beside_another_lora(tmp_path):
    narrow = tiny_flux1(in_channels=4)  # not Flux.1's 64 channels: the mismatch stays an error
    file, _ = control_file(narrow, tmp_path / "canny4.safetensors")
    with pytest.raises(IncompatibleAdapters, match="x_embedder"):
        fold(save("flux", narrow, tmp_path / "narrow"), file, output=tmp_path / "out")
    model = tiny_flux1()
    base = save("flux", model, tmp_path / "base")
    file, _ = control_file(model, tmp_path / "canny.safetensors")
    style = write_adapter(random_adapter(linear_modules(model), seed=1), tmp_path / "style", format="diffusers")
    with pytest.raises(IncompatibleAdapters, match="fold the control LoRA on its own"):
        fold(base, [file, style], output=tmp_path / "out")
    assert not (tmp_path / "out").exists()
