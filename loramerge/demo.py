"""The demo: a tiny Llama-shaped model and three PEFT adapters built locally, merged with every method.

Nothing is downloaded. The adapters differ the way real ones do: rank, alpha, rsLoRA,
``rank_pattern``/``alpha_pattern`` and target modules. :func:`build_demo_files` writes them in
PEFT's own layout (as ``save_pretrained`` does), so every other command can be tried on them.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loramerge.core.adapter import Adapter
from loramerge.io.formats.tensorfile import write_safetensors
from loramerge.io.output import atomic_output
from loramerge.io.sources import load
from loramerge.merge.engine import merge
from loramerge.merge.methods import MergeMethod, available_methods

BASE_MODEL_ID = "loramerge-demo/tiny-llama"
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 160, 2, 4, 2, 256
HEAD_DIM = HIDDEN // HEADS
DEMO_WEIGHTS = (0.5, 0.3, 0.2)

# name → (r, lora_alpha, use_rslora, targets, rank_pattern, alpha_pattern)
DEMO_ADAPTERS: dict[str, tuple[int, float, bool, list[str], dict[str, int], dict[str, float]]] = {
    "math": (8, 16, False, ["q_proj", "v_proj", "gate_proj", "up_proj"], {}, {}),
    "code": (4, 8, True, ["q_proj", "k_proj", "v_proj", "o_proj"], {}, {}),
    "style": (8, 8, False, ["q_proj", "up_proj", "down_proj"], {"down_proj": 4}, {"down_proj": 2}),
}


def linear_shapes() -> dict[str, tuple[int, int]]:
    """Every linear weight of the tiny model: module path → (out, in)."""
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.self_attn.q_proj": (HIDDEN, HIDDEN),
            f"{p}.self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"{p}.self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"{p}.self_attn.o_proj": (HIDDEN, HIDDEN),
            f"{p}.mlp.gate_proj": (INTERMEDIATE, HIDDEN),
            f"{p}.mlp.up_proj": (INTERMEDIATE, HIDDEN),
            f"{p}.mlp.down_proj": (HIDDEN, INTERMEDIATE),
        }
    return shapes


def write_base_model(folder: Path, seed: int = 0) -> Path:
    """A transformers-compatible Llama checkpoint (``config.json`` + ``model.safetensors``), random weights."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g) * 0.02,
        "model.norm.weight": torch.ones(HIDDEN),
        "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=g) * 0.02,
    }
    for name, (out_f, in_f) in linear_shapes().items():
        tensors[f"{name}.weight"] = torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)
    for i in range(LAYERS):
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(HIDDEN)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    write_safetensors(tensors, folder / "model.safetensors")
    config = {
        "_name_or_path": BASE_MODEL_ID, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "vocab_size": VOCAB, "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def write_demo_adapter(folder: Path, name: str, seed: int) -> Path:
    """One PEFT adapter of :data:`DEMO_ADAPTERS`, laid out exactly as PEFT's ``save_pretrained`` does.

    The factors share a random subspace across adapters, so merges see real interference.
    """
    r, alpha, rslora, targets, rank_pattern, alpha_pattern = DEMO_ADAPTERS[name]
    shared = torch.Generator().manual_seed(1234)
    own = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_f, in_f) in linear_shapes().items():
        leaf = module.rsplit(".", 1)[1]
        if leaf not in targets:
            continue
        rank = rank_pattern.get(leaf, r)
        common_b, common_a = torch.randn(out_f, rank, generator=shared), torch.randn(rank, in_f, generator=shared)
        B = 0.6 * common_b + 0.8 * torch.randn(out_f, rank, generator=own)
        A = 0.6 * common_a + 0.8 * torch.randn(rank, in_f, generator=own)
        tensors[f"base_model.model.{module}.lora_A.weight"] = A / math.sqrt(in_f)
        tensors[f"base_model.model.{module}.lora_B.weight"] = B * 0.05
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, folder / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": BASE_MODEL_ID,
        "r": r, "lora_alpha": alpha, "use_rslora": rslora, "target_modules": targets,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "use_dora": False,
        "modules_to_save": None, "revision": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def build_demo_files(root: Path) -> tuple[Path, list[Path]]:
    """Write the base model to ``root/base-model`` and the adapters to ``root/adapters/<name>``."""
    base = write_base_model(root / "base-model")
    adapters = [write_demo_adapter(root / "adapters" / name, name, seed=i + 1) for i, name in enumerate(DEMO_ADAPTERS)]
    return base, adapters


@dataclass
class DemoRow:
    method: str
    sources: int
    max_rank: int
    total_rank: int
    relative_error: float
    seconds: float


def exact_sum_error(merged: Adapter, sources: list[Adapter], weights: list[float]) -> float:
    """‖merged − Σ wᵢ ΔWᵢ‖_F / ‖Σ wᵢ ΔWᵢ‖_F over all modules, in float64."""
    num = den = 0.0
    modules = dict.fromkeys(m for s in sources for m in s.modules)
    for module in modules:
        exact = sum(w * s.delta(module, torch.float64) for s, w in zip(sources, weights) if module in s)
        got = merged.delta(module, torch.float64) if module in merged else torch.zeros_like(exact)
        num += float((got - exact).square().sum())
        den += float(exact.square().sum())
    return math.sqrt(num / den) if den else 0.0


def run_demo(root: Path, methods: list[MergeMethod] | None = None) -> list[DemoRow]:
    """Build the demo files under ``root``, merge with every method, write and re-read each result."""
    _, paths = build_demo_files(root)
    sources = [load(p) for p in paths]
    rows = []
    # Data-aware methods (regmean) need a model and data, which the demo's adapters do not come with.
    for method in methods or [m for m in available_methods() if not m.needs_statistics]:
        count = min(len(sources), method.max_sources or len(sources))
        used, weights = sources[:count], list(DEMO_WEIGHTS[:count])
        started = time.perf_counter()
        merged = merge(used, method=method.name, weights=weights, device="cpu")
        out = merged.save(root / "merged" / method.name, force=True)
        seconds = time.perf_counter() - started
        reloaded = load(out)
        ranks = [lr.rank for lr in reloaded.layers.values()]
        rows.append(DemoRow(method.name, count, max(ranks), sum(ranks), exact_sum_error(reloaded, used, weights), seconds))
    return rows


def format_table(rows: list[DemoRow]) -> str:
    """The demo's result table."""
    lines = [
        f"{'method':<16} {'sources':>7} {'max rank':>8} {'total rank':>10} {'rel. error vs exact sum':>24} {'time':>9}",
        "-" * 79,
    ]
    for r in rows:
        lines.append(
            f"{r.method:<16} {r.sources:>7} {r.max_rank:>8} {r.total_rank:>10} {r.relative_error:>24.2e} "
            f"{r.seconds * 1000:>7.0f}ms"
        )
    return "\n".join(lines)


def demo(save: Path | None = None, *, force: bool = False) -> str:
    """Run the demo (in ``save``, written atomically like any output, or a temporary folder) and return its table.

    Example:
        >>> from loramerge.merge.methods import get_method
        >>> import tempfile
        >>> rows = run_demo(Path(tempfile.mkdtemp()), [get_method("linear")])
        >>> rows[0].relative_error < 1e-6
        True
    """
    if save is not None:
        with atomic_output(save, force=force) as folder:
            return format_table(run_demo(folder))
    with tempfile.TemporaryDirectory(prefix="loramerge-demo-") as tmp:
        return format_table(run_demo(Path(tmp)))
