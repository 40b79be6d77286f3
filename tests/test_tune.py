"""``loramerge tune``: the search, its baselines, its record and its output, on a saved tiny Llama with PEFT adapters.

The oracle for a trial's figures is an independent evaluation: the merge engine's own merge of
the trial's candidate, scored by ``loramerge.evaluate`` on the same rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import loramerge
from loramerge.errors import DataError, InvalidParameter
from loramerge.runtime.data import load_tasks
from loramerge.tune import build_space, split_tasks
from loramerge.tune.run import lambda_grid
from loramerge.tune.space import Candidate
from tests.cli_helpers import assert_clean_failure, run_cli
from tests.runtime_fixtures import write_jsonl

pytest.importorskip("optuna")


@pytest.fixture(scope="module")
def setup(world, tmp_path_factory):
    """Two sources (PEFT adapters a, b) and two tasks with enough rows to split: sums (completions) and words (text)."""
    root = tmp_path_factory.mktemp("tune")
    sums = write_jsonl(root / "sums.jsonl", [{"prompt": f"{a}+{b}=", "completion": str(a + b)}
                                             for a in range(5) for b in range(4)])
    words = write_jsonl(root / "words.jsonl", [{"text": f"word {w} and word {w[::-1]}"}
                                               for w in ("alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma",
                                                         "theta", "zeta", "iota")])
    return {"base": world["base"], "sources": [world["adapters"]["a"], world["adapters"]["b"]],
            "data": [sums, words], "root": root}


def quick(setup, **kwargs):
    options = dict(paired=True, metric="loss", budget=5, batch_size=16, lambda_steps=4)
    options.update(kwargs)
    return loramerge.tune(setup["base"], setup["sources"], setup["data"], **options)


def test_trials_score_what_the_merge_engine_merges(setup):
    result = quick(setup, record=setup["root"] / "first.json")
    assert len(result.trials) == 5 and all(t.ok for t in result.trials)
    assert result.trials[0].params == {"lambda": 0.5, "weight.0": 1.0, "weight.1": 1.0}  # the start: the mean
    tasks = load_tasks(setup["data"])
    tune_rows, _ = split_tasks(tasks, 0.3, 0)
    for trial in (result.trials[0], max(result.trials, key=lambda t: t.value)):
        merged = loramerge.merge(setup["sources"], weights=list(trial.candidate.weights))
        check = loramerge.evaluate(setup["base"], {"m": merged}, tune_rows, include_base=False)
        for task, figures in trial.scores.items():
            assert figures["loss"] == pytest.approx(check.scores["m"][task].loss, rel=1e-5)
    # The record has every trial with its parameters, per-task scores, time and status.
    record = json.loads((setup["root"] / "first.json").read_text())
    assert [t["number"] for t in record["trials"]] == list(range(5))
    trial = record["trials"][1]
    assert trial["status"] == "complete" and set(trial["scores"]) == {"sums", "words"}
    assert trial["seconds"]["total"] > 0 and set(trial["params"]) == {"lambda", "weight.0", "weight.1"}
    assert set(record["baselines"]) == {"base", "a", "b", "linear w=1", "linear λ", "tuned"}


def test_baselines_are_scored_on_the_holdout_and_normalized_by_each_own_adapter(setup):
    result = quick(setup)
    own = {"sums": result.baselines["a"], "words": result.baselines["b"]}
    for task, baseline in own.items():
        assert baseline.holdout.values[task] == pytest.approx(1.0)  # each task's own adapter is the unit
    held = result.baselines["base"].holdout
    raw_base = held.scores["sums"].loss
    raw_own = own["sums"].holdout.scores["sums"].loss
    assert held.values["sums"] == pytest.approx(raw_own / raw_base)  # own loss ÷ loss
    assert held.objective == pytest.approx(sum(held.values.values()) / 2)
    # The holdout rows are the ones the search never saw.
    assert sum(s.rows for s in held.scores.values()) == 6 + 3
    assert result.baselines["tuned"].tune.objective == max(t.value for t in result.trials)
    text = result.report
    for label in ("base", "linear w=1", "linear λ (λ=", "tuned"):
        assert label in text
    # -o gets the search's best only when it is at least as good as both cheap baselines on the holdout.
    cheap = max(result.baselines[k].holdout.objective for k in ("linear w=1", "linear λ"))
    if result.baselines["tuned"].holdout.objective >= cheap:
        assert result.chosen == "tuned" and "the search's best beats the cheap baselines" in text
    else:
        assert result.chosen != "tuned" and "did NOT beat" in text
        assert result.candidate == result.baselines[result.chosen].candidate


def test_same_command_same_result_and_a_resumed_run_continues_it(setup, tmp_path):
    whole = quick(setup, budget=8, batch=2)
    again = quick(setup, budget=8, batch=2)
    assert [t.params for t in whole.trials] == [t.params for t in again.trials]
    assert [t.value for t in whole.trials] == [t.value for t in again.trials]
    record = tmp_path / "tune.json"
    part = quick(setup, budget=4, batch=2, record=record)
    assert len(part.trials) == 4
    resumed = quick(setup, budget=8, batch=2, record=record, resume=record)
    assert [t.params for t in resumed.trials] == [t.params for t in whole.trials]
    assert [t.value for t in resumed.trials] == pytest.approx([t.value for t in whole.trials])
    assert "4 trial(s) replayed" in resumed.report
    with pytest.raises(InvalidParameter, match="recorded with seed = 0, but this run has seed = 1"):
        quick(setup, budget=8, batch=2, resume=record, seed=1)


def test_interruption_and_timeout_keep_the_best_so_far(setup):
    calls = {"n": 0}

    def closeness(model, rows):  # interrupts the search once, after three trials
        calls["n"] += 1
        if calls["n"] == 2 * (1 + 2 + 1 + 4) + 2 * 3 + 1:  # 8 baselines and three trials of 2 tasks each
            raise KeyboardInterrupt
        return -float(model.model.layers[0].self_attn.q_proj.weight.norm())

    result = quick(setup, budget=10, score=closeness, metric="score")
    assert result.stopped == "interrupted" and len(result.trials) == 3
    assert result.baselines["tuned"].holdout is not None
    timed = quick(setup, budget=10, timeout=1e-6)
    assert timed.stopped == "timeout" and timed.trials == []
    assert timed.chosen in ("linear w=1", "linear λ") and "every search trial failed" in timed.report


def test_a_failed_trial_is_recorded_and_the_search_goes_on(setup):
    # Weights near float32's limit overflow the patched weights: the model's logits are NaN.
    result = quick(setup, budget=4, search="weights", bounds="weights=-3e38:3e38")
    failed = [t for t in result.trials if t.status == "failed"]
    assert failed and all("non-finite score" in t.error and t.value is None for t in failed)
    assert len(result.trials) == 4 and result.trials[0].ok  # the start point (weights 1) is fine
    assert result.baselines["tuned"].candidate == result.trials[0].candidate


def test_ties_searches_density_with_a_real_merge_per_trial(setup):
    result = quick(setup, method="ties", search="lambda,density", budget=4)
    assert all(t.ok for t in result.trials)
    trial = result.trials[-1]
    assert trial.candidate.method == "ties" and set(trial.candidate.params) == {"density", "lambda"}
    merged = loramerge.merge(setup["sources"], method="ties", weights=[1.0, 1.0], **trial.candidate.params)
    tune_rows, _ = split_tasks(load_tasks(setup["data"]), 0.3, 0)
    check = loramerge.evaluate(setup["base"], {"m": merged}, tune_rows, include_base=False)
    assert trial.scores["words"]["loss"] == pytest.approx(check.scores["m"]["words"].loss, rel=1e-5)


def test_regmean_rescales_cached_per_source_updates(setup):
    result = quick(setup, method="regmean", budget=3)
    trial = result.trials[-1]
    tune_rows, _ = split_tasks(load_tasks(setup["data"]), 0.3, 0)
    merged = loramerge.merge(setup["sources"], method="regmean", weights=list(trial.candidate.weights),
                             model=setup["base"], data=tune_rows)
    check = loramerge.evaluate(setup["base"], {"m": merged}, tune_rows, include_base=False)
    for task in ("sums", "words"):
        assert trial.scores[task]["loss"] == pytest.approx(check.scores["m"][task].loss, rel=1e-4)


def test_cli_writes_the_merge_that_its_recipe_reproduces_byte_for_byte(setup, tmp_path):
    out, record, plot = tmp_path / "tuned", tmp_path / "tune.json", tmp_path / "tune.png"
    result = run_cli("tune", setup["base"], *setup["sources"], "-d", setup["data"][0], "-d", setup["data"][1],
                     "--paired", "--metric", "loss", "-o", out, "--budget", "4", "--json", record, "--plot", plot)
    assert result.exit_code == 0, result.output
    assert "linear w=1" in result.stdout and f"wrote {out}" in result.stdout
    assert {"adapter_model.safetensors", "README.md", "loramerge_recipe.yaml"} <= {p.name for p in out.iterdir()}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    chosen = json.loads(record.read_text())["candidate"]
    recipe = yaml.safe_load((out / "loramerge_recipe.yaml").read_text())
    assert [s["weight"] for s in recipe["sources"]] == pytest.approx(chosen["weights"])
    again = run_cli("run", out / "loramerge_recipe.yaml", "-o", tmp_path / "again")
    assert again.exit_code == 0, again.output
    assert (out / "adapter_model.safetensors").read_bytes() == (tmp_path / "again" / "adapter_model.safetensors").read_bytes()


def test_cli_regmean_output_carries_the_rows_its_recipe_needs(setup, tmp_path):
    out = tmp_path / "tuned"
    result = run_cli("tune", setup["base"], *setup["sources"], "-d", setup["data"][0], "-d", setup["data"][1],
                     "--paired", "--metric", "loss", "-o", out, "--budget", "2", "-m", "regmean",
                     "--bounds", "lambda=0.5:1.5", "--no-fallback")
    assert result.exit_code == 0, result.output
    recipe = yaml.safe_load((out / "loramerge_recipe.yaml").read_text())
    assert recipe["method"] == "regmean" and recipe["sources"][0]["data"] == "tune_data/sums.jsonl"
    assert len((out / "tune_data" / "sums.jsonl").read_text().splitlines()) == 14
    again = run_cli("run", out / "loramerge_recipe.yaml", "-o", tmp_path / "again")
    assert again.exit_code == 0, again.output
    first, second = load_file(out / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_worker_processes_give_the_same_trials(setup):
    one = quick(setup, budget=4, batch=2)
    two = quick(setup, budget=4, batch=2, workers=2)
    assert [t.params for t in two.trials] == [t.params for t in one.trials]
    assert [t.value for t in two.trials] == pytest.approx([t.value for t in one.trials], rel=1e-6)
    assert two.chosen == one.chosen


def test_search_space_dimensions_and_candidates():
    space = build_space("ties", 2, "lambda,weights,density,majority_sign")
    assert space.names == ["lambda", "weight.0", "weight.1", "density", "majority_sign"]
    point = {"lambda": 0.4, "weight.0": 1.0, "weight.1": -0.5, "density": 0.3, "majority_sign": "frequency"}
    assert space.candidate(point) == Candidate("ties", (1.0, -0.5), {"density": 0.3, "majority_sign": "frequency",
                                                                     "lambda": 0.4})
    assert build_space("linear", 2).candidate({"lambda": 0.5, "weight.0": 1.0, "weight.1": 2.0}).weights == (0.5, 1.0)
    both = build_space("ties,task_arithmetic", 2, "lambda,density")
    assert both.names == ["lambda", "density", "method"]
    assert [d.methods for d in both.dimensions if d.name == "density"] == [("ties",)]
    assert lambda_grid(build_space("linear", 3, bounds="lambda=0:1"), 3, 2) == [0.3333333333, 0.5, 1.0]


@pytest.mark.parametrize(("args", "fragments"), [
    (["--search", ","], ["search space is empty"]),
    (["--budget", "0"], ["budget must be at least 1"]),
    (["-m", "ties", "--search", "lambda,temperature"], ["unknown search dimension 'temperature'", "density"]),
    (["-m", "no_such_method"], ["unknown method 'no_such_method'"]),
    (["-m", "ties", "--search", "density", "--bounds", "density=0:0.5"], ["bounds of 'density'", "(0, 1]"]),
    (["--bounds", "lambda=1:0.5"], ["low end must be below the high end"]),
    (["--bounds", "weights=-1"], ["NAME=LOW:HIGH"]),
    (["--holdout", "0.01"], ["task 'sums' has 20 row(s)", "holdout part empty"]),
    (["--timeout", "soon"], ["--timeout 'soon'"]),
    (["--ray", "127.0.0.1:1"], ["--ray 127.0.0.1:1", "no Ray cluster answers"]),
])
def test_bad_input_is_one_clear_line(setup, tmp_path, args, fragments):
    result = run_cli("tune", setup["base"], *setup["sources"], "-d", setup["data"][0], "-d", setup["data"][1],
                     "--paired", "-o", tmp_path / "out", "--budget", "3", *args)
    assert_clean_failure(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_pairing_needs_one_data_file_per_source(setup, tmp_path):
    result = run_cli("tune", setup["base"], *setup["sources"], "-d", setup["data"][0], "--paired", "-o",
                     tmp_path / "out")
    assert_clean_failure(result, "--paired needs one data file per source", "1 task(s) (sums) for 2 source(s)")
    with pytest.raises(DataError, match="holdout part empty"):
        split_tasks(load_tasks({"one": [{"text": "a b"}]}), 0.3)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head of this test's own on 127.0.0.1 only (no network): ``ray start --head --block``, ended
    by terminating that one process, which takes the cluster it started down with it."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile
    import time

    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # bind and advertise the loopback address only
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the driver (this process) must agree before it imports ray
    pytest.importorskip("ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    log = open(temp / "head.log", "w")  # noqa: SIM115 (not a pipe: the daemons it starts would hold a pipe open)
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             f"--port={port}", "--num-cpus=1", "--include-dashboard=false", f"--temp-dir={temp}",
                             "--disable-usage-stats"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in (temp / "head.log").read_text():
            assert head.poll() is None and time.monotonic() < deadline, (temp / "head.log").read_text()
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.mark.ray
def test_ray_actors_keep_the_model_resident_and_give_the_same_trials(setup, ray_head, tmp_path):
    local = quick(setup, budget=4, batch=2)
    out = tmp_path / "tuned"
    result = run_cli("tune", setup["base"], *setup["sources"], "-d", setup["data"][0], "-d", setup["data"][1],
                     "--paired", "--metric", "loss", "-o", out, "--budget", "4", "--batch", "2", "--batch-size", "16",
                     "--ray", ray_head, "--json", tmp_path / "tune.json")
    assert result.exit_code == 0, result.output
    trials = json.loads((tmp_path / "tune.json").read_text())["trials"]
    assert [t["params"] for t in trials] == [t.params for t in local.trials]
    assert [t["value"] for t in trials] == pytest.approx([t.value for t in local.trials], rel=1e-6)
