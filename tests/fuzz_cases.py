"""Hostile inputs for the property tests (``tests/test_fuzz.py``) and the fuzz campaign.

Each target builds a small valid input (a PEFT folder, a kohya/LyCORIS file, a diffusers file, a
recipe, a model checkpoint, an output path), applies a drawn list of mutations, runs the reader
or writer, and classifies what happened with :func:`run_case`:

* ``ok`` — a result that passes the target's checks (finite factors that fit, a readable
  output, …), or ``refused`` — a :class:`~loramerge.errors.LoramergeError` with a one-line message:
  the promise is kept;
* ``traceback`` (any other exception), ``multiline`` (a message of several lines), ``wrong``
  (a result that fails the checks), ``hang`` (no answer within the time limit): the promise is
  broken.

Everything here uses only the public API that loramerge has had since before issue 15
(``load``, ``load_recipe``, ``open_checkpoint``, ``atomic_output``, the CLI), so the campaign
(``python -m tests.fuzz_campaign``) measures an older checkout the same way.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hypothesis import strategies as st
from safetensors.torch import save_file

from loramerge.errors import LoramergeError

HIDDEN = 16
RANK = 4
PEFT_MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
KOHYA_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
KOHYA_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
KOHYA_V = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v"
KOHYA_CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
KOHYA_TE = "lora_te_text_model_encoder_layers_0_mlp_fc1"
KINDS_KEPT = ("ok", "refused")
HUGE_INT = "<an integer of 5,000 digits>"  # written as digits by dumps(); hypothesis cannot repr the int itself


# ------------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class Outcome:
    kind: str  # ok, refused, traceback, multiline, wrong, hang
    detail: str = ""

    @property
    def kept(self) -> bool:
        return self.kind in KINDS_KEPT


class Hang(BaseException):
    """Raised by the alarm when a case runs past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Interrupt the block with :class:`Hang` after ``seconds`` (main thread only; elsewhere no limit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(*_: Any) -> None:
        raise Hang

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_case(action: Callable[[], Any], check: Callable[[Any], str | None] = lambda _: None,
             seconds: float = 20.0) -> Outcome:
    """Run ``action`` and classify it; ``check`` returns what is wrong with a result, or None."""
    try:
        with time_limit(seconds):
            result = action()
            problem = check(result)
    except Hang:
        return Outcome("hang", f"no answer within {seconds:g}s")
    except LoramergeError as exc:
        text = str(exc)
        if "\n" in text or not text.strip():
            return Outcome("multiline", text[:200])
        return Outcome("refused", type(exc).__name__)
    except RecursionError as exc:
        return Outcome("traceback", f"RecursionError: {str(exc)[:120]}")
    except Exception as exc:
        return Outcome("traceback", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
    if problem:
        return Outcome("wrong", problem)
    return Outcome("ok")


# ------------------------------------------------------------------------------- mutations

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.int32, torch.int64, torch.uint8, torch.bool)
SPECIAL_VALUES = (float("nan"), float("inf"), -float("inf"), 0.0, 1e30, -1e-30)

shapes = st.lists(st.integers(0, 40), min_size=0, max_size=5).map(tuple)
tensor_mutation = st.one_of(
    st.tuples(st.just("shape"), shapes),
    st.tuples(st.just("dtype"), st.sampled_from(DTYPES)),
    st.tuples(st.just("fill"), st.sampled_from(SPECIAL_VALUES)),
    st.tuples(st.just("poke"), st.sampled_from(SPECIAL_VALUES)),
    st.tuples(st.just("drop"), st.none()),
    st.tuples(st.just("transpose"), st.none()),
    st.tuples(st.just("scale"), st.sampled_from((0.0, -1.0, 1e20, 1e-20))),
    st.tuples(st.just("rename"), st.text("abcdelorauphw_.0123", min_size=1, max_size=40)),
)
tensor_mutations = st.lists(st.tuples(st.integers(0, 1000), tensor_mutation), max_size=3)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 300), st.sampled_from([8.5, 0.0, -1.0, 1e308, 2**70, HUGE_INT]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["LORA", "LOHA", "pissa", "(a+)+$", "(.*)*x", "[", "q_proj", "^model", "(q|k)\\1", "8"]),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["q_proj", "v_proj", "(a+)+$", "x", "layers.0"]),
                                                 inner, max_size=3)), max_leaves=8)
raw_mutation = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 400)),
    st.tuples(st.just("flip"), st.tuples(st.integers(0, 400), st.binary(min_size=1, max_size=4))),
    st.tuples(st.just("deep"), st.integers(100, 100_000)),
    st.tuples(st.just("binary"), st.binary(min_size=1, max_size=64)),
)


def mutate_tensors(tensors: dict[str, torch.Tensor], ops: list[tuple[int, tuple[str, Any]]]) -> dict[str, torch.Tensor]:
    """``tensors`` with each ``(key index, (operation, argument))`` applied in turn."""
    out = dict(tensors)
    for index, (op, arg) in ops:
        if not out:
            break
        key = sorted(out)[index % len(out)]
        t = out[key]
        if op == "shape":
            out[key] = torch.randn(arg) if math.prod(arg) < 100_000 else torch.randn(1)
        elif op == "dtype":
            out[key] = t.to(arg) if t.dtype != torch.bool else t
        elif op == "fill":
            out[key] = torch.full_like(t.float(), arg).to(t.dtype) if t.is_floating_point() else t
        elif op == "poke" and t.numel() and t.is_floating_point():
            flat = t.float().clone().reshape(-1)
            flat[0] = arg
            out[key] = flat.reshape(t.shape).to(t.dtype)
        elif op == "drop":
            del out[key]
        elif op == "transpose" and t.ndim >= 2:
            out[key] = t.transpose(0, 1).contiguous()
        elif op == "scale" and t.is_floating_point():
            out[key] = (t.float() * arg).to(t.dtype)
        elif op == "rename":
            out[arg] = out.pop(key)
    return out


def dumps(value: Any) -> str:
    """``json.dumps`` that writes :data:`HUGE_INT` as an integer of 5,000 digits (a hostile one)."""
    return json.dumps(value).replace(json.dumps(HUGE_INT), "9" * 5000)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def mutate_bytes(path: Path, ops: list[tuple[str, Any]]) -> None:
    data = bytearray(path.read_bytes())
    for op, arg in ops:
        if op == "truncate":
            data = data[: max(0, len(data) - arg)]
        elif op == "flip" and data:
            position, chunk = arg
            position %= len(data)
            data[position:position + len(chunk)] = chunk
        elif op == "deep":
            data = bytearray(b"[" * arg + b"]" * arg)
        elif op == "binary":
            data = bytearray(arg) + data
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------- checks


def check_adapter(adapter: Any) -> str | None:
    """What is wrong with a loaded adapter: factors that are not finite floats that fit, a bad scale or rank."""
    if not len(adapter):
        return "an adapter without modules was accepted"
    for name, lr in adapter.layers.items():
        A, B = lr.A, lr.B
        if not (A.is_floating_point() and B.is_floating_point()):
            return f"{name}: factors of dtype {A.dtype}/{B.dtype}"
        if A.ndim < 2 or B.ndim < 2 or A.shape[0] < 1 or B.shape[1] != A.shape[0] or A.numel() == 0:
            return f"{name}: factors of shapes {tuple(A.shape)}, {tuple(B.shape)}"
        if not math.isfinite(lr.scale):
            return f"{name}: scale {lr.scale}"
        for t in (A, B):
            if not bool(torch.isfinite(t.float()).all()):
                return f"{name}: NaN/Inf factors accepted"
        try:
            product = lr.product()
        except Exception as exc:  # the factors must multiply
            return f"{name}: factors do not multiply ({type(exc).__name__})"
        if not bool(torch.isfinite(product).all()):
            return f"{name}: the update overflows to NaN/Inf"
    config = adapter.config or {}
    if adapter.source_format == "peft":
        r = config.get("r", 8)
        if not isinstance(r, int) or isinstance(r, bool):
            return f"non-integer rank r={r!r} accepted"
        for value in (config.get("rank_pattern") or {}).values():
            if not isinstance(value, int) or isinstance(value, bool):
                return f"non-integer rank_pattern value {value!r} accepted"
    algorithms = config.get("algorithms") or {}
    for module, algorithm in algorithms.items():
        if algorithm in ("lora", "lora-tucker") and any(
                key.startswith(("hada_", "lokr_")) for key in config.get("_fuzz_parts", {}).get(module, ())):
            return f"{module}: LyCORIS tensors read as a LoRA"
    return None


# ------------------------------------------------------------------------------- builders


def peft_folder(folder: Path, seed: int = 0) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A small, valid PEFT LoRA folder (the layout PEFT writes): its config and tensors."""
    g = torch.Generator().manual_seed(seed)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny/llama", "r": RANK,
              "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_rslora": False, "use_dora": False,
              "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True}
    tensors = {}
    for m in PEFT_MODULES:
        tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(RANK, HIDDEN, generator=g) * 0.1
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(HIDDEN, RANK, generator=g) * 0.1
    write_peft(folder, config, tensors)
    return config, tensors


def write_peft(folder: Path, config: Any, tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(dumps(config) if not isinstance(config, str) else config)
    save_tensors(folder / "adapter_model.safetensors", tensors)


def kohya_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small SD 1.x file with LoRA, LoCon (3×3, Tucker), LoHa, LoKr and full modules."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.1

    return {
        f"{KOHYA_Q}.lora_down.weight": r(RANK, 8), f"{KOHYA_Q}.lora_up.weight": r(8, RANK),
        f"{KOHYA_Q}.alpha": torch.tensor(2.0),
        f"{KOHYA_CONV}.lora_down.weight": r(RANK, 8, 1, 1), f"{KOHYA_CONV}.lora_mid.weight": r(RANK, RANK, 3, 3),
        f"{KOHYA_CONV}.lora_up.weight": r(8, RANK, 1, 1), f"{KOHYA_CONV}.alpha": torch.tensor(4.0),
        f"{KOHYA_K}.hada_w1_a": r(8, 2), f"{KOHYA_K}.hada_w1_b": r(2, 8), f"{KOHYA_K}.hada_w2_a": r(8, 2),
        f"{KOHYA_K}.hada_w2_b": r(2, 8), f"{KOHYA_K}.alpha": torch.tensor(2.0),
        f"{KOHYA_V}.lokr_w1": r(2, 2), f"{KOHYA_V}.lokr_w2_a": r(4, 2), f"{KOHYA_V}.lokr_w2_b": r(2, 4),
        f"{KOHYA_V}.alpha": torch.tensor(2.0),
        f"{KOHYA_TE}.diff": r(16, 8),
    }


def kohya_parts(tensors: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    parts: dict[str, list[str]] = {}
    for key in tensors:
        module, _, suffix = key.partition(".")
        parts.setdefault(module, []).append(suffix)
    return parts


def diffusers_tensors(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    g = torch.Generator().manual_seed(seed)
    base = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    tensors = {}
    for p in ("to_q", "to_k"):
        tensors[f"{base}.{p}.lora_A.weight"] = torch.randn(RANK, 8, generator=g) * 0.1
        tensors[f"{base}.{p}.lora_B.weight"] = torch.randn(8, RANK, generator=g) * 0.1
    metadata = {"lora_adapter_metadata": json.dumps({"unet.r": RANK, "unet.lora_alpha": 8, "unet.peft_type": "LORA"})}
    return tensors, metadata


VALID_RECIPE = """\
sources:
  - path: a
    weight: 0.7
  - path: b
    weight: [0.2, 0.4]
method: ties
parameters:
  density: 0.5
rank: 4
seed: 1
output:
  path: out
"""
RECIPE_KEYS = ["sources", "method", "parameters", "rank", "energy", "max_error", "rank_max", "seed", "output",
               "base_model", "base_dir", "compute_dtype", "tied_embeddings", "weight", "path", "density", "filter",
               "value", "models", "merge_method", "model", "repo", "revision", "subfolder"]
yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["svd", "ties", "linear", "a", "b", "org/name@../x", "!!python/name:os.system", "*a", "&a x",
                     "9" * 5000, "[" * 3000, "0.5", "1e999", "{", "'", "fp16", "keep", "/dev/zero", "base+lora"]),
    st.text(max_size=10),
)
yaml_trees = st.recursive(yaml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(RECIPE_KEYS), inner, max_size=4)), max_leaves=12)
text_edit = st.tuples(st.integers(0, 400), st.integers(0, 5),
                      st.sampled_from(["", ":", "-", "[", "]", "{", "}", "&a", "*a", "!!python/object:x", "\t",
                                       "\n  ", "'", "\"", "\x00", "\xff", "9" * 4400, "[" * 200, "#", "? ", "|"]))


def yaml_text(tree: Any) -> str:
    """A YAML rendering of a drawn tree, with the drawn "special" strings left unquoted where they are tags."""
    import yaml

    text = yaml.safe_dump(tree, default_flow_style=None, allow_unicode=True)
    return text.replace("'!!python/name:os.system'", "!!python/name:os.system").replace("'*a'", "*a")


def edit_text(text: str, edits: list[tuple[int, int, str]]) -> str:
    for position, cut, insert in edits:
        position %= max(1, len(text))
        text = text[:position] + insert + text[position + cut:]
    return text


def checkpoint_folder(folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {"model.embed.weight": torch.randn(10, HIDDEN, generator=g),
               "model.layers.0.self_attn.q_proj.weight": torch.randn(HIDDEN, HIDDEN, generator=g),
               "model.norm.weight": torch.ones(HIDDEN, dtype=torch.float16),
               "model.step": torch.tensor([3], dtype=torch.int64)}
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / "model.safetensors", tensors, {"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return tensors


header_mutation = st.one_of(
    st.tuples(st.just("shape"), st.lists(st.integers(-5, 2**40), max_size=4)),
    st.tuples(st.just("offsets"), st.lists(st.integers(-10, 2**40), max_size=3)),
    st.tuples(st.just("dtype"), st.sampled_from(["F32", "F16", "I64", "F8_E4M3", "F4", "NOPE", "", "C64", "BOOL"])),
    st.tuples(st.just("metadata"), json_values),
    st.tuples(st.just("entry"), json_values),
    st.tuples(st.just("drop"), st.none()),
)
header_mutations = st.lists(st.tuples(st.integers(0, 10), header_mutation), min_size=1, max_size=3)


def mutate_header(path: Path, ops: list[tuple[int, tuple[str, Any]]]) -> None:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    names = sorted(k for k in header if k != "__metadata__")
    for index, (op, arg) in ops:
        name = names[index % len(names)]
        entry = header.get(name)
        if op == "metadata":
            header["__metadata__"] = arg
        elif op == "drop":
            header.pop(name, None)
        elif op == "entry":
            header[name] = arg
        elif isinstance(entry, dict):
            entry[{"shape": "shape", "offsets": "data_offsets", "dtype": "dtype"}[op]] = arg
    text = dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size:])


def check_checkpoint(ckpt: Any) -> str | None:
    """Every tensor an accepted checkpoint lists must read back with its declared shape."""
    for name, info in ckpt.tensors.items():
        if any(not isinstance(d, int) or d < 0 for d in info.shape):
            return f"{name}: shape {info.shape} accepted"
        try:
            tensor = ckpt.read(name)
        except LoramergeError:
            continue
        if tuple(tensor.shape) != tuple(info.shape):
            return f"{name}: read shape {tuple(tensor.shape)}, header {info.shape}"
    for shard, metadata in ckpt.shard_metadata.items():
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in (metadata or {}).items()):
            return f"{shard.name}: non-string metadata accepted"
    return None


# ------------------------------------------------------------------------------- folds

fold_weights = st.sampled_from([1.0, -1.0, 0.5, 1e39, -1e39, 1e-39, 3e38])


def fold_case(root: Path, header_ops: list, weight: float, adapter_ops: list) -> Outcome:
    """Fold a (mutated) PEFT adapter into a (mutated) toy checkpoint; the result must be right, or refused."""
    from safetensors import safe_open

    import loramerge

    base = root / "base"
    tensors = checkpoint_folder(base)
    if header_ops:
        mutate_header(base / "model.safetensors", header_ops)
    adapter = root / "adapter"
    config, factors = peft_folder(adapter)
    module = "model.layers.0.self_attn.q_proj"
    factors = {k: v for k, v in factors.items() if module in k}
    factors = mutate_tensors(factors, adapter_ops)
    write_peft(adapter, config, factors)
    out = root / "out"

    def action() -> Path:
        loramerge.fold(base, [adapter], output=out, weights=[weight])
        return out

    def check(path: Path) -> str | None:
        folded = {}
        for shard in sorted(path.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118
                    folded[key] = handle.get_tensor(key)
        name = f"{module}.weight"
        if name not in folded:
            return "the folded weight is missing"
        for key, value in folded.items():
            if value.is_floating_point() and not bool(torch.isfinite(value.float()).all()):
                return f"{key}: NaN/Inf written"
        A = factors.get(f"base_model.model.{module}.lora_A.weight")
        B = factors.get(f"base_model.model.{module}.lora_B.weight")
        if A is None or B is None:
            return None
        expected = tensors[name].double() + weight * (config["lora_alpha"] / config["r"]) * (B.double() @ A.double())
        if not torch.allclose(folded[name].double(), expected, rtol=1e-4, atol=1e-5):
            return "the folded weight is not base + w·ΔW"
        return None

    outcome = run_case(action, check, seconds=60)
    leftovers = [p.name for p in root.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    if leftovers:
        return Outcome("wrong", f"leftovers {leftovers}")
    if outcome.kind != "ok" and out.exists():
        return Outcome("wrong", f"partial output after {outcome.kind}")
    return outcome


# ------------------------------------------------------------------------------- the output layer

target_states = st.sampled_from(["none", "file", "empty_dir", "full_dir", "symlink", "dangling", "under_file"])
output_ops = st.fixed_dictionaries({
    "state": target_states, "force": st.booleans(), "directory": st.booleans(),
    "body": st.sampled_from(["ok", "raise", "oserror", "interrupt", "nothing"]),
})


def output_case(root: Path, case: dict[str, Any]) -> Outcome:
    """One atomic write into ``root/out`` whose target starts in ``case['state']``; checks what remains."""
    from loramerge.io.output import atomic_output

    out = root / "out"
    state = case["state"]
    if state == "file":
        out.write_text("old")
    elif state == "empty_dir":
        out.mkdir()
    elif state == "full_dir":
        out.mkdir()
        (out / "old.txt").write_text("old")
    elif state == "symlink":
        (root / "elsewhere").write_text("old")
        out.symlink_to(root / "elsewhere")
    elif state == "dangling":
        out.symlink_to(root / "nowhere")
    elif state == "under_file":
        (root / "file").write_text("old")
        out = root / "file" / "out"
    before = _snapshot(root)
    existed = state in ("file", "full_dir", "symlink")

    def action() -> str:
        with atomic_output(out, force=case["force"], directory=case["directory"]) as tmp:
            target = tmp / "new.txt" if case["directory"] else tmp
            if case["body"] != "nothing" or not case["directory"]:
                target.write_text("new")
            if case["body"] == "raise":
                raise LoramergeError("the work failed")
            if case["body"] == "oserror":
                raise OSError(28, "No space left on device")
            if case["body"] == "interrupt":
                raise KeyboardInterrupt
        return "written"

    try:
        outcome = run_case(action)
    except KeyboardInterrupt:
        outcome = Outcome("refused", "KeyboardInterrupt")
    leftovers = [p.name for p in root.iterdir() if ".tmp-" in p.name or ".old-" in p.name or ".lock-" in p.name]
    if leftovers:
        return Outcome("wrong", f"leftovers {leftovers}")
    if outcome.kind == "ok":
        if existed and not case["force"]:
            return Outcome("wrong", f"replaced an existing {state} without force")
        written = out / "new.txt" if case["directory"] else out
        if case["directory"] and case["body"] == "nothing":
            if not out.is_dir() or any(out.iterdir()):
                return Outcome("wrong", f"the output is not the empty folder written ({case})")
        elif not written.is_file() or written.read_text() != "new":
            return Outcome("wrong", f"the output is not what was written ({case})")
        return outcome
    if outcome.kind == "refused" and _snapshot(root) != before:
        return Outcome("wrong", "a refused write changed the folder")
    return outcome


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            out[str(path)] = "-> " + os.readlink(path)
        elif path.is_file():
            out[str(path)] = path.read_text(errors="replace")
        else:
            out[str(path)] = "dir"
    return out


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="loramerge-fuzz-") as name:
        yield Path(name)


# ------------------------------------------------------------------------------- the targets
# Each takes what its strategy draws and returns the outcome; the property tests assert it is kept,
# the campaign counts it.

PEFT_KEYS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "use_rslora", "use_dora",
             "peft_type", "fan_in_fan_out", "init_lora_weights", "modules_to_save", "base_model_name_or_path",
             "task_type"]
SET_KEYS = ["seed", "sources.0.weight", "output.path", "method", "a.b.c"]

peft_inputs = st.tuples(st.lists(st.tuples(st.sampled_from(PEFT_KEYS), json_values), max_size=3), tensor_mutations,
                        st.lists(raw_mutation, max_size=1), st.booleans())
kohya_inputs = st.tuples(tensor_mutations, st.lists(raw_mutation, max_size=1))
diffusers_inputs = st.tuples(tensor_mutations, st.one_of(st.none(), json_values))
recipe_inputs = st.tuples(yaml_trees, st.lists(text_edit, max_size=3), st.booleans(),
                          st.lists(st.tuples(st.sampled_from(SET_KEYS), yaml_scalars), max_size=2))
checkpoint_inputs = st.tuples(header_mutations, st.lists(raw_mutation, max_size=1))
fold_inputs = st.tuples(st.one_of(st.just([]), header_mutations), fold_weights,
                        st.one_of(st.just([]), tensor_mutations))


def peft_target(drawn: tuple) -> Outcome:
    import loramerge

    config_ops, tensor_ops, raw, raw_target = drawn
    with scratch() as root:
        folder = root / "adapter"
        config, tensors = peft_folder(folder)
        for key, value in config_ops:
            config[key] = value
        write_peft(folder, dumps(config), mutate_tensors(tensors, tensor_ops))
        if raw:
            mutate_bytes(folder / ("adapter_config.json" if raw_target else "adapter_model.safetensors"), raw)
        return run_case(lambda: loramerge.load(folder), check_adapter)


def kohya_check(parts: dict[str, list[str]]) -> Callable[[Any], str | None]:
    """:func:`check_adapter`, and no module with LyCORIS tensors read as a plain LoRA."""
    def check(adapter: Any) -> str | None:
        problem = check_adapter(adapter)
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


def kohya_target(drawn: tuple) -> Outcome:
    import loramerge

    tensor_ops, raw = drawn
    with scratch() as root:
        path = root / "lora.safetensors"
        tensors = mutate_tensors(kohya_tensors(), tensor_ops)
        save_tensors(path, tensors)
        if raw:
            mutate_bytes(path, raw)
        return run_case(lambda: loramerge.load(path), kohya_check(kohya_parts(tensors)))


def diffusers_target(drawn: tuple) -> Outcome:
    import loramerge

    tensor_ops, metadata = drawn
    with scratch() as root:
        path = root / "pytorch_lora_weights.safetensors"
        tensors, meta = diffusers_tensors()
        if metadata is not None:
            meta = {"lora_adapter_metadata": dumps(metadata)}
        save_tensors(path, mutate_tensors(tensors, tensor_ops), meta)
        return run_case(lambda: loramerge.load(path), check_adapter)


def recipe_target(drawn: tuple) -> Outcome:
    from loramerge.recipe.reader import load_recipe

    tree, edits, mutate_valid, sets = drawn
    with scratch() as root:
        path = root / "recipe.yaml"
        text = edit_text(VALID_RECIPE if mutate_valid else yaml_text(tree), edits)
        path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
        return run_case(lambda: load_recipe(path, [f"{k}={v}" for k, v in sets]))


def checkpoint_target(drawn: tuple) -> Outcome:
    from loramerge.io.checkpoint import open_checkpoint

    ops, raw = drawn
    with scratch() as root:
        folder = root / "model"
        checkpoint_folder(folder)
        mutate_header(folder / "model.safetensors", ops)
        if raw:
            mutate_bytes(folder / "model.safetensors", raw)
        return run_case(lambda: open_checkpoint(folder), check_checkpoint)


def fold_target(drawn: tuple) -> Outcome:
    header_ops, weight, adapter_ops = drawn
    with scratch() as root:
        return fold_case(root, header_ops, weight, adapter_ops)


def output_target(case: dict[str, Any]) -> Outcome:
    with scratch() as root:
        return output_case(root, case)


TARGETS: dict[str, tuple[st.SearchStrategy, Callable[[Any], Outcome]]] = {
    "peft": (peft_inputs, peft_target),
    "kohya/lycoris": (kohya_inputs, kohya_target),
    "diffusers": (diffusers_inputs, diffusers_target),
    "recipes": (recipe_inputs, recipe_target),
    "checkpoints": (checkpoint_inputs, checkpoint_target),
    "fold": (fold_inputs, fold_target),
    "output": (output_ops, output_target),
}
