"""The fuzz campaign: many cases per target, every outcome counted (``python -m tests.fuzz_campaign``).

Unlike the property tests, which stop at the first broken promise, the campaign runs every case
and tallies them by kind (see :mod:`tests.fuzz_cases`), so two checkouts can be compared: run it
in an older checkout with this file and ``fuzz_cases.py`` copied into its ``tests/`` to get the
"before" figures.

    python -m tests.fuzz_campaign --cases 300 --json campaign.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import warnings

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore")

from tests import fuzz_cases as fc  # noqa: E402


def campaign(name: str, strategy: st.SearchStrategy, run, cases: int, seed: int) -> dict:
    counts: collections.Counter = collections.Counter()
    details: collections.Counter = collections.Counter()

    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def body(drawn):
        outcome = run(drawn)
        counts[outcome.kind] += 1
        if not outcome.kept:
            details[f"{outcome.kind}: {outcome.detail}"[:140]] += 1

    start = time.perf_counter()
    body._hypothesis_internal_use_seed = seed  # a reproducible stream of cases
    body()
    return {"target": name, "cases": sum(counts.values()), "counts": dict(counts),
            "failures": sum(v for k, v in counts.items() if k not in fc.KINDS_KEPT),
            "top": details.most_common(8), "seconds": round(time.perf_counter() - start, 1)}


def peft_case(drawn):
    config_ops, tensor_ops, raw, raw_target = drawn
    import loramerge

    with fc.scratch() as root:
        folder = root / "adapter"
        config, tensors = fc.peft_folder(folder)
        for key, value in config_ops:
            config[key] = value
        fc.write_peft(folder, fc.dumps(config), fc.mutate_tensors(tensors, tensor_ops))
        if raw:
            fc.mutate_bytes(folder / ("adapter_config.json" if raw_target else "adapter_model.safetensors"), raw)
        return fc.run_case(lambda: loramerge.load(folder), fc.check_adapter)


def kohya_case(drawn):
    from tests.test_fuzz import kohya_check

    tensor_ops, raw = drawn
    import loramerge

    with fc.scratch() as root:
        path = root / "lora.safetensors"
        tensors = fc.mutate_tensors(fc.kohya_tensors(), tensor_ops)
        fc.save_tensors(path, tensors)
        if raw:
            fc.mutate_bytes(path, raw)
        return fc.run_case(lambda: loramerge.load(path), kohya_check(fc.kohya_parts(tensors)))


def diffusers_case(drawn):
    tensor_ops, metadata = drawn
    import loramerge

    with fc.scratch() as root:
        path = root / "pytorch_lora_weights.safetensors"
        tensors, meta = fc.diffusers_tensors()
        if metadata is not None:
            meta = {"lora_adapter_metadata": fc.dumps(metadata)}
        fc.save_tensors(path, fc.mutate_tensors(tensors, tensor_ops), meta)
        return fc.run_case(lambda: loramerge.load(path), fc.check_adapter)


def recipe_case(drawn):
    tree, edits, mutate_valid, sets = drawn
    from loramerge.recipe.reader import load_recipe

    with fc.scratch() as root:
        path = root / "recipe.yaml"
        text = fc.edit_text(fc.VALID_RECIPE if mutate_valid else fc.yaml_text(tree), edits)
        path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
        return fc.run_case(lambda: load_recipe(path, [f"{k}={v}" for k, v in sets]))


def checkpoint_case(drawn):
    ops, raw = drawn
    from loramerge.io.checkpoint import open_checkpoint

    with fc.scratch() as root:
        folder = root / "model"
        fc.checkpoint_folder(folder)
        fc.mutate_header(folder / "model.safetensors", ops)
        if raw:
            fc.mutate_bytes(folder / "model.safetensors", raw)
        return fc.run_case(lambda: open_checkpoint(folder), fc.check_checkpoint)


def fold_case(drawn):
    header_ops, weight, adapter_ops = drawn
    with fc.scratch() as root:
        return fc.fold_case(root, header_ops, weight, adapter_ops)


def output_case(case):
    with fc.scratch() as root:
        return fc.output_case(root, case)


PEFT_KEYS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "use_rslora", "use_dora",
             "peft_type", "fan_in_fan_out", "init_lora_weights", "modules_to_save", "base_model_name_or_path"]
TARGETS = {
    "peft": (st.tuples(st.lists(st.tuples(st.sampled_from(PEFT_KEYS), fc.json_values), max_size=3),
                       fc.tensor_mutations, st.lists(fc.raw_mutation, max_size=1), st.booleans()), peft_case),
    "kohya/lycoris": (st.tuples(fc.tensor_mutations, st.lists(fc.raw_mutation, max_size=1)), kohya_case),
    "diffusers": (st.tuples(fc.tensor_mutations, st.one_of(st.none(), fc.json_values)), diffusers_case),
    "recipes": (st.tuples(fc.yaml_trees, st.lists(fc.text_edit, max_size=3), st.booleans(),
                          st.lists(st.tuples(st.sampled_from(["seed", "sources.0.weight", "output.path", "method"]),
                                             fc.yaml_scalars), max_size=2)), recipe_case),
    "checkpoints": (st.tuples(fc.header_mutations, st.lists(fc.raw_mutation, max_size=1)), checkpoint_case),
    "fold": (st.tuples(st.one_of(st.just([]), fc.header_mutations), fc.fold_weights,
                       st.one_of(st.just([]), fc.tensor_mutations)), fold_case),
    "output": (fc.output_ops, output_case),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=300, help="cases per target (fold runs a fifth of them)")
    parser.add_argument("--targets", nargs="*", default=list(TARGETS))
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    rows = []
    for name in args.targets:
        strategy, run = TARGETS[name]
        cases = max(1, args.cases // 5) if name == "fold" else args.cases
        row = campaign(name, strategy, run, cases, args.seed)
        rows.append(row)
        print(f"{name:14s} cases {row['cases']:5d}  failures {row['failures']:4d}  {row['counts']}  "
              f"({row['seconds']}s)", flush=True)
        for detail, count in row["top"]:
            print(f"    {count:4d} × {detail}", flush=True)
    total = sum(r["cases"] for r in rows)
    failures = sum(r["failures"] for r in rows)
    print(f"total: {total} cases, {failures} failures")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "total": total, "failures": failures}, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
