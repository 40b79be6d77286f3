"""extract: recover folded adapters exactly, and approximate real full fine-tunes within the reported error."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from click.testing import CliRunner

from loramerge import extract, fold, load
from loramerge.cli import main
from loramerge.errors import IncompatibleAdapters, InvalidParameter, OutputExists
from tests.fold_models import make_adapter, peft_adapted, save_base, save_toy, tiny_gpt2, tiny_llama, toy

TOKENS = torch.tensor([[3, 14, 15, 92, 65, 35, 8, 9]])


def finetune(model, steps: int = 3, lr: float = 2e-3, seed: int = 0):
    """A real full fine-tune: a few AdamW steps on every parameter."""
    tuned = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (4, 12), generator=g)
        tuned(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return tuned.eval()


def delta_error(extracted, adapter) -> float:
    """max over modules of ‖ΔW_extracted − ΔW_adapter‖_F / ‖ΔW_adapter‖_F."""
    worst = 0.0
    for module in adapter.modules:
        ref = adapter.delta(module, torch.float64)
        got = extracted.delta(module, torch.float64)
        worst = max(worst, float((got - ref).norm() / ref.norm()))
    return worst


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(seed=7)


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory, llama):
    return save_base(llama, tmp_path_factory.mktemp("xbase") / "base", max_shard_size="40KB")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, llama):
    model = finetune(llama)
    return model, save_base(model, tmp_path_factory.mktemp("xft") / "ft")


@pytest.mark.parametrize("case", ["llama", "gpt2", "toy"])
def test_extract_recovers_a_folded_adapter(tmp_path, case):
    if case == "llama":
        model = tiny_llama(seed=1)
        base = save_base(model, tmp_path / "base")
        targets = ["q_proj", "k_proj", "down_proj", "lm_head"]
    elif case == "gpt2":
        model = tiny_gpt2(seed=1)
        base = save_base(model, tmp_path / "base")
        targets = ["c_attn", "c_proj", "c_fc"]
    else:
        model = toy(seed=1)
        base = save_toy(model, tmp_path / "base")
        targets = ["conv", "point", "fc"]
    adapter_path = make_adapter(model, tmp_path / "ad", target_modules=targets, r=4, lora_alpha=8,
                                fan_in_fan_out=case == "gpt2")
    fold(base, adapter_path, output=tmp_path / "folded")
    result = extract(base, tmp_path / "folded", output=tmp_path / "lora", rank=6)
    adapter, extracted = load(adapter_path), load(tmp_path / "lora")
    assert sorted(extracted.modules) == sorted(adapter.modules)  # nothing else changed
    assert delta_error(extracted, adapter) <= 1e-4
    assert all(m.rank == 4 for m in result.report.modules)  # noise directions are not stored
    assert all(m.relative_error <= 1e-4 for m in result.report.modules)
    assert result.report.capture_by_rank()[-1]["energy"] == pytest.approx(1.0, abs=1e-6)


def test_full_finetune_loads_in_peft_and_matches_logits(tmp_path, llama, llama_base, tuned):
    from peft import PeftModel

    model, ft = tuned
    result = extract(llama_base, ft, output=tmp_path / "lora", rank=8, keep_full=True)
    report = result.report
    assert report.kept_full and "model.embed_tokens.weight" in report.kept_full
    assert all(m.rank == 8 for m in report.modules) and len(report.modules) == 2 * 7 + 1  # + lm_head
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path / "lora").eval()
    assert not [w for w in caught if not issubclass(w.category, (FutureWarning, DeprecationWarning))]
    with torch.no_grad():
        ours, target, base = peft_model(TOKENS).logits, model(TOKENS).logits, llama(TOKENS).logits
    change = float((target - base).norm())
    miss = float((ours - target).norm())
    worst = report.totals()["max_relative_error"]
    assert 0.05 < worst < 1.0  # a real fine-tune is not rank 8
    assert miss / change <= worst  # the logits are off by less than the worst module's weight error

    # At full rank the adapter is the fine-tune itself.
    full = extract(llama_base, ft, output=tmp_path / "full", max_error=1e-6, keep_full=True)
    assert full.report.totals()["max_relative_error"] <= 1e-5
    peft_model = PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path / "full").eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(TOKENS).logits, target, atol=1e-4)


def test_policies_and_report(tmp_path, llama_base, tuned):
    _, ft = tuned
    by_energy = extract(llama_base, ft, output=tmp_path / "e", energy=0.8).report
    for m in by_energy.modules:
        assert m.energy_kept >= 0.8 - 1e-6
        assert m.rank == m.rank_for(0.8)  # the smallest rank that holds 80%
    by_error = extract(llama_base, ft, output=tmp_path / "m", max_error=0.3, rank_max=12).report
    for m in by_error.modules:
        assert m.rank <= 12 and (m.relative_error <= 0.3 + 1e-6 or m.rank == 12)
    capture = by_energy.capture_by_rank()
    energies = [row["energy"] for row in capture]
    assert energies == sorted(energies) and all(row["exact"] for row in capture)
    text = by_energy.summary()
    assert "intrinsic rank for 90% energy" in text and "LoRA of rank r captures" in text
    saved = json.loads((tmp_path / "e" / "loramerge.json").read_text())
    assert saved["report"]["intrinsic_rank"]["rank_for_90pct"]["median"] is not None


def test_randomized_svd_reports_measured_error(tmp_path, llama_base, tuned):
    _, ft = tuned
    exact = extract(llama_base, ft, output=tmp_path / "x", rank=2).report
    randomized = extract(llama_base, ft, output=tmp_path / "r", rank=2, exact_limit=8).report
    assert {m.svd for m in exact.modules} == {"exact"}
    # A sketch (rank + 10 oversampling) at least half the smaller side is cheaper as an exact SVD.
    assert all(m.svd == ("randomized" if m.full_rank >= 32 else "exact") for m in randomized.modules)
    adapter = load(tmp_path / "r")
    from loramerge.io.checkpoint import open_checkpoint

    b, f = open_checkpoint(llama_base), open_checkpoint(ft)
    for m_exact, m_rand in zip(exact.modules, randomized.modules):
        truth = f.read(m_rand.module + ".weight").double() - b.read(m_rand.module + ".weight").double()
        measured = float((truth - adapter.delta(m_rand.module, torch.float64)).norm() / truth.norm())
        assert m_rand.relative_error == pytest.approx(measured, rel=1e-3, abs=1e-6)
        assert m_exact.relative_error <= m_rand.relative_error + 1e-6  # truncated SVD is optimal
        assert m_rand.relative_error <= 1.1 * m_exact.relative_error
    energy = extract(llama_base, ft, output=tmp_path / "re", energy=0.5, exact_limit=8).report
    assert all(m.energy_kept >= 0.5 - 1e-6 for m in energy.modules)


def test_modules_regex_and_skipped(tmp_path, llama_base, tuned):
    _, ft = tuned
    result = extract(llama_base, ft, output=tmp_path / "attn", rank=2, modules=r"self_attn\.(q|v)_proj")
    assert result.adapter.modules and all(m.endswith(("q_proj", "v_proj")) for m in result.adapter.modules)
    assert result.report.skipped["model.layers.0.mlp.up_proj.weight"] == "excluded by --modules"
    plain = extract(llama_base, ft, output=tmp_path / "plain", rank=2)
    assert "keep-full" in plain.report.skipped["model.embed_tokens.weight"]
    assert "model.norm.weight" in plain.report.skipped and not plain.adapter.full_weights
    assert load(tmp_path / "plain").full_weights == {}


def test_vocabulary_mismatch_is_refused(tmp_path, llama, llama_base):
    bigger = copy.deepcopy(llama)
    bigger.resize_token_embeddings(llama.config.vocab_size + 8)
    ft = save_base(bigger, tmp_path / "ft")
    with pytest.raises(IncompatibleAdapters, match=r"vocabulary size differs.*resize"):
        extract(llama_base, ft, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_identical_models_and_bad_options(tmp_path, llama_base):
    with pytest.raises(IncompatibleAdapters, match="no linear or conv weight differs"):
        extract(llama_base, llama_base, output=tmp_path / "out")
    with pytest.raises(InvalidParameter, match="regex"):
        extract(llama_base, llama_base, output=tmp_path / "out", modules="(")
    with pytest.raises(InvalidParameter, match="choose one"):
        extract(llama_base, llama_base, output=tmp_path / "out", rank=2, energy=0.9)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(OutputExists):
        extract(llama_base, llama_base, output=tmp_path / "full")
    assert not (tmp_path / "out").exists()


def test_cli_extract(tmp_path, llama_base, tuned):
    _, ft = tuned
    runner = CliRunner()
    result = runner.invoke(main, ["extract", str(llama_base), str(ft), "-o", str(tmp_path / "lora"), "--energy", "0.9",
                                  "--keep-full", "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "intrinsic rank" in result.output and "wrote" in result.output
    assert json.loads((tmp_path / "r.json").read_text())["totals"]["modules"] == 15
    bad = runner.invoke(main, ["extract", str(llama_base), str(tmp_path / "nope"), "-o", str(tmp_path / "x")])
    assert bad.exit_code == 1 and bad.output.count("error:") == 1 and "Traceback" not in bad.output
    assert not (tmp_path / "x").exists()


def test_extracted_adapter_folds_back(tmp_path, llama, llama_base, tuned):
    """extract → fold closes the loop: folding the full-rank extraction rebuilds the fine-tune."""
    model, ft = tuned
    extract(llama_base, ft, output=tmp_path / "lora", max_error=1e-6, keep_full=True)
    fold(llama_base, tmp_path / "lora", output=tmp_path / "rebuilt")
    from transformers import LlamaForCausalLM

    rebuilt = LlamaForCausalLM.from_pretrained(tmp_path / "rebuilt").eval()
    with torch.no_grad():
        assert torch.allclose(rebuilt(TOKENS).logits, model(TOKENS).logits, atol=1e-4)
        assert torch.allclose(peft_adapted(llama, tmp_path / "lora")(TOKENS).logits, model(TOKENS).logits, atol=1e-4)
