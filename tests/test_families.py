"""Every image/video model family diffusers loads LoRAs for: loramerge's diffusers-style output loads with the
family's own diffusers loader, and its outputs match loramerge's fold of the same LoRA into the tiny model."""

from __future__ import annotations

import json

import pytest

from loramerge import fold
from loramerge.io.formats import write_adapter
from tests.family_fixtures import (
    TINY,
    build,
    forward,
    linear_modules,
    load_folded,
    load_with_diffusers,
    random_adapter,
    relative_error,
    save,
)

pytest.importorskip("diffusers")
FAMILY_NAMES = sorted(TINY)


@pytest.fixture(scope="session")
def family_bases(tmp_path_factory):
    """Each family's tiny model saved once: ``{name: (folder, base output)}``."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name in FAMILY_NAMES:
        model = build(name)
        out[name] = (save(name, model, root / name), forward(name, model))
    return out


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_diffusers_output_loads_in_the_family_loader_and_matches_the_fold(family, family_bases, tmp_path):
    folder, base_out = family_bases[family]
    adapter = random_adapter(linear_modules(build(family)), seed=3)
    lora = write_adapter(adapter, tmp_path / "lora", format="diffusers")

    loaded = forward(family, load_with_diffusers(family, lora / "pytorch_lora_weights.safetensors", build(family)))
    fold(folder, lora, output=tmp_path / "folded", device="cpu")
    folded = forward(family, load_folded(family, tmp_path / "folded"))

    assert relative_error(loaded, base_out) > 1e-3  # the LoRA changes the output
    assert relative_error(folded, loaded) < 1e-4


def test_both_wan22_experts_fold_into_a_two_expert_pipeline(tmp_path):
    """Wan 2.2 has two denoisers (``transformer``, ``transformer_2``); a LoRA naming modules of each lands in each."""
    first, second = build("wan", seed=0), build("wan", seed=1)
    save("wan", first, tmp_path / "pipe" / "transformer")
    save("wan", second, tmp_path / "pipe" / "transformer_2")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(
        {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
         "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    modules = linear_modules(first)
    high = random_adapter(modules, seed=1)
    low = random_adapter(modules, seed=2)
    both = high.with_layers({**high.layers, **{m.replace("transformer.", "transformer_2.", 1): lr
                                               for m, lr in low.layers.items()}})
    fold(tmp_path / "pipe", both, output=tmp_path / "out", device="cpu")
    for component, model, adapter in (("transformer", first, high), ("transformer_2", second, low)):
        lora = write_adapter(adapter, tmp_path / f"{component}-lora", format="diffusers")
        expected = forward("wan", load_with_diffusers("wan", lora / "pytorch_lora_weights.safetensors", model))
        assert relative_error(forward("wan", load_folded("wan", tmp_path / "out" / component)), expected) < 1e-4


def wan22_pipeline_folder(folder):
    """A Wan 2.2 pipeline folder with two tiny experts; returns them as built."""
    import json

    first, second = build("wan", seed=0), build("wan", seed=1)
    save("wan", first, folder / "transformer")
    save("wan", second, folder / "transformer_2")
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
         "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    return first, second


def wan22_pipeline_with_lora(file, *, into_second: bool):
    """diffusers' own WanPipeline with the two tiny experts, ``file`` loaded by ``load_lora_weights``."""
    import diffusers

    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None,
                                 transformer=build("wan", seed=0), transformer_2=build("wan", seed=1))
    pipe.load_lora_weights(str(file), load_into_transformer_2=into_second)
    return pipe


def test_wan22_second_expert_file_goes_where_diffusers_load_into_transformer_2_puts_it(tmp_path):
    """Expert-2 files cannot say which expert they are for: ``--component transformer_2`` says it, on fold,
    convert, inspect and combine, and loramerge's outputs match diffusers' ``load_into_transformer_2=True``."""
    from safetensors.torch import load_file

    from loramerge import load
    from tests.cli_helpers import assert_clean_failure, run_cli

    first, second = wan22_pipeline_folder(tmp_path / "pipe")
    adapter = random_adapter(linear_modules(first), seed=4)
    adapter.config["architectures"] = ["wan"]
    low = write_adapter(adapter, tmp_path / "low.safetensors", format="comfyui")  # ComfyUI names, no expert named
    pipe = wan22_pipeline_with_lora(low, into_second=True)
    expected, untouched = forward("wan", pipe.transformer_2), forward("wan", first)
    assert relative_error(expected, forward("wan", second)) > 1e-3

    result = run_cli("fold", tmp_path / "pipe", low, "--component", "transformer_2", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert relative_error(forward("wan", load_folded("wan", tmp_path / "out" / "transformer_2")), expected) < 1e-4
    assert relative_error(forward("wan", load_folded("wan", tmp_path / "out" / "transformer")), untouched) < 1e-6

    info = json.loads(run_cli("inspect", low, "--component", "transformer_2", "--json").stdout)
    assert {m["module"].split(".", 1)[0] for m in info["modules"]} == {"transformer_2"}

    # diffusers output: transformer. keys (what diffusers loads), the expert recorded for loramerge
    assert run_cli("convert", low, "-o", tmp_path / "conv", "--to", "diffusers", "--component", "transformer_2"
                   ).exit_code == 0
    converted = tmp_path / "conv" / "pytorch_lora_weights.safetensors"
    assert all(k.startswith("transformer.") for k in load_file(str(converted)))
    assert relative_error(forward("wan", wan22_pipeline_with_lora(converted, into_second=True).transformer_2),
                          expected) < 1e-4
    assert {m.split(".", 1)[0] for m in load(converted).modules} == {"transformer_2"}

    # both experts in one merge: expert 1's file as is, expert 2's named by source number
    high = write_adapter(random_adapter(linear_modules(first), seed=5), tmp_path / "high", format="diffusers")
    result = run_cli("combine", high, low, "--component", "2:transformer_2", "-o", tmp_path / "both", "--format", "peft")
    assert result.exit_code == 0, result.output
    fold(tmp_path / "pipe", tmp_path / "both", output=tmp_path / "out2", device="cpu")
    pipe_high = wan22_pipeline_with_lora(high / "pytorch_lora_weights.safetensors", into_second=False)
    assert relative_error(forward("wan", load_folded("wan", tmp_path / "out2" / "transformer")),
                          forward("wan", pipe_high.transformer)) < 1e-4
    assert relative_error(forward("wan", load_folded("wan", tmp_path / "out2" / "transformer_2")), expected) < 1e-4
    assert_clean_failure(run_cli("convert", tmp_path / "both", "-o", tmp_path / "d", "--to", "diffusers"),
                         "transformer and transformer_2", "load_into_transformer_2")
    assert_clean_failure(run_cli("fold", tmp_path / "pipe", low, "--component", "3:transformer_2", "-o", tmp_path / "x"),
                         "--component 3:transformer_2")


def test_component_is_refused_for_a_family_with_one_denoiser(tmp_path):
    from tests.cli_helpers import assert_clean_failure, run_cli

    adapter = random_adapter(linear_modules(build("qwen_image")), seed=1)
    lora = write_adapter(adapter, tmp_path / "lora", format="diffusers")
    assert_clean_failure(run_cli("inspect", lora, "--component", "transformer_2"), "Qwen-Image", "transformer")


def test_recipes_take_and_save_the_component(tmp_path):
    from loramerge.errors import RecipeError
    from loramerge.recipe.model import source_location
    from loramerge.recipe.reader import parse_recipe

    recipe = parse_recipe("sources:\n  - path: low.safetensors\n    component: transformer_2\n", base=tmp_path)
    assert recipe.sources[0].component == "transformer_2"
    with pytest.raises(RecipeError, match=r"sources\[0\]\.component"):
        parse_recipe("sources:\n  - path: low.safetensors\n    component: unet_2\n", base=tmp_path)
    assert source_location({"path": "/x/low.safetensors", "component": "transformer_2"}, None, None) == \
        {"path": "/x/low.safetensors", "component": "transformer_2"}
