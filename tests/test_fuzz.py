"""Property tests: every reader and the output layer keep the promise on hostile inputs.

The promise: a correct result (see the checks in :mod:`tests.fuzz_cases`) or a ``LoramergeError``
with one line; never another exception, never a hang, never a partial output. CI runs a bounded
number of examples per target (well under a minute in all); ``pytest --fuzz`` runs many more.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loramerge
from tests import fuzz_cases as fc

FUZZ = os.environ.get("LORAMERGE_FUZZ") == "1"


def examples(ci: int) -> settings:
    """``ci`` examples in CI, fifty times as many (at least 1,000) under ``pytest --fuzz``."""
    count = max(1000, 50 * ci) if FUZZ else ci
    return settings(max_examples=count, deadline=None, database=None, derandomize=not FUZZ,
                    suppress_health_check=list(HealthCheck))


def assert_kept(outcome: fc.Outcome) -> None:
    assert outcome.kept, f"{outcome.kind}: {outcome.detail}"


@examples(25)
@given(config_ops=st.lists(st.tuples(st.sampled_from(["r", "lora_alpha", "rank_pattern", "alpha_pattern",
                                                      "target_modules", "use_rslora", "use_dora", "peft_type",
                                                      "fan_in_fan_out", "init_lora_weights", "modules_to_save",
                                                      "base_model_name_or_path", "task_type"]), fc.json_values),
                            max_size=3),
       tensor_ops=fc.tensor_mutations, raw=st.lists(fc.raw_mutation, max_size=1), raw_target=st.booleans())
def test_peft_reader(config_ops, tensor_ops, raw, raw_target):
    with fc.scratch() as root:
        folder = root / "adapter"
        config, tensors = fc.peft_folder(folder)
        for key, value in config_ops:
            config[key] = value
        text = fc.dumps(config)
        fc.write_peft(folder, text, fc.mutate_tensors(tensors, tensor_ops))
        if raw:
            fc.mutate_bytes(folder / ("adapter_config.json" if raw_target else "adapter_model.safetensors"), raw)
        assert_kept(fc.run_case(lambda: loramerge.load(folder), fc.check_adapter))


def kohya_check(parts):
    def check(adapter):
        problem = fc.check_adapter(adapter)
        if problem:
            return problem
        keys = adapter.config.get("keys") or {}
        algorithms = adapter.config.get("algorithms") or {}
        for name, suffixes in parts.items():
            target = keys.get(name)
            modules = target if isinstance(target, list) else [target]
            lycoris = any(s.startswith(("hada_", "lokr_")) for s in suffixes)
            if lycoris and any(algorithms.get(m) in ("lora", "lora-tucker") for m in modules):
                return f"{name}: LyCORIS tensors read as a LoRA"
        return None

    return check


@examples(25)
@given(tensor_ops=fc.tensor_mutations, raw=st.lists(fc.raw_mutation, max_size=1))
def test_kohya_and_lycoris_reader(tensor_ops, raw):
    with fc.scratch() as root:
        path = root / "lora.safetensors"
        tensors = fc.mutate_tensors(fc.kohya_tensors(), tensor_ops)
        fc.save_tensors(path, tensors)
        if raw:
            fc.mutate_bytes(path, raw)
        assert_kept(fc.run_case(lambda: loramerge.load(path), kohya_check(fc.kohya_parts(tensors))))


@examples(20)
@given(tensor_ops=fc.tensor_mutations, metadata=st.one_of(st.none(), fc.json_values))
def test_diffusers_reader(tensor_ops, metadata):
    with fc.scratch() as root:
        path = root / "pytorch_lora_weights.safetensors"
        tensors, meta = fc.diffusers_tensors()
        if metadata is not None:
            meta = {"lora_adapter_metadata": fc.dumps(metadata)}
        fc.save_tensors(path, fc.mutate_tensors(tensors, tensor_ops), meta)
        assert_kept(fc.run_case(lambda: loramerge.load(path), fc.check_adapter))


@examples(30)
@given(tree=fc.yaml_trees, edits=st.lists(fc.text_edit, max_size=3), mutate_valid=st.booleans(),
       sets=st.lists(st.tuples(st.sampled_from(["seed", "sources.0.weight", "output.path", "method", "a.b.c"]),
                               fc.yaml_scalars), max_size=2))
def test_recipe_reader(tree, edits, mutate_valid, sets):
    from loramerge.recipe.reader import load_recipe

    with fc.scratch() as root:
        path = root / "recipe.yaml"
        text = fc.edit_text(fc.VALID_RECIPE if mutate_valid else fc.yaml_text(tree), edits)
        path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
        assignments = [f"{k}={v}" for k, v in sets]
        assert_kept(fc.run_case(lambda: load_recipe(path, assignments)))


@examples(25)
@given(ops=fc.header_mutations, raw=st.lists(fc.raw_mutation, max_size=1))
def test_checkpoint_headers(ops, raw):
    from loramerge.io.checkpoint import open_checkpoint

    with fc.scratch() as root:
        folder = root / "model"
        fc.checkpoint_folder(folder)
        fc.mutate_header(folder / "model.safetensors", ops)
        if raw:
            fc.mutate_bytes(folder / "model.safetensors", raw)
        assert_kept(fc.run_case(lambda: open_checkpoint(folder), fc.check_checkpoint))


@examples(40)
@given(case=fc.output_ops)
def test_output_layer(case):
    with fc.scratch() as root:
        assert_kept(fc.output_case(root, case))
