"""The new methods from the CLI and the API: options, reports, `loramerge methods`, validation errors."""

from __future__ import annotations

import json

import pytest

import loramerge
from loramerge.merge.methods import available_methods
from tests.cli_helpers import assert_clean_failure, run_cli
from tests.method_fixtures import random_adapter


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("method_sources")
    return [random_adapter(i + 1, rank=3 + i, scale=0.5).save(root / f"s{i}") for i in range(3)]


def test_ties_from_the_cli_with_a_report(saved, tmp_path):
    out, report = tmp_path / "ties", tmp_path / "report.json"
    result = run_cli("combine", *saved, "-o", out, "--method", "ties", "--density", "0.3", "--majority-sign",
                     "frequency", "--lambda", "0.8", "--rank", "4", "--report", report)
    assert result.exit_code == 0, result.output
    assert "sign_conflicts" in result.output and "density_kept" in result.output
    data = json.loads(report.read_text())
    assert data["parameters"] == {"density": 0.3, "majority_sign": "frequency", "lambda": 0.8, "divide_by": "count",
                                  "rescale": "none", "rank": 4, "seed": 0}
    for module in data["modules"]:
        assert module["source_ranks"] == [3, 4, 5] and module["output_rank"] == 4
        assert 0.0 < module["energy_kept"] < 1.0 and 0.0 < module["relative_error"] < 1.0
        assert module["extra"]["density_kept"] == pytest.approx(0.3, abs=0.01)
        assert 0.0 <= module["extra"]["sign_conflicts"] <= 1.0
    assert "mean_sign_conflicts" in data["totals"]
    api = loramerge.merge(saved, method="ties", density=0.3, majority_sign="frequency", lambda_=0.8, rank=4)
    written = loramerge.load(out)
    for module in api.layers:
        assert (written.delta(module) - api.delta(module)).abs().max() < 1e-6


def test_hyphenated_method_and_per_source_density(saved, tmp_path):
    result = run_cli("combine", *saved, "-o", tmp_path / "dare", "--method", "dare-ties", "--density", "0.2,0.5,0.8",
                     "--seed", "3", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["method"] == "dare_ties" and data["parameters"]["density"] == [0.2, 0.5, 0.8]
    kept = [m["extra"]["density_kept"] for m in data["modules"]]
    assert sum(kept) / len(kept) == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--method", "ties", "--density", "0"], ["'density'", "(0, 1]", "got 0.0"]),
        (["--method", "dare_linear", "--density", "1.5"], ["'density'", "(0, 1]"]),
        (["--method", "ties", "--density", "0.2,x,0.3"], ["'density'", "must be float"]),
        (["--method", "ties", "--density", "0.2,0.3"], ["'density'", "2 values for 3 source(s)"]),
        (["--method", "breadcrumbs", "--density", "0.9", "--gamma", "0.2"], ["'gamma' plus 'density'", "[0, 0.1]"]),
        (["--method", "della", "--density", "0.3", "--epsilon", "0.4"], ["'epsilon'", "[0, 0.3)"]),
        (["--method", "ties", "--gamma", "0.1"], ["no parameter 'gamma'", "density, majority_sign, lambda"]),
        (["--method", "slerp"], ["'slerp' needs exactly 2 sources, got 3"]),
        (["--method", "knots", "--inner", "tsv"], ["'inner'", "must be one of"]),
        (["--method", "slerp", "--t", "1.5"], ["'t'", "[0, 1]"]),
        (["--method", "iso_cts", "--common-fraction", "2"], ["'common_fraction'", "[0, 1]"]),
    ],
)
def test_invalid_parameters_fail_cleanly(saved, tmp_path, args, fragments):
    out = tmp_path / "out"
    assert_clean_failure(run_cli("combine", *saved, "-o", out, *args), *fragments)
    assert not out.exists()


def test_methods_lists_every_method_with_params_and_defaults():
    result = run_cli("methods")
    assert result.exit_code == 0
    for method in available_methods():
        assert method.name in result.output
        for p in method.params:
            assert f"{p.option} {p.default}" in result.output
    assert "sources: exactly 2" in result.output
    verbose = run_cli("methods", "-v").output
    assert "Yadav et al." in verbose and "Panariello et al." in verbose


def test_every_method_runs_from_the_cli(saved, tmp_path):
    for method in available_methods():
        if method.needs_statistics:
            continue  # needs --model and --data: tests/test_regmean.py runs it from the CLI
        used = saved[:2] if method.max_sources == 2 else saved
        result = run_cli("combine", *used, "-o", tmp_path / method.name, "--method", method.name.replace("_", "-"))
        assert result.exit_code == 0, (method.name, result.output)
        assert len(loramerge.load(tmp_path / method.name)) == 3
