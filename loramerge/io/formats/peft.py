"""PEFT LoRA adapters: ``adapter_config.json`` plus ``adapter_model.safetensors`` (or, when asked, ``.bin``).

Reading bakes each module's scale from the config: ``alpha/r``, or ``alpha/√r`` with
``use_rslora``, where ``rank_pattern``/``alpha_pattern`` override ``r``/``lora_alpha`` by PEFT's
own matching rule. Writing stores the scale inside the factors (``alpha = r`` per module,
``use_rslora`` false), per-module ranks as full-path patterns checked for cross-matches, and an
explicit ``target_modules`` list, so ``PeftModel.from_pretrained`` loads the result as is.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from loramerge.core.adapter import Adapter, LowRank
from loramerge.errors import ConfigNotFound, CorruptFile, UnsupportedAdapter
from loramerge.io.experts import expert_name, join_fused, nesting_order, parse_expert_name, split_fused
from loramerge.io.factors import checked_tensors, factor, low_rank
from loramerge.io.formats.tensorfile import (
    read_json_object,
    read_tensor_file,
    write_safetensors,
)
from loramerge.io.patterns import PatternError, check_pattern, suffix_match
from loramerge.io.structured import (
    BOOL,
    NULL,
    NUMBER,
    POSITIVE,
    POSITIVE_INT,
    STRING,
    check_schema,
    list_of,
    map_of,
    one_of,
)

NAME = "peft"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

_FACTOR_PARTS = {
    "lora_A": "A",
    "lora_B": "B",
    "lora_embedding_A": "A",
    "lora_embedding_B": "B",
    "lora_magnitude_vector": "magnitude",
}
# Inits that re-decompose the base weights: their saved factors are only valid against a residual
# base, unless PEFT converted them on save (which resets init_lora_weights to true).
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Config fields of variants whose update is not scale·B@A on a fixed module weight.
_UNSUPPORTED_FIELDS = {
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "aLoRA (activated LoRA)",
    "use_bdlora": "BD-LoRA",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
    "use_qalora": "QA-LoRA",
    "trainable_token_indices": "trainable tokens",
    "megatron_config": "Megatron parallel layers",
}


# The types of the adapter_config.json fields loramerge reads (PEFT's own LoraConfig types).
CONFIG_SCHEMA = {
    "peft_type": STRING,
    "task_type": one_of(STRING, NULL),
    "base_model_name_or_path": one_of(STRING, NULL),
    "revision": one_of(STRING, NULL),
    "r": POSITIVE_INT,
    "lora_alpha": POSITIVE,
    "rank_pattern": one_of(map_of(POSITIVE_INT), NULL),
    "alpha_pattern": one_of(map_of(NUMBER), NULL),
    "target_modules": one_of(STRING, list_of(STRING), NULL),
    "modules_to_save": one_of(list_of(STRING), NULL),
    "use_rslora": one_of(BOOL, NULL),  # null, as PEFT reads it: false
    "use_dora": one_of(BOOL, NULL),
    "fan_in_fan_out": one_of(BOOL, NULL),
    "init_lora_weights": one_of(BOOL, STRING),
}


def detect(path: Path) -> bool:
    """True for a folder with ``adapter_config.json``, or an adapter file beside one."""
    if path.is_dir():
        return (path / CONFIG_NAME).is_file()
    return path.is_file() and (path.parent / CONFIG_NAME).is_file() and path.name in (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME)


def pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The ``rank_pattern``/``alpha_pattern`` key PEFT (≥ 0.15) applies to ``module``, or None.

    The first key in order for which ``(.*\\.)?(key)$`` matches the module path wins; failing
    that, the module path itself is looked up.

    Example:
        >>> pattern_key({"q_proj": 8}, "model.layers.0.self_attn.q_proj")
        'q_proj'
        >>> pattern_key({"q_proj": 8}, "model.layers.0.self_attn.k_proj") is None
        True
    """
    for key in patterns:
        if suffix_match(key, module):
            return key
    return module if module in patterns else None


def read(path: Path, *, allow_pickle: bool = False) -> Adapter:
    """Read a PEFT LoRA adapter folder (or its weights file) into an :class:`Adapter`.

    Example:
        >>> import tempfile, torch
        >>> from loramerge.core.adapter import Adapter, LowRank
        >>> folder = Adapter({"fc": LowRank(torch.ones(2, 3), torch.ones(4, 2), 0.5)}).save(tempfile.mkdtemp() + "/a")
        >>> read(folder)["fc"].rank
        2
    """
    folder = path if path.is_dir() else path.parent
    config = read_config(folder)
    weights_file = _weights_file(path, folder)
    tensors, _ = read_tensor_file(weights_file, allow_pickle=allow_pickle)
    return adapter_from_tensors(checked_tensors(tensors, weights_file), config, origin=weights_file, source=str(path))


def read_config(folder: Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of ``folder``, validated for LoRA."""
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise ConfigNotFound(f"{folder}: no {CONFIG_NAME}; it gives the rank and alpha the weights need")
    config = read_json_object(config_path, CONFIG_SCHEMA)
    check_config(config, config_path)
    return config


def check_config(config: dict[str, Any], origin: Path | str) -> None:
    """Refuse configs whose update loramerge cannot represent faithfully, saying why."""
    check_schema(config, CONFIG_SCHEMA, name=str(origin))
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapter(f"{origin}: peft_type {config.get('peft_type')!r} is not LoRA")
    for field_name, label in _UNSUPPORTED_FIELDS.items():
        if config.get(field_name):
            raise UnsupportedAdapter(
                f"{origin}: {label} ({field_name}) is not a plain low-rank update and is not supported"
            )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        raise UnsupportedAdapter(
            f"{origin}: init_lora_weights={init!r} stores factors relative to a modified base model; "
            "convert it with PEFT's path_initial_model_for_weight_conversion first"
        )
    for name in ("r", "lora_alpha"):
        value = config.get(name, 8)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise CorruptFile(f"{origin}: {name} must be a positive number, got {value!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(name) or {}
        if not isinstance(patterns, dict):
            raise CorruptFile(f"{origin}: {name} must be an object")
        for key in patterns:
            try:
                check_pattern(key)
            except PatternError as exc:
                raise CorruptFile(f"{origin}: {name} key {key!r} is not a pattern loramerge can match ({exc})") from None


def adapter_from_tensors(tensors: dict[str, torch.Tensor], config: dict[str, Any], *, origin: Path | str,
                         source: str | None = None, key_prefix: str = KEY_PREFIX,
                         source_format: str = NAME) -> Adapter:
    """Build an :class:`Adapter` from PEFT-style keys and a LoRA config (shared with diffusers files)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    full_weights: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        parsed = split_key(key, key_prefix)
        if parsed is None:
            name = key[len(key_prefix):] if key.startswith(key_prefix) else key
            full_weights[name.replace(".base_layer.", ".")] = tensor
            continue
        module, part, param = parsed
        slot = "bias" if param == "bias" else _FACTOR_PARTS[part]
        parts.setdefault(module, {})[slot] = tensor
        if part.startswith("lora_embedding"):
            parts[module]["embedding"] = tensor

    use_rslora = bool(config.get("use_rslora", False))
    use_dora = bool(config.get("use_dora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    layers: dict[str, LowRank] = {}
    parts = _parameter_targets(parts, config, origin, layers)
    for module, found in parts.items():
        if "A" not in found or "B" not in found:
            missing = "lora_A" if "A" not in found else "lora_B"
            raise CorruptFile(f"{origin}: module {module} has no {missing} tensor")
        A, B = factor(found["A"], origin, module, "lora_A"), factor(found["B"], origin, module, "lora_B")
        rank_key = pattern_key(rank_pattern, module)
        alpha_key = pattern_key(alpha_pattern, module)
        r = rank_pattern[rank_key] if rank_key is not None else config.get("r", 8)
        alpha = alpha_pattern[alpha_key] if alpha_key is not None else config.get("lora_alpha", 8)
        if int(A.shape[0]) != int(r):
            raise CorruptFile(
                f"{origin}: module {module} has rank {A.shape[0]} in its weights but the config gives r={r}"
            )
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        kind = "embedding" if "embedding" in found else ("conv" if A.ndim > 2 else "linear")
        magnitude = found.get("magnitude")
        if use_dora and magnitude is None:
            raise CorruptFile(f"{origin}: module {module} uses DoRA but has no lora_magnitude_vector")
        layers[module] = low_rank(
            origin, module, A=A, B=B, scale=float(scale), kind=kind, checked=True,
            fan_in_fan_out=fan_in_fan_out and kind == "linear", alpha=float(alpha), magnitude=magnitude,
            bias=found.get("bias"),
        )
    if not layers:
        raise CorruptFile(f"{origin}: no LoRA tensors (lora_A/lora_B) found")
    return Adapter(
        layers,
        base_model=config.get("base_model_name_or_path"),
        task_type=config.get("task_type"),
        source_format=source_format,
        source=source if source is not None else str(origin),
        full_weights=full_weights,
        config=config,
    )


def _parameter_targets(parts: dict[str, dict[str, torch.Tensor]], config: dict[str, Any], origin: Path | str,
                       layers: dict[str, LowRank]) -> dict[str, dict[str, torch.Tensor]]:
    """Move LoRA on ``target_parameters`` (PEFT's ParamWrapper) into ``layers``, one entry per expert.

    A wrapper's factors sit at ``<module>[.base_layer]*``; PEFT nests one wrapper per targeted
    parameter of a module, the innermost (most ``base_layer``) for the parameter registered first.
    A 3-D parameter's ``lora_A`` is ``(r·E, in)`` and ``lora_B`` ``(out, r·E)``: each expert gets its
    own update ``B_e @ A_e`` (see :func:`~loramerge.io.experts.split_fused`). A 2-D ``weight`` is an
    ordinary module. Returns the parts that are ordinary module targets.
    """
    targets = list(config.get("target_parameters") or [])
    if not targets:
        return parts
    by_module: dict[str, list[str]] = {}
    for target in targets:
        module_suffix, _, param = str(target).rpartition(".")
        by_module.setdefault(module_suffix, []).append(param)
    plain: dict[str, dict[str, torch.Tensor]] = {}
    for module, found in parts.items():
        depth = 0
        base = module
        while base.endswith(".base_layer"):
            base, depth = base[: -len(".base_layer")], depth + 1
        params = sorted({p for suffix, names in by_module.items() if base == suffix or base.endswith("." + suffix)
                         for p in names})
        if not params:
            plain[module] = found
            continue
        order = nesting_order(base, params, origin)
        if depth >= len(order):
            raise CorruptFile(f"{origin}: {module} is nested deeper than the {len(order)} parameter(s) targeted there")
        param = order[len(order) - 1 - depth]
        if "A" not in found or "B" not in found or set(found) - {"A", "B"}:
            raise CorruptFile(f"{origin}: parameter {base}.{param} needs exactly lora_A and lora_B (no bias, DoRA)")
        rank, alpha, scale = _module_scale(config, f"{base}.{param}")
        A = factor(found["A"], origin, f"{base}.{param}", "lora_A", ndims=(2,))
        B = factor(found["B"], origin, f"{base}.{param}", "lora_B", ndims=(2,))
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] % rank or B.shape[1] != A.shape[0]:
            raise CorruptFile(f"{origin}: parameter {base}.{param} has lora_A {tuple(A.shape)} and lora_B "
                              f"{tuple(B.shape)}, which are not r={rank} per expert")
        experts = A.shape[0] // rank
        if param == "weight" and experts == 1:
            layers[base] = low_rank(origin, base, A=A, B=B, scale=scale, alpha=alpha, checked=True)
            continue
        for e, (a, b) in enumerate(split_fused(A, B, experts)):
            name = expert_name(base, param, e)
            layers[name] = low_rank(origin, name, A=a, B=b, scale=scale, alpha=alpha, checked=True)
    return plain


def _module_scale(config: dict[str, Any], key: str) -> tuple[int, float, float]:
    """``(r, alpha, scale)`` of one module or parameter key, patterns applied."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rank_key, alpha_key = pattern_key(rank_pattern, key), pattern_key(alpha_pattern, key)
    r = rank_pattern[rank_key] if rank_key is not None else config.get("r", 8)
    alpha = alpha_pattern[alpha_key] if alpha_key is not None else config.get("lora_alpha", 8)
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return int(r), float(alpha), float(scale)


def split_key(key: str, key_prefix: str = KEY_PREFIX) -> tuple[str, str, str] | None:
    """``(module, part, param)`` of a LoRA tensor key, or None for any other key.

    Accepts keys with or without the adapter name (``lora_A.default.weight``) and the prefix.

    Example:
        >>> split_key("base_model.model.model.layers.0.q_proj.lora_A.weight")
        ('model.layers.0.q_proj', 'lora_A', 'weight')
        >>> split_key("base_model.model.embed.lora_embedding_B")
        ('embed', 'lora_embedding_B', 'weight')
    """
    tokens = key.split(".")
    positions = [i for i, t in enumerate(tokens) if t in _FACTOR_PARTS]
    if not positions or positions[-1] == 0:
        return None
    i = positions[-1]
    rest = tokens[i + 1:]
    if len(rest) > 2:
        return None
    param = rest[-1] if rest and rest[-1] in ("weight", "bias") else "weight"
    module = ".".join(tokens[:i])
    if module.startswith(key_prefix):
        module = module[len(key_prefix):]
    return module, tokens[i], param


def write(adapter: Adapter, folder: Path, *, dtype: torch.dtype) -> None:
    """Write ``adapter`` as a PEFT folder: scale baked in, per-module ranks as full-path patterns.

    DoRA magnitudes go in ``lora_magnitude_vector`` (``use_dora``), bias updates in ``lora_B.bias``
    (``lora_bias``; modules without one keep PEFT's zero bias).
    """
    uses_dora(adapter)  # refuses what PEFT cannot hold
    layers = {name: lr.baked() for name, lr in adapter.layers.items()}
    tensors: dict[str, torch.Tensor] = {}
    parameters = _fused_parameters(layers)
    for key, A, B, _ in parameters.values():
        tensors[f"{KEY_PREFIX}{key}.lora_A.weight"] = A.to(dtype)
        tensors[f"{KEY_PREFIX}{key}.lora_B.weight"] = B.to(dtype)
    layers = {name: lr for name, lr in layers.items() if parse_expert_name(name) is None}
    for name, lr in layers.items():
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if lr.kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        tensors[f"{KEY_PREFIX}{name}.{a_key}"] = lr.A.to(dtype)
        tensors[f"{KEY_PREFIX}{name}.{b_key}"] = lr.B.to(dtype)
        if lr.magnitude is not None:
            tensors[f"{KEY_PREFIX}{name}.lora_magnitude_vector"] = peft_magnitude(lr).to(dtype)
    for name, tensor in adapter.full_weights.items():
        tensors[f"{KEY_PREFIX}{name}"] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    ranks = {name: lr.rank for name, lr in layers.items()}
    ranks.update({f"{module}.{param}": rank for (module, param), (_, _, _, rank) in parameters.items()})
    config = build_config(adapter, ranks, [f"{module}.{param}" for module, param in parameters])
    config["use_dora"] = uses_dora(adapter)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_safetensors(tensors, folder / WEIGHTS_NAME)


def build_config(adapter: Adapter, ranks: dict[str, int], parameters: list[str] | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` for baked factors of the given per-module ranks (alpha = rank).

    ``parameters`` are full ``<module>.<parameter>`` keys written as ``target_parameters``; their
    ranks (per expert) are in ``ranks`` under the same keys.
    """
    default_rank = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = full_path_patterns(ranks, default_rank)
    modules_to_save = sorted({k.rsplit(".", 1)[0] for k in adapter.full_weights}) or None
    return {
        "peft_type": "LORA",
        "task_type": adapter.task_type,
        "base_model_name_or_path": adapter.base_model,
        "revision": None,
        "r": default_rank,
        "lora_alpha": default_rank,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "target_modules": [name for name in ranks if name not in (parameters or [])],
        "target_parameters": list(parameters) if parameters else None,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": any(lr.fan_in_fan_out for lr in adapter.layers.values()),
        "modules_to_save": modules_to_save,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def full_path_patterns(values: dict[str, int], default: int) -> dict[str, int]:
    """A ``rank_pattern`` giving every module its value under PEFT's matching, whatever the key order.

    Full module paths are used as keys. PEFT matches a key against any path that *ends* with it,
    so a key that is a dotted suffix of another module's path is anchored with ``^`` (honoured by
    PEFT ≥ 0.15). The result is checked in both the written and the sorted key order.

    Example:
        >>> full_path_patterns({"a.q": 4, "b.q": 8, "x.a.q": 8}, 8)
        {'^a.q': 4}
    """
    modules = list(values)
    pattern: dict[str, int] = {}
    for key in modules:
        if values[key] == default:
            continue
        clashes = any(other != key and _peft_matches(key, other) for other in modules)
        pattern[("^" + key) if clashes else key] = values[key]
    for order in (pattern, dict(sorted(pattern.items()))):
        for m in modules:
            k = pattern_key(order, m)
            got = order[k] if k is not None else default
            if got != values[m]:
                raise RuntimeError(f"internal error: rank pattern resolves {m} to {got}, expected {values[m]}")
    return pattern


def _fused_parameters(layers: dict[str, LowRank]) -> dict[tuple[str, str], tuple[str, torch.Tensor, torch.Tensor, int]]:
    """Expert slices regrouped into PEFT ParamWrapper factors: ``(module, param) → (key, lora_A, lora_B, r)``.

    Every expert of a parameter gets the largest rank among them (zero padded), experts missing
    from the adapter get zero factors, and the key carries one ``.base_layer`` per wrapper nested
    outside it, as PEFT saves them.
    """
    groups: dict[tuple[str, str], dict[int, LowRank]] = {}
    for name, lr in layers.items():
        parsed = parse_expert_name(name)
        if parsed is not None:
            groups.setdefault(parsed[:2], {})[parsed[2]] = lr
    out: dict[tuple[str, str], tuple[str, torch.Tensor, torch.Tensor, int]] = {}
    per_module: dict[str, list[str]] = {}
    for module, param in groups:
        per_module.setdefault(module, []).append(param)
    for (module, param), experts in groups.items():
        rank = max(lr.rank for lr in experts.values())
        sample = next(iter(experts.values()))
        if sample.kind != "linear" or sample.fan_in_fan_out:
            raise UnsupportedAdapter(f"module {module}.{param}: only linear expert updates can be written")
        count = max(experts) + 1
        padded = []
        for e in range(count):
            lr = experts.get(e)
            A = torch.zeros(rank, sample.A.shape[1], dtype=sample.A.dtype)
            B = torch.zeros(sample.B.shape[0], rank, dtype=sample.B.dtype)
            if lr is not None:
                if lr.A.shape[1] != A.shape[1] or lr.B.shape[0] != B.shape[0]:
                    raise UnsupportedAdapter(f"{expert_name(module, param, e)}: expert shapes differ within {param}")
                A[:lr.rank], B[:, :lr.rank] = lr.A, lr.B
            padded.append((A, B))
        order = nesting_order(module, sorted(per_module[module]), "adapter")
        depth = len(order) - 1 - order.index(param)
        A, B = join_fused(padded)
        out[(module, param)] = (module + ".base_layer" * depth, A, B, rank)
    return out


def _peft_matches(key: str, module: str) -> bool:
    return suffix_match(key, module)


def _weights_file(path: Path, folder: Path) -> Path:
    if path.is_file():
        return path
    for name in (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME):
        if (folder / name).is_file():
            return folder / name
    raise CorruptFile(f"{folder}: has {CONFIG_NAME} but no {WEIGHTS_NAME}")


def uses_dora(adapter: Adapter) -> bool:
    """True when every module is DoRA (PEFT's ``use_dora`` is one flag for all), False when none is.

    A mix, or a magnitude along the input axis (old LyCORIS), has no PEFT form: UnsupportedAdapter.
    """
    dora = [name for name, lr in adapter.layers.items() if lr.magnitude is not None]
    if not dora:
        return False
    plain = [name for name, lr in adapter.layers.items() if lr.magnitude is None]
    if plain:
        raise UnsupportedAdapter(
            f"module {dora[0]} is DoRA but {plain[0]} is not; PEFT's use_dora holds for every module, "
            "so this mix can only be folded or written as kohya/LyCORIS"
        )
    for name in dora:
        if adapter.layers[name].magnitude_axis != "out":
            raise UnsupportedAdapter(
                f"module {name}: a DoRA magnitude along the input axis (LyCORIS wd_on_output=False) has no "
                "PEFT form; fold it or write it as kohya/LyCORIS"
            )
    return True


def peft_magnitude(lr: LowRank) -> torch.Tensor:
    """``lr``'s per-output DoRA magnitude as PEFT stores ``lora_magnitude_vector``: ``(out,)``, conv ``(1, out, 1, 1)``."""
    assert lr.magnitude is not None
    if lr.kind == "conv":
        return lr.magnitude.reshape(1, -1, *([1] * (lr.A.ndim - 2)))
    return lr.magnitude.reshape(-1)
