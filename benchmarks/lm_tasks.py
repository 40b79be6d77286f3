"""A small causal LM and one PEFT LoRA per task, built offline on synthetic tasks, saved for reuse.

The world the model-in-the-loop benchmarks share (``benchmarks/eval.py``, and the tuning
benchmark): a word-level tokenizer over digits, letters and task words; a Llama-shaped model
pretrained for a few minutes on a mixture of generic sequence tasks (copy, reverse, first,
last); then, for each of several *new* tasks the base never saw (sort, add, max, a letter
cipher, ...), a rank-8 LoRA trained with PEFT on that task alone. Every task has train,
validation and test splits as JSONL files of ``{"prompt", "completion"}`` rows.

    from lm_tasks import prepare
    world = prepare(Path("bench-cache/lm"))        # builds once (minutes), then reloads in seconds
    world.base, world.adapters["sort"], world.data["sort"]["test"]

``prepare`` records in ``manifest.json`` what the base model and each LoRA were built with, and
reuses whatever was built with the same settings.
"""

from __future__ import annotations

import json
import math
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
DIGITS = [str(d) for d in range(10)]
LETTERS = [chr(c) for c in range(ord("a"), ord("a") + 16)]
PRETRAIN_TASKS = ("copy", "rev", "first", "last")
LORA_TASKS = ("sort", "add", "max", "map", "dedup", "shift")
WORDS = [f"{t}:" for t in PRETRAIN_TASKS + LORA_TASKS] + ["=", "+"]
VOCAB = SPECIALS + DIGITS + LETTERS + WORDS
SPLITS = {"train": 4096, "val": 256, "test": 256}
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Settings:
    """What a built world depends on; a saved world is reused only for the same settings."""

    tasks: tuple[str, ...] = ("sort", "max", "map", "shift")
    seed: int = 0
    pretrain_steps: int = 800
    lora_steps: int = 600
    hidden: int = 128
    layers: int = 4
    rank: int = 8


@dataclass
class World:
    """Paths of a built world: the base model folder, one adapter folder and one data split per task."""

    folder: Path
    settings: Settings
    base: Path
    adapters: dict[str, Path]
    data: dict[str, dict[str, Path]]
    seconds: dict[str, float] = field(default_factory=dict)


def tokenizer():
    """A word-level tokenizer over :data:`VOCAB` (whitespace-separated), BOS prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


# ------------------------------------------------------------------------------------------ tasks


def _items(rng: random.Random, pool: list[str], low: int = 3, high: int = 7) -> list[str]:
    return [rng.choice(pool) for _ in range(rng.randint(low, high))]


def _cipher(seed: int) -> dict[str, str]:
    shuffled = LETTERS[:]
    random.Random(10_000 + seed).shuffle(shuffled)
    return dict(zip(LETTERS, shuffled))


def task_row(task: str, rng: random.Random, seed: int = 0) -> dict[str, str]:
    """One ``{"prompt", "completion"}`` row of ``task``.

    Example:
        >>> row = task_row("sort", random.Random(0))
        >>> row["prompt"].startswith("sort:"), row["completion"].split() == sorted(row["completion"].split())
        (True, True)
    """
    if task == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return {"prompt": f"add: {' '.join(str(a))} + {' '.join(str(b))} =", "completion": " ".join(str(a + b))}
    pool = LETTERS if task in ("copy", "rev", "map", "shift", "dedup") else DIGITS
    items = _items(rng, pool)
    if task == "copy":
        answer = items
    elif task == "rev":
        answer = items[::-1]
    elif task == "first":
        answer = items[:1]
    elif task == "last":
        answer = items[-1:]
    elif task == "sort":
        answer = sorted(items)
    elif task == "max":
        answer = [max(items)]
    elif task == "map":
        table = _cipher(seed)
        answer = [table[x] for x in items]
    elif task == "dedup":
        answer = list(dict.fromkeys(items))
    elif task == "shift":
        answer = [LETTERS[(LETTERS.index(x) + 1) % len(LETTERS)] for x in items]
    else:
        raise ValueError(f"unknown task {task!r}")
    return {"prompt": f"{task}: {' '.join(items)} =", "completion": " ".join(answer)}


def task_rows(task: str, count: int, seed: int, split: str) -> list[dict[str, str]]:
    offset = {"train": 0, "val": 1, "test": 2}[split]
    rng = random.Random(zlib.crc32(f"{task}:{seed}:{offset}".encode()))
    return [task_row(task, rng, seed) for _ in range(count)]


# ---------------------------------------------------------------------------------------- training


def encode(tok, rows: list[dict[str, str]]) -> list[tuple[list[int], int]]:
    """(ids, first completion position) per row: prompt and completion tokenized apart, as the runtime does."""
    out = []
    for row in rows:
        prompt = tok(row["prompt"])["input_ids"]
        completion = tok(row["completion"], add_special_tokens=False)["input_ids"]
        out.append((prompt + completion, len(prompt)))
    return out


def batch(encoded: list[tuple[list[int], int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.zeros(len(encoded), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (seq, start) in enumerate(encoded):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, start:len(seq)] = torch.tensor(seq[start:])
    return ids.to(device), mask.to(device), labels.to(device)


def train(model: torch.nn.Module, sample: Callable[[random.Random], list[tuple[list[int], int]]], steps: int,
          lr: float, device: torch.device, seed: int) -> float:
    """AdamW with a cosine schedule on the completion tokens; returns the last loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        ids, mask, labels = batch(sample(rng), device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepare(folder: Path, settings: Settings | None = None, *, device: str = "cpu", log: Callable[[str], None] = print
            ) -> World:
    """Build (or reuse) the world in ``folder``: data, pretrained base model, one PEFT LoRA per task.

    The base model is reused when it was pretrained with the same settings, and so is each task's
    LoRA (``manifest.json`` records what each part was built with).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = settings or Settings()
    folder = Path(folder).resolve()  # the adapters record their base model's path
    manifest_file = folder / "manifest.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    base_key = {k: getattr(settings, k) for k in ("seed", "pretrain_steps", "hidden", "layers")}
    lora_key = {**base_key, **{k: getattr(settings, k) for k in ("lora_steps", "rank")}}
    target = torch.device(device)
    tok = tokenizer()
    seconds: dict[str, float] = dict(manifest.get("seconds", {}))
    for task in settings.tasks + PRETRAIN_TASKS:
        for split, size in SPLITS.items():
            write_jsonl(folder / "data" / task / f"{split}.jsonl", task_rows(task, size, settings.seed, split))

    base = folder / "base"
    if manifest.get("base") != base_key or not (base / "config.json").is_file():
        torch.manual_seed(settings.seed)
        config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=settings.hidden, intermediate_size=2 * settings.hidden,
                             num_hidden_layers=settings.layers, num_attention_heads=4, num_key_value_heads=4,
                             max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                             pad_token_id=0)
        model = LlamaForCausalLM(config).to(target)
        pools = {t: encode(tok, task_rows(t, SPLITS["train"], settings.seed, "train")) for t in PRETRAIN_TASKS}
        started = time.perf_counter()
        loss = train(model, lambda rng: [rng.choice(pools[rng.choice(PRETRAIN_TASKS)]) for _ in range(64)],
                     settings.pretrain_steps, 3e-3, target, settings.seed)
        seconds["pretrain"] = time.perf_counter() - started
        log(f"pretrained the base model: {settings.pretrain_steps} steps, last loss {loss:.3f}, "
            f"{seconds['pretrain']:.0f}s")
        model.save_pretrained(str(base), safe_serialization=True)
        tok.save_pretrained(str(base))
        manifest = {"base": base_key, "adapters": {}}
        _save_manifest(manifest_file, manifest, seconds)

    for task in settings.tasks:
        out = folder / "adapters" / task
        if manifest.get("adapters", {}).get(task) == lora_key and (out / "adapter_config.json").is_file():
            continue
        wrapped = get_peft_model(LlamaForCausalLM.from_pretrained(str(base)).to(target),
                                 LoraConfig(r=settings.rank, lora_alpha=2 * settings.rank, lora_dropout=0.0,
                                            target_modules=TARGET_MODULES, task_type="CAUSAL_LM"))
        pool = encode(tok, task_rows(task, SPLITS["train"], settings.seed, "train"))
        started = time.perf_counter()
        loss = train(wrapped, lambda rng, pool=pool: [rng.choice(pool) for _ in range(64)], settings.lora_steps, 3e-3,
                     target, settings.seed + 1 + LORA_TASKS.index(task))
        seconds[f"lora {task}"] = time.perf_counter() - started
        log(f"trained the {task} LoRA: {settings.lora_steps} steps, last loss {loss:.3f}, "
            f"{seconds[f'lora {task}']:.0f}s")
        wrapped.save_pretrained(str(out))
        manifest.setdefault("adapters", {})[task] = lora_key
        _save_manifest(manifest_file, manifest, seconds)
    return _world(folder, settings, {k: v for k, v in seconds.items()
                                     if k == "pretrain" or k.removeprefix("lora ") in settings.tasks})


def _save_manifest(file: Path, manifest: dict, seconds: dict[str, float]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps({**manifest, "seconds": seconds}, indent=2) + "\n")


def _world(folder: Path, settings: Settings, seconds: dict[str, float]) -> World:
    data = {task: {split: folder / "data" / task / f"{split}.jsonl" for split in SPLITS}
            for task in settings.tasks + PRETRAIN_TASKS}
    adapters = {task: folder / "adapters" / task for task in settings.tasks}
    return World(folder, settings, folder / "base", adapters, data, dict(seconds))
