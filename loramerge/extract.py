"""Extracting a LoRA from a fine-tuned model: the low-rank part of W_finetuned − W_base, per module.

For each linear or conv weight that differs, ΔW is factored by an SVD: exact (LAPACK) when the
smaller side is at most :data:`EXACT_LIMIT`, otherwise randomized (Halko et al. 2011) with the
error measured on the result, ‖ΔW − B A‖_F / ‖ΔW‖_F, not assumed. The rank follows the policy
(``rank``, ``energy``, ``max_error`` or kohya's ``sv_ratio``/``sv_cumulative``/``sv_fro``, capped by
``rank_max``), module by module. Embeddings, norms and other tensors that differ become
``modules_to_save`` with ``keep_full``, or are listed as skipped.

The report gives, per module, the rank kept, the energy kept and the error, plus each module's
"intrinsic rank" (the rank holding 90% and 99% of ‖ΔW‖²) and, for the whole model, the share of
the update a LoRA of rank r would capture. This is what tells a user whether a full fine-tune
is low-rank at all.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from loramerge.core.adapter import Adapter, LowRank
from loramerge.core.devices import (
    HostToDevice,
    device_errors,
    dtype_name,
    execution_context,
    one_core_spare,
    parse_dtype,
)
from loramerge.core.linalg import dense_svd
from loramerge.core.rank import RankPolicy, host_spectrum
from loramerge.errors import IncompatibleAdapters, InvalidParameter, LoramergeError
from loramerge.io.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from loramerge.io.formats import get_format
from loramerge.io.names import (
    CONV1D_LEAVES,
    CONV1D_MODEL_TYPES,
    OUTPUT_EMBEDDING,
    is_input_embedding,
    tied_embeddings,
)
from loramerge.io.output import atomic_output, check_output
from loramerge.io.sources import resolve_model

EXACT_LIMIT = 1024
DEFAULT_RANK = 32
RECIPE_NAME = "loramerge.json"
_SUMMARY_RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_KEPT_SPECTRUM = 1024


@dataclass
class ExtractedModule:
    """One decomposed module: rank kept, energy kept, measured error and its intrinsic ranks.

    ``spectrum`` holds the leading singular values that were computed (all of them for an exact
    SVD) and ``total`` is ‖ΔW‖²_F, so energies are exact fractions of the whole update.
    """

    module: str
    kind: str
    shape: tuple[int, ...]
    rank: int
    full_rank: int
    energy_kept: float
    relative_error: float
    svd: str
    delta_norm: float
    relative_change: float
    total: float = 0.0
    spectrum: list[float] = field(default_factory=list)

    def rank_for(self, energy: float) -> int | None:
        """The smallest rank holding ``energy`` of ‖ΔW‖², or None if beyond the computed spectrum."""
        if self.total == 0.0:
            return 0
        kept = 0.0
        for i, s in enumerate(self.spectrum):
            kept += s * s
            if kept >= energy * self.total * (1 - 1e-9):
                return i + 1
        return None

    def energy_at(self, rank: int) -> tuple[float, bool]:
        """(fraction of ‖ΔW‖² in the top ``rank`` directions, whether that figure is exact)."""
        if self.total == 0.0:
            return 1.0, True
        part = sum(s * s for s in self.spectrum[:rank]) / self.total
        exact = rank <= len(self.spectrum) or len(self.spectrum) >= self.full_rank
        return min(1.0, part), exact


@dataclass
class ExtractReport:
    """The whole extraction: decomposed modules, full tensors kept, tensors skipped and why."""

    modules: list[ExtractedModule]
    kept_full: list[str]
    skipped: dict[str, str]
    unchanged: int
    policy: dict[str, Any]
    seconds: float = 0.0

    def intrinsic(self) -> dict[str, Any]:
        """Per-module rank for 90% / 99% energy (min, median, max; None = beyond the computed spectrum)."""
        out: dict[str, Any] = {}
        for energy in (0.9, 0.99):
            ranks = [m.rank_for(energy) for m in self.modules]
            known = [r for r in ranks if r is not None]
            fractions = [r / m.full_rank for r, m in zip(ranks, self.modules) if r is not None and m.full_rank]
            out[f"rank_for_{int(energy * 100)}pct"] = {
                "min": min(known) if known else None,
                "median": statistics.median(known) if known else None,
                "max": max(known) if known else None,
                "unknown": len(ranks) - len(known),
                "median_fraction_of_full_rank": statistics.median(fractions) if fractions else None,
            }
        return out

    def capture_by_rank(self) -> list[dict[str, Any]]:
        """For r = 1, 2, 4, …: the share of the whole model's ‖ΔW‖² that rank-r LoRAs would hold."""
        total = sum(m.total for m in self.modules)
        top = max((m.full_rank for m in self.modules), default=0)
        rows = []
        for r in _SUMMARY_RANKS:
            if r > top:
                break
            parts = [m.energy_at(r) for m in self.modules]
            kept = sum(e * m.total for (e, _), m in zip(parts, self.modules))
            rows.append({"rank": r, "energy": kept / total if total else 1.0, "exact": all(x for _, x in parts)})
        return rows

    def totals(self) -> dict[str, Any]:
        errors = [m.relative_error for m in self.modules]
        total = sum(m.total for m in self.modules)
        kept = sum(m.energy_kept * m.total for m in self.modules)
        return {
            "modules": len(self.modules),
            "rank_total": sum(m.rank for m in self.modules),
            "energy_kept": kept / total if total else 1.0,
            "max_relative_error": max(errors, default=0.0),
            "mean_relative_error": sum(errors) / len(errors) if errors else 0.0,
            "kept_full": len(self.kept_full),
            "skipped": len(self.skipped),
            "unchanged": self.unchanged,
        }

    def to_dict(self) -> dict[str, Any]:
        modules = []
        for m in self.modules:
            row = asdict(m)
            row["shape"] = list(m.shape)
            row["spectrum"] = [round(s, 6) for s in m.spectrum[:64]]
            row["rank_for_90pct"], row["rank_for_99pct"] = m.rank_for(0.9), m.rank_for(0.99)
            modules.append(row)
        return {
            "policy": self.policy,
            "seconds": self.seconds,
            "totals": self.totals(),
            "intrinsic_rank": self.intrinsic(),
            "capture_by_rank": self.capture_by_rank(),
            "kept_full": self.kept_full,
            "skipped": self.skipped,
            "modules": modules,
        }

    def summary(self, worst: int = 5) -> str:
        """A text report: the worst modules, the intrinsic ranks and the capture-by-rank table."""
        lines = [f"{'module':<44} {'shape':>12} {'rank':>5} {'r90':>5} {'r99':>5} {'energy':>7} {'rel.err':>8} svd"]
        for m in sorted(self.modules, key=lambda m: m.relative_error, reverse=True)[:worst]:
            r90, r99 = m.rank_for(0.9), m.rank_for(0.99)
            shape = "x".join(map(str, m.shape))
            lines.append(
                f"{_clip(m.module, 44):<44} {shape:>12} {m.rank:>5} {_rank(r90, m):>5} {_rank(r99, m):>5} "
                f"{m.energy_kept:>7.4f} {m.relative_error:>8.2e} {m.svd}"
            )
        t = self.totals()
        lines.append(
            f"{t['modules']} modules, total rank {t['rank_total']}, energy kept {t['energy_kept']:.4f}, worst error "
            f"{t['max_relative_error']:.2e}; {t['kept_full']} kept full, {t['skipped']} skipped, "
            f"{t['unchanged']} unchanged"
        )
        intrinsic = self.intrinsic()
        for key, label in (("rank_for_90pct", "90%"), ("rank_for_99pct", "99%")):
            row = intrinsic[key]
            if row["median"] is not None:
                frac = row["median_fraction_of_full_rank"]
                lines.append(
                    f"intrinsic rank for {label} energy: min {row['min']}, median {row['median']:g}, max {row['max']}"
                    + (f" (median {frac:.0%} of full rank)" if frac is not None else "")
                    + (f"; {row['unknown']} module(s) need more than the computed spectrum" if row["unknown"] else "")
                )
        capture = self.capture_by_rank()
        if capture:
            cells = [f"r={c['rank']}: {'' if c['exact'] else '≥'}{c['energy']:.1%}" for c in capture]
            lines.append("share of ‖ΔW‖² a LoRA of rank r captures: " + ", ".join(cells))
        if self.skipped:
            shown = list(self.skipped.items())[:5]
            lines.append("skipped: " + "; ".join(f"{k} ({v})" for k, v in shown)
                         + (f"; … {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""))
        return "\n".join(lines)


@dataclass
class ExtractResult:
    path: Path
    adapter: Adapter
    report: ExtractReport


def extract(
    base: str | Path,
    finetuned: str | Path,
    *,
    output: str | Path,
    rank: int | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    rank_max: int | None = None,
    sv_ratio: float | None = None,
    sv_cumulative: float | None = None,
    sv_fro: float | None = None,
    modules: str | None = None,
    keep_full: bool = False,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    exact_limit: int = EXACT_LIMIT,
    force: bool = False,
    allow_pickle: bool = False,
    progress: bool = False,
) -> ExtractResult:
    """Write a PEFT LoRA adapter of ``finetuned − base`` to ``output`` and report what it kept.

    The rank policy is one of ``rank`` (default 32), ``energy``, ``max_error``, ``sv_ratio``,
    ``sv_cumulative`` or ``sv_fro`` (see :class:`~loramerge.core.rank.RankPolicy`), with an optional
    ``rank_max``. ``modules`` is a regex searched in module paths. ``keep_full`` stores changed
    embeddings, norms and other non-decomposable tensors as ``modules_to_save``. ``dtype`` is
    the stored factor dtype (default float32).

    Example:
        >>> import tempfile, torch
        >>> from loramerge.io.formats.tensorfile import write_safetensors
        >>> root = Path(tempfile.mkdtemp())
        >>> for name, w in (("base", torch.zeros(6, 5)), ("ft", torch.outer(torch.ones(6), torch.arange(5.0)))):
        ...     (root / name).mkdir()
        ...     write_safetensors({"fc.weight": w}, root / name / "model.safetensors")
        >>> result = extract(root / "base", root / "ft", output=root / "lora", rank=2)
        >>> m = result.report.modules[0]
        >>> m.module, m.rank, m.relative_error < 1e-6
        ('fc', 1, True)
    """
    started = time.perf_counter()
    check_output(output, force=force)
    policy = RankPolicy.from_options(rank=rank, energy=energy, max_error=max_error, sv_ratio=sv_ratio,
                                     sv_cumulative=sv_cumulative, sv_fro=sv_fro,
                                     rank_max=rank_max).with_default_rank(DEFAULT_RANK)
    try:
        pattern = re.compile(modules) if modules else None
    except re.error as exc:
        raise InvalidParameter(f"--modules {modules!r} is not a valid regex ({exc})", parameter="modules") from None
    out_dtype = parse_dtype(dtype) or torch.float32
    context = execution_context(device, torch.float32)  # validated before any checkpoint is opened
    target = context.device
    base_ckpt = _open(base, allow_pickle)
    ft_ckpt = _open(finetuned, allow_pickle)
    to_device = HostToDevice(target)
    pairs, skipped = _pair(base_ckpt, ft_ckpt)
    roles = _roles(ft_ckpt, pairs)

    layers: dict[str, LowRank] = {}
    reports: list[ExtractedModule] = []
    full_modules: set[str] = set()
    unchanged = 0
    with one_core_spare(), tqdm(total=len(pairs), unit="tensor", desc="extract", disable=not progress) as bar:
        for name, base_name in pairs.items():
            bar.update(1)
            ft_info = ft_ckpt.tensors[name]
            if not ft_info.is_float:
                if not torch.equal(ft_ckpt.read(name), base_ckpt.read(base_name)):
                    skipped[name] = f"{ft_info.dtype} tensor; only floating weights are extracted"
                else:
                    unchanged += 1
                continue
            module, role = roles[name]
            with device_errors(target, module=module):
                delta, base_norm = _difference(to_device, ft_ckpt.read(name), base_ckpt.read(base_name))
                if delta is None:
                    unchanged += 1
                elif pattern is not None and not pattern.search(module):
                    skipped[name] = "excluded by --modules"
                elif role in ("linear", "conv1d", "conv"):
                    lowrank, row = _decompose(module, role, delta, policy, exact_limit, base_norm)
                    layers[module] = lowrank.to(dtype=out_dtype, device=context.storage)
                    reports.append(row)
                elif role == "lora-bias":
                    skipped[name] = "bias of a module extracted as LoRA; a PEFT LoRA cannot carry it"
                elif keep_full:
                    full_modules.add(module)
                else:
                    skipped[name] = f"{'embedding' if role == 'embedding' else 'tensor'} changed; pass --keep-full " \
                                    "to keep it as modules_to_save"
                del delta
    to_device.close()
    full_weights = {
        n: ft_ckpt.read(n).to(out_dtype) if ft_ckpt.tensors[n].is_float else ft_ckpt.read(n)
        for n in ft_ckpt.tensors if roles.get(n, ("", ""))[0] in full_modules
    }
    ft_ckpt.release()
    base_ckpt.release()
    if not layers:
        detail = f" ({len(skipped)} changed tensor(s) skipped, e.g. {next(iter(skipped))})" if skipped else ""
        raise IncompatibleAdapters(
            f"{finetuned}: no linear or conv weight differs from {base} under the chosen modules, so there is "
            f"no LoRA to extract{detail}"
        )
    report = ExtractReport(reports, sorted(full_weights), skipped, unchanged, _policy_dict(policy, exact_limit))
    adapter = Adapter(
        layers,
        base_model=str(base_ckpt.config.get("_name_or_path") or base),
        task_type=_task_type(base_ckpt.config),
        source_format="peft",
        dtype=out_dtype,
        full_weights=full_weights,
    )
    report.seconds = time.perf_counter() - started
    with atomic_output(output, force=force) as tmp:
        get_format("peft").write(adapter, tmp, dtype=out_dtype)  # type: ignore[misc]
        recipe = {
            "tool": "loramerge",
            "command": "extract",
            "base": str(base),
            "finetuned": str(finetuned),
            "dtype": dtype_name(out_dtype),
            "modules": modules,
            "keep_full": keep_full,
            "report": report.to_dict(),
        }
        (tmp / RECIPE_NAME).write_text(json.dumps(recipe, indent=2) + "\n")
    return ExtractResult(Path(output), adapter, report)


def _open(source: str | Path, allow_pickle: bool) -> Checkpoint:
    try:
        return open_checkpoint(resolve_model(source), allow_pickle=allow_pickle)
    except LoramergeError as exc:
        exc.fill(path=str(source))
        raise


def _difference(to_device: HostToDevice, finetuned: torch.Tensor, base: torch.Tensor
                ) -> tuple[torch.Tensor | None, float]:
    """``(finetuned − base in float32 on the compute device, ‖base‖)``, or ``(None, ‖base‖)`` when they are equal.

    Each tensor crosses to the device in its stored dtype and is converted there.
    """
    delta = to_device(finetuned, torch.float32)
    base_tensor = to_device(base, torch.float32)
    delta -= base_tensor
    base_norm = float(torch.linalg.vector_norm(base_tensor))
    del base_tensor
    return (delta if bool(delta.any()) else None), base_norm


def _pair(base: Checkpoint, ft: Checkpoint) -> tuple[dict[str, str], dict[str, str]]:
    """Fine-tune tensor → base tensor, after checking every shape; refuses vocabulary changes."""
    tie = tied_embeddings(base.config, base.tensors)
    pairs: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name, info in ft.tensors.items():
        base_name = name
        if name not in base.tensors:
            if tie is not None and name == tie[1]:
                base_name = tie[0]  # the base stores lm_head as its tied input embedding
            else:
                skipped[name] = "not in the base model"
                continue
        base_info = base.tensors[base_name]
        if base_info.shape != info.shape:
            if is_input_embedding(name) or name == OUTPUT_EMBEDDING:
                raise IncompatibleAdapters(
                    f"{ft.folder}: vocabulary size differs: {name} is {tuple(info.shape)} but the base's "
                    f"{base_name} is {tuple(base_info.shape)}; resize the base model's embeddings "
                    "(resize_token_embeddings) to the fine-tune's vocabulary first"
                )
            raise IncompatibleAdapters(
                f"{ft.folder}: tensor {name} has shape {tuple(info.shape)} but the base's is {tuple(base_info.shape)}"
            )
        pairs[name] = base_name
    if not pairs:
        raise IncompatibleAdapters(f"{ft.folder} and {base.folder} have no tensor names in common")
    return pairs, skipped


def _roles(ft: Checkpoint, pairs: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Each tensor's (module, role): linear | conv1d | conv | embedding | lora-bias | full."""
    roles: dict[str, tuple[str, str]] = {}
    model_type = ft.config.get("model_type")
    for name in ft.tensors:
        info: TensorInfo = ft.tensors[name]
        module, _, param = name.rpartition(".")
        module = module or name
        role = "full"
        if param == "weight" and info.is_float:
            if len(info.shape) == 2 and is_input_embedding(name):
                role = "embedding"
            elif len(info.shape) == 2:
                leaf = module.rsplit(".", 1)[-1]
                role = "conv1d" if model_type in CONV1D_MODEL_TYPES and leaf in CONV1D_LEAVES else "linear"
            elif len(info.shape) in (3, 4, 5):
                role = "conv"
        roles[name] = (module, role)
    lora_modules = {m for m, r in roles.values() if r in ("linear", "conv1d", "conv")}
    for name, (module, role) in roles.items():
        if role == "full" and module in lora_modules:
            roles[name] = (module, "lora-bias")
    return roles


def _decompose(module: str, role: str, delta: torch.Tensor, policy: RankPolicy, exact_limit: int,
               base_norm: float) -> tuple[LowRank, ExtractedModule]:
    """Factor one module's ΔW under ``policy``; the error is measured on the factors."""
    stored_shape = tuple(delta.shape)
    if role == "conv1d":
        matrix = delta.T
        template = LowRank(delta.new_zeros(1, stored_shape[0]), delta.new_zeros(stored_shape[1], 1), fan_in_fan_out=True)
    elif role == "conv":
        matrix = delta.reshape(stored_shape[0], -1)
        template = LowRank(delta.new_zeros(1, *stored_shape[1:]),
                           delta.new_zeros(stored_shape[0], 1, *[1] * (len(stored_shape) - 2)), kind="conv")
    else:
        matrix = delta
        template = LowRank(delta.new_zeros(1, stored_shape[1]), delta.new_zeros(stored_shape[0], 1))
    total = float(torch.linalg.vector_norm(matrix)) ** 2
    full_rank = min(matrix.shape)
    S, factors, method = _svd(matrix, policy, total, exact_limit)
    B, A = factors
    residual = float(torch.linalg.vector_norm(torch.addmm(matrix, B, A, alpha=-1.0)))  # measured, not assumed
    error = residual / math.sqrt(total) if total else 0.0
    lowrank = template.from_matrices(B.contiguous(), A.contiguous())
    row = ExtractedModule(
        module=module, kind="conv" if role == "conv" else "linear", shape=stored_shape, rank=lowrank.rank,
        full_rank=full_rank, energy_kept=max(0.0, 1.0 - error * error), relative_error=error, svd=method,
        delta_norm=math.sqrt(total), relative_change=math.sqrt(total) / base_norm if base_norm else float("inf"),
        total=total, spectrum=host_spectrum(S[:_KEPT_SPECTRUM]).tolist(),
    )
    return lowrank, row


def _svd(matrix: torch.Tensor, policy: RankPolicy, total: float, exact_limit: int
         ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], str]:
    """(leading singular values, (B, A) factors of the chosen rank, "exact" | "randomized")."""
    full = min(matrix.shape)
    if full <= exact_limit or policy.needs_full_spectrum:
        svd = dense_svd(matrix)
        k = _choose(svd.S, total, policy, full)
        assert k is not None
        return svd.S, svd.factors(k), "exact"
    cap = min(full, policy.rank_max or full)
    sketch = min(cap, policy.rank) if policy.rank is not None else min(cap, 64)
    while True:
        svd = dense_svd(matrix, max_rank=sketch)
        exact = len(svd.S) >= full
        S = svd.S if exact else svd.S[:sketch]
        k = _choose(S, total, policy, full)
        if k is not None or sketch >= cap or exact:
            k = min(k or sketch, cap, len(S))
            return S, svd.factors(k), "exact" if exact else "randomized"
        sketch = min(cap, sketch * 2)


def _choose(S: torch.Tensor, total: float, policy: RankPolicy, full: int) -> int | None:
    """The rank the policy asks for, from singular values measured against the true ‖ΔW‖²; None if
    the computed values do not reach the energy or error target yet. Decided on the host (one copy)."""
    S = host_spectrum(S)
    if policy.rank is not None:
        k = policy.rank
    elif policy.sv_ratio is not None or policy.sv_cumulative is not None:
        if len(S) < full and not policy.reached(S, total, len(S)):
            return None
        k = policy.choose(S)
    else:
        if total == 0.0:
            return 1
        # A complete spectrum is measured against its own sum, so float32 rounding of the singular
        # values cannot make the last directions look like they carry nothing (or more than all).
        s2 = S.square()
        kept = torch.cumsum(s2, 0) / (float(s2.sum()) if len(S) >= full else total)
        reached = torch.nonzero(kept >= policy.target - 1e-12)
        if reached.numel() == 0:
            return None if len(S) < full else len(S)
        k = int(reached[0]) + 1
    if policy.rank_max is not None:
        k = min(k, policy.rank_max)
    # Directions below float32 noise carry nothing; don't store them.
    numerical = int((S[0] * full * torch.finfo(torch.float32).eps < S).sum()) if len(S) else 1
    return max(1, min(k, len(S), numerical))


def _task_type(config: dict[str, Any]) -> str | None:
    architectures = " ".join(config.get("architectures") or [])
    if "ForCausalLM" in architectures or "LMHeadModel" in architectures:
        return "CAUSAL_LM"
    if "ForSequenceClassification" in architectures:
        return "SEQ_CLS"
    if "ForTokenClassification" in architectures:
        return "TOKEN_CLS"
    return None


def _policy_dict(policy: RankPolicy, exact_limit: int) -> dict[str, Any]:
    return {**policy.as_dict(), "exact_limit": exact_limit}


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _rank(value: int | None, m: ExtractedModule) -> str:
    return str(value) if value is not None else f">{len(m.spectrum)}"
