"""Shared fixtures: tiny models and PEFT adapters written by PEFT itself, all offline."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# An unexpected exception in a CLI test is re-raised with its traceback, never hidden behind one line.
os.environ.setdefault("LORAMERGE_DEBUG", "1")
# The on-disk cache (loramerge/io/cache.py) goes to a folder of this run's own, never the user's.
if "LORAMERGE_CACHE" not in os.environ:
    import tempfile

    os.environ["LORAMERGE_CACHE"] = tempfile.mkdtemp(prefix="loramerge-test-cache-")

from tests.peft_fixtures import make_peft_adapter, tiny_gpt2, tiny_llama, toy_conv_net

CUDA = torch.cuda.is_available()
# Every device a device test runs on: always the CPU, and CUDA (marked ``gpu``) where there is one.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA device")])]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` by hand are skipped without CUDA, like the ``cuda`` cases of :func:`device`."""
    if CUDA:
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each available compute device in turn; a test compares what it computes there with the CPU's result."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def llama():
    return tiny_llama()


@pytest.fixture(scope="session")
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="session")
def conv_net():
    return toy_conv_net()


@pytest.fixture(scope="session")
def llama_adapters(llama, tmp_path_factory):
    """Four PEFT adapters on the tiny Llama that differ in rank, alpha, rsLoRA, patterns and targets."""
    root = tmp_path_factory.mktemp("llama_adapters")
    specs = {
        "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "rslora": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj"]),
        "patterns": dict(
            r=6, lora_alpha=12, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"],
            rank_pattern={"up_proj": 2, "model.layers.1.self_attn.q_proj": 3},
            alpha_pattern={"gate_proj": 3, "model.layers.0.self_attn.v_proj": 1.5},
        ),
        "same_rank": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    }
    return {
        name: make_peft_adapter(llama, root / name, seed=i + 1, **kwargs) for i, (name, kwargs) in enumerate(specs.items())
    }


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A saved tiny Llama with a tokenizer, PEFT adapters and evaluation data (tests/runtime_fixtures.py)."""
    from tests.runtime_fixtures import runtime_world

    return runtime_world(tmp_path_factory.mktemp("runtime_world"))


def pytest_addoption(parser):
    parser.addoption("--fuzz", action="store_true", default=False,
                     help="Run the property tests (tests/test_fuzz.py) with many more examples than CI does.")


def pytest_configure(config):
    if config.getoption("--fuzz", default=False):
        os.environ["LORAMERGE_FUZZ"] = "1"
