"""Per-entry methods against PEFT 0.21.2's add_weighted_adapter(ties_svd / magnitude_prune_svd) at full rank.

PEFT's ``*_svd`` combinations apply the method to the dense deltas ΔWᵢ and then truncate with an
SVD; at ``svd_rank = min(out, in)`` the truncation is exact, so the merged delta is PEFT's TIES
itself. PEFT elects the sign on the unweighted deltas while loramerge elects on wᵢ·ΔWᵢ: the two
coincide when all weights are equal and positive, which is what these tests use for TIES.
Magnitude pruning does not depend on the weights' role, so any weights compare.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import loramerge
from tests.method_fixtures import relative_error

RANK = 4
ALPHAS = {"a": 8, "b": 4, "c": 12}


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(20, 36)
        self.down = nn.Linear(36, 20)


@pytest.fixture(scope="module")
def peft_model_and_sources(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("peft_oracle")
    model = None
    for name, alpha in ALPHAS.items():
        config = LoraConfig(r=RANK, lora_alpha=alpha, target_modules=["up", "down"], init_lora_weights=False)
        if model is None:
            model = get_peft_model(TwoLayers(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "lora_" in pname:
                param.normal_(0.0, 0.4)
    sources = []
    for name in ALPHAS:
        folder = root / name
        model.save_pretrained(str(folder), selected_adapters=[name])
        # save_pretrained puts a non-default adapter in a subfolder named after it.
        sources.append(loramerge.load(folder / name if (folder / name).is_dir() else folder))
    return model, sources


def peft_merge(model, combination_type: str, weights: list[float], **kwargs) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model)
    model.add_weighted_adapter(list(ALPHAS), weights, "merged", combination_type=combination_type,
                               svd_rank=20, **kwargs)
    return {name: model.base_model.model.get_submodule(name).get_delta_weight("merged").detach()
            for name in ("up", "down")}


@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [1.5, 1.5, 1.5]])
def test_ties_equals_peft_ties_svd_at_full_rank(peft_model_and_sources, majority_sign, weights):
    model, sources = peft_model_and_sources
    expected = peft_merge(model, "ties_svd", weights, density=0.3, majority_sign_method=majority_sign)
    merged = loramerge.merge(sources, method="ties", weights=weights, density=0.3, majority_sign=majority_sign, rank=20)
    for name, delta in expected.items():
        assert relative_error(merged.delta(name), delta) < 1e-5, name


def test_magnitude_prune_equals_peft_magnitude_prune_svd(peft_model_and_sources):
    model, sources = peft_model_and_sources
    weights = [0.7, -1.2, 0.4]
    expected = peft_merge(model, "magnitude_prune_svd", weights, density=0.4)
    merged = loramerge.merge(sources, method="magnitude_prune", weights=weights, density=0.4, rank=20)
    for name, delta in expected.items():
        assert relative_error(merged.delta(name), delta) < 1e-5, name


def test_ties_with_unequal_weights_differs_from_peft_where_documented(peft_model_and_sources):
    """With unequal weights PEFT's unweighted vote and loramerge's weighted vote disagree on some entries."""
    model, sources = peft_model_and_sources
    weights = [3.0, 0.2, 1.0]
    expected = peft_merge(model, "ties_svd", weights, density=0.5)
    merged = loramerge.merge(sources, method="ties", weights=weights, density=0.5, rank=20)
    assert max(relative_error(merged.delta(n), d) for n, d in expected.items()) > 1e-3
