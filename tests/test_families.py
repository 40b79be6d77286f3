"""Every image/video model family diffusers loads LoRAs for: loramerge's diffusers-style output loads with the
family's own diffusers loader, and its outputs match loramerge's fold of the same LoRA into the tiny model."""

from __future__ import annotations

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
    import json

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
