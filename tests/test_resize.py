"""``resize`` and kohya's dynamic rank policies (sv_ratio, sv_cumulative, sv_fro) everywhere.

Oracles: a dense float64 SVD of each module's ΔW (the rank each policy picks from the whole
spectrum, and the best approximation of that rank, Eckart–Young), and kohya ``resize_lora.py``'s
index rules re-implemented from their definitions (it keeps one direction more than each
criterion asks).
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

import loramerge
from loramerge import Adapter, InvalidParameter, LowRank, RankPolicy
from loramerge.core.rank import truncate_dense
from loramerge.io.formats.sd_names import ARCHITECTURES
from tests.cli_helpers import assert_clean_failure, run_cli
from tests.sd_fixtures import gen, kohya_module, randn, ref_loha, ref_lokr

# ------------------------------------------------------------------------------ reference criteria


def ratio_rank(S: torch.Tensor, ratio: float) -> int:
    return int((S[0] / ratio <= S).sum())


def cumulative_rank(S: torch.Tensor, fraction: float) -> int:
    sums = torch.cumsum(S, 0) / S.sum()
    return next(k + 1 for k, v in enumerate(sums.tolist()) if v >= fraction - 1e-12)


def fro_rank(S: torch.Tensor, fraction: float) -> int:
    sums = torch.cumsum(S**2, 0) / (S**2).sum()
    return next(k + 1 for k, v in enumerate(sums.tolist()) if v >= fraction**2 - 1e-12)


def kohya_rank(S: torch.Tensor, method: str, param: float, new_rank: int) -> int:
    """resize_lora.py's rank_resize: its index rule (clamped to [1, len(S) − 1]) plus one, capped at new_rank."""
    if method == "sv_ratio":
        index = int((S[0] / param < S).sum())
    elif method == "sv_cumulative":
        index = int(torch.searchsorted(torch.cumsum(S, 0) / S.sum(), torch.tensor(param, dtype=S.dtype))) + 1
    else:
        index = int(torch.searchsorted(torch.cumsum(S**2, 0) / (S**2).sum(), torch.tensor(param**2, dtype=S.dtype))) + 1
    index = max(1, min(index, len(S) - 1))
    return min(index + 1, new_rank)


REFERENCE = {"sv_ratio": ratio_rank, "sv_cumulative": cumulative_rank, "sv_fro": fro_rank}


def decaying_lora(m: int, n: int, rank: int, seed: int) -> LowRank:
    """A LoRA whose spectrum decays (σᵢ ≈ 2^(−i/2)), as trained LoRAs' do, so dynamic ranks differ."""
    g = gen(seed)
    B = torch.randn(m, rank, generator=g) * torch.tensor([2.0 ** (-i / 2) for i in range(rank)])
    return LowRank(torch.randn(rank, n, generator=g) / n**0.5, B, scale=0.75)


@pytest.mark.parametrize("method, param", [("sv_ratio", 4.0), ("sv_ratio", 30.0), ("sv_cumulative", 0.5),
                                           ("sv_cumulative", 0.95), ("sv_fro", 0.9), ("sv_fro", 0.99)])
def test_dynamic_policies_follow_their_criterion_and_kohyas_index_plus_one(method, param):
    S = torch.linalg.svdvals(decaying_lora(60, 50, 16, seed=1).product(torch.float64))
    policy = RankPolicy.from_options(**{method: param})
    k = policy.choose(S[:16])  # what a factored SVD gives: the nonzero part of the spectrum
    assert k == REFERENCE[method](S, param)
    assert kohya_rank(S, method, param, new_rank=64) == k + 1  # kohya keeps one more
    if method == "sv_fro":
        assert policy.energy == pytest.approx(param**2) and policy.sv_ratio is None


def test_policy_options_conflict_and_range():
    for bad, match in [({"rank": 4, "sv_ratio": 2}, "not rank and sv_ratio"),
                       ({"sv_ratio": 2, "sv_cumulative": 0.5}, "not sv_ratio and sv_cumulative"),
                       ({"energy": 0.5, "sv_fro": 0.5}, "not energy and sv_fro"),
                       ({"sv_ratio": 0.5}, "at least 1"), ({"sv_cumulative": 1.5}, r"in \(0, 1\]"),
                       ({"sv_fro": 0}, r"in \(0, 1\]")]:
        with pytest.raises(InvalidParameter, match=match):
            RankPolicy.from_options(**bad)


# ------------------------------------------------------------------------------------- resize API


MODULES = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (48, 40),
           "unet.down_blocks.1.attentions.0.proj_in": (64, 32),
           "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2": (40, 96)}


def lora_file(tmp_path, rank: int = 12) -> tuple[object, dict[str, torch.Tensor]]:
    """A kohya SD 1.x file (names from the tables, toy shapes) with decaying spectra; ΔW per module."""
    names = ARCHITECTURES["sd1"]
    tensors, deltas = {}, {}
    for i, (module, (m, n)) in enumerate(MODULES.items()):
        lr = decaying_lora(m, n, rank, seed=10 + i)
        tensors.update(kohya_module(names.preferred[module], lr.A, lr.B, alpha=lr.scale * rank))
        deltas[module] = lr.product(torch.float64)
    path = tmp_path / "lora.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"ss_network_dim": str(rank), "ss_output_name": "style"})
    return path, deltas


def truncated(delta: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


@pytest.mark.parametrize("policy", [{"rank": 5}, {"sv_ratio": 6.0}, {"sv_cumulative": 0.8}, {"sv_fro": 0.95},
                                    {"max_error": 0.2}, {"sv_fro": 0.999, "rank_max": 7}])
def test_resize_is_the_best_approximation_of_the_rank_its_policy_picks(tmp_path, policy):
    path, deltas = lora_file(tmp_path)
    resized = loramerge.resize(path, **policy)
    assert resized.report is not None and len(resized.report.modules) == len(MODULES)
    for row in resized.report.modules:
        delta = deltas[row.module]
        S = torch.linalg.svdvals(delta)
        if "rank" in policy:
            k = policy["rank"]
        elif "max_error" in policy:
            k = fro_rank(S, (1 - policy["max_error"] ** 2) ** 0.5)
        else:
            method = next(k for k in policy if k != "rank_max")
            k = REFERENCE[method](S, policy[method])
        k = min(k, policy.get("rank_max", k))
        assert row.source_ranks == [12] and row.output_rank == k == resized[row.module].rank, row.module
        best = truncated(delta, k)
        got = resized.delta(row.module, torch.float64)
        torch.testing.assert_close(got, best, rtol=1e-5, atol=1e-5 * float(delta.abs().max()))
        error = float((delta - best).norm() / delta.norm())
        assert row.relative_error == pytest.approx(error, rel=1e-4, abs=1e-7)


def test_resize_lycoris_loha_and_lokr_the_same_way(tmp_path):
    g = gen(7)
    te_fc1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"  # text_encoder.text_model.encoder.layers.0.mlp.fc1
    te_q = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
    w1a, w1b, w2a, w2b = randn(24, 3, g=g), randn(3, 20, g=g), randn(24, 4, g=g), randn(4, 20, g=g)
    lk1, lk2a, lk2b = randn(4, 5, g=g), randn(6, 3, g=g), randn(3, 4, g=g)
    tensors = {f"{te_fc1}.hada_w1_a": w1a, f"{te_fc1}.hada_w1_b": w1b, f"{te_fc1}.hada_w2_a": w2a,
               f"{te_fc1}.hada_w2_b": w2b, f"{te_fc1}.alpha": torch.tensor(1.5),
               f"{te_q}.lokr_w1": lk1, f"{te_q}.lokr_w2_a": lk2a, f"{te_q}.lokr_w2_b": lk2b,
               f"{te_q}.alpha": torch.tensor(3.0)}
    safetensors.torch.save_file(tensors, str(tmp_path / "lyco.safetensors"))
    expected = {"text_encoder.text_model.encoder.layers.0.mlp.fc1": ref_loha(w1a, w1b, w2a, w2b, 1.5, (24, 20)),
                "text_encoder.text_model.encoder.layers.1.self_attn.q_proj": ref_lokr(lk1, lk2a @ lk2b, 3.0 / 3)}
    out = tmp_path / "small.safetensors"
    result = run_cli("resize", tmp_path / "lyco.safetensors", "-o", out, "--sv-fro", "0.9")
    assert result.exit_code == 0, result.output
    resized = loramerge.load(out)
    for module, delta in expected.items():
        k = fro_rank(torch.linalg.svdvals(delta), 0.9)
        assert resized[module].rank == k
        torch.testing.assert_close(resized.delta(module, torch.float64), truncated(delta, k), rtol=1e-4,
                                   atol=1e-5 * float(delta.abs().max()))


def test_resize_cli_reports_ranks_keeps_metadata_and_writes_any_format(tmp_path):
    path, deltas = lora_file(tmp_path)
    out = tmp_path / "small.safetensors"
    result = run_cli("resize", path, "-o", out, "--sv-ratio", "8", "--rank-max", "6", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "total rank 36 ->" in result.output and "rel.err" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["method"] == "svd" and report["parameters"]["sv_ratio"] == 8 and report["parameters"]["rank_max"] == 6
    for row in report["modules"]:
        S = torch.linalg.svdvals(deltas[row["module"]])
        assert row["output_rank"] == min(6, ratio_rank(S, 8.0))
    with safetensors.safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_output_name"] == "style"  # the training metadata is kept
    assert meta["ss_network_dim"] in ("Dynamic", *(str(r) for r in range(1, 7)))
    assert json.loads(meta["loramerge"])["method"] == "svd"
    result = run_cli("resize", path, "-o", tmp_path / "peft", "--rank", "3", "--format", "peft")
    assert result.exit_code == 0, result.output
    assert {lr.rank for lr in loramerge.load(tmp_path / "peft").layers.values()} == {3}


@pytest.mark.parametrize("args, fragments", [
    ([], ["resize needs a rank policy"]),
    (["--rank", "4", "--sv-cumulative", "0.9"], ["choose one rank policy, not rank and sv_cumulative"]),
    (["--sv-ratio", "0.5"], ["sv_ratio must be at least 1"]),
    (["--sv-fro", "0.9", "--energy", "0.8"], ["not energy and sv_fro"]),
])
def test_resize_refuses_bad_policies_cleanly(tmp_path, args, fragments):
    path, _ = lora_file(tmp_path)
    out = tmp_path / "out.safetensors"
    result = run_cli("resize", path, "-o", out, *args)
    assert_clean_failure(result, *fragments)
    assert not out.exists()


def test_resize_refuses_to_overwrite(tmp_path):
    path, _ = lora_file(tmp_path)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep")
    assert_clean_failure(run_cli("resize", path, "-o", out, "--rank", "2"), "--force")
    assert out.read_bytes() == b"keep"


# -------------------------------------------------------------------- the policies in other commands


def test_dense_methods_take_the_dynamic_policies():
    """TIES merges into a dense update; sv_ratio and sv_cumulative read its full spectrum."""
    a = Adapter({"fc": decaying_lora(50, 40, 10, seed=1)})
    b = Adapter({"fc": decaying_lora(50, 40, 10, seed=2)})
    from tests.method_fixtures import module_inputs, run_method

    own = run_method("ties", module_inputs([a, b], "fc", [1.0, 1.0], seed=0))
    S = torch.linalg.svdvals(own)
    for option, reference in (("sv_ratio", lambda: ratio_rank(S, 5.0)), ("sv_cumulative", lambda: cumulative_rank(S, 0.7))):
        value = 5.0 if option == "sv_ratio" else 0.7
        merged = loramerge.merge([a, b], method="ties", compute_dtype="fp64", **{option: value})
        assert merged["fc"].rank == reference(), option
        t = truncate_dense(own, RankPolicy(**{option: value}))
        assert t.A.shape[0] == reference()


def test_recipe_and_combine_take_the_dynamic_policies(tmp_path):
    path, deltas = lora_file(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"sources: [{path}, {path}]\nmethod: svd\nsv_cumulative: 0.8\n")
    merged = loramerge.run_recipe(recipe)
    for module, delta in deltas.items():
        assert merged[module].rank == cumulative_rank(torch.linalg.svdvals(2 * delta), 0.8)
    recipe.write_text(f"sources: [{path}]\nmethod: svd\nsv_fro: 0.9\n")
    assert loramerge.load_recipe(recipe).policy["energy"].spec == pytest.approx(0.81)
    result = run_cli("combine", path, path, "-o", tmp_path / "c.safetensors", "--method", "svd", "--sv-fro", "0.9")
    assert result.exit_code == 0, result.output
    combined = loramerge.load(tmp_path / "c.safetensors")
    for module, delta in deltas.items():
        assert combined[module].rank == fro_rank(torch.linalg.svdvals(2 * delta), 0.9)


def test_extract_takes_the_dynamic_policies(tmp_path):
    from loramerge.io.formats.tensorfile import write_safetensors

    g = gen(3)
    base = torch.randn(40, 30, generator=g)
    update = decaying_lora(40, 30, 12, seed=4).product(torch.float32)
    for name, w in (("base", base), ("ft", base + update)):
        (tmp_path / name).mkdir()
        write_safetensors({"fc.weight": w}, tmp_path / name / "model.safetensors")
    result = loramerge.extract(tmp_path / "base", tmp_path / "ft", output=tmp_path / "lora", sv_ratio=6.0)
    S = torch.linalg.svdvals(update.double())
    assert result.report.modules[0].rank == ratio_rank(S[:12], 6.0)
