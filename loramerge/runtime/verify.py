"""Checking a merge or a fold on the real model: :func:`verify`.

1. **Coverage.** Every module of every adapter is resolved onto the base model (the resolution
   ``fold`` uses); an unmatched module is an error. The base modules of the adapted kinds that
   no adapter touches are listed, and so are source modules that the merged adapter lacks.
2. **Equivalence.** The base model runs with the sources applied unmerged (forward hooks, the
   exact weighted sum, like PEFT's ``PeftModel``), and then with the merged adapter (also
   unmerged) or as the folded model, on the same inputs: prompts from a file, or seeded random
   token sequences. Compared per prompt on every real token: the largest logit difference
   relative to the largest reference logit, the mean KL divergence KL(reference ‖ candidate)
   and the agreement of the top-1 tokens.
3. **Blame.** When the largest relative error exceeds the tolerance, the modules (or, for a
   fold, the tensors) that differ most in weight space are tried one at a time: the reference is
   run with only that one module taken from the candidate, on the worst prompt, and the module
   whose swap alone comes closest to the whole difference is named.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from loramerge.core.adapter import Adapter
from loramerge.core.report import json_safe
from loramerge.errors import DataError, InvalidParameter
from loramerge.io.output import atomic_output
from loramerge.io.sources import load
from loramerge.runtime.data import read_prompts
from loramerge.runtime.encoding import row_ids
from loramerge.runtime.resident import AdapterLike, Runtime
from loramerge.runtime.scoring import forward_logits, pad_right

# The default tolerance is measured, not guessed: the error of the *correct* result stored in the
# candidate's dtype (the sources' exact sum rounded to it), times ROUNDING_MARGIN; never below the
# floor of that dtype, never above MAX_TOLERANCE (an error that large is not rounding).
ROUNDING_MARGIN = 4.0
TOLERANCE_FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
MAX_TOLERANCE = 0.5
CANDIDATES_TRIED = 8


@dataclass(frozen=True)
class Match:
    """One adapter module and the base weight it resolved to."""

    adapter: str
    module: str
    parameter: str
    kind: str
    shape: tuple[int, ...]
    transposed: bool


@dataclass
class Coverage:
    """Which base weights the adapters change, which they leave alone and what the merge dropped."""

    matches: list[Match]
    untouched: list[str]
    kinds: list[str]
    missing_in_merged: list[str] = field(default_factory=list)

    def table(self) -> str:
        """One line per adapter module: adapter, module, base weight, kind, shape."""
        rows = [["adapter", "module", "base weight", "kind", "shape"]]
        for m in self.matches:
            shape = "×".join(map(str, m.shape)) + (" (stored transposed)" if m.transposed else "")
            rows.append([m.adapter, m.module, m.parameter, m.kind, shape])
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)

    def summary(self) -> str:
        adapters = len({m.adapter for m in self.matches})
        weights = len({m.parameter for m in self.matches})
        lines = [f"coverage: {len(self.matches)} module(s) of {adapters} adapter(s) matched to {weights} base weight(s)"]
        if self.untouched:
            lines.append(f"untouched {'/'.join(self.kinds)} modules (no adapter changes them): "
                         f"{', '.join(group_names(self.untouched))}")
        if self.missing_in_merged:
            lines.append(f"the merged adapter lacks {len(self.missing_in_merged)} module(s) the sources have: "
                         f"{', '.join(self.missing_in_merged[:5])}{' ...' if len(self.missing_in_merged) > 5 else ''}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"matches": [m.__dict__ | {"shape": list(m.shape)} for m in self.matches],
                "untouched": self.untouched, "missing_in_merged": self.missing_in_merged}


def group_names(names: Sequence[str]) -> list[str]:
    """Module paths grouped by their shape with layer numbers as ``*``, with counts.

    Example:
        >>> group_names(["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj", "lm_head"])
        ['model.layers.*.mlp.up_proj ×2', 'lm_head']
    """
    counts: dict[str, int] = {}
    for name in names:
        pattern = re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)
        counts[pattern] = counts.get(pattern, 0) + 1
    return [p if n == 1 else f"{p} ×{n}" for p, n in counts.items()]


@dataclass(frozen=True)
class PromptResult:
    """The comparison on one input: its label, real tokens, and the three figures."""

    index: int
    label: str
    tokens: int
    max_relative_error: float
    mean_kl: float | None
    top1_agreement: float | None


@dataclass
class Verification:
    """The outcome of :func:`verify`; :attr:`passed` is the verdict."""

    candidate: str
    coverage: Coverage
    prompts: list[PromptResult]
    tolerance: float
    max_relative_error: float
    mean_kl: float | None
    top1_agreement: float | None
    culprit: str | None = None
    culprit_error: float | None = None
    tried: dict[str, float] = field(default_factory=dict)
    rounding: float | None = None

    @property
    def passed(self) -> bool:
        return self.max_relative_error <= self.tolerance

    @property
    def worst(self) -> PromptResult:
        return max(self.prompts, key=lambda p: p.max_relative_error)

    def summary(self) -> str:
        worst = self.worst
        lines = [
            f"{self.candidate} vs the unmerged adapters on {len(self.prompts)} input(s):",
            f"  overall: max relative logit error {self.max_relative_error:.3g}, mean KL {_g(self.mean_kl)}, "
            f"top-1 agreement {_pct(self.top1_agreement)}",
            f"  worst:   {worst.label}: max relative logit error {worst.max_relative_error:.3g}, "
            f"mean KL {_g(worst.mean_kl)}, top-1 agreement {_pct(worst.top1_agreement)}",
        ]
        verdict = "within" if self.passed else "ABOVE"
        measured = "" if self.rounding is None else f" (the exact result rounded to the stored dtype: {self.rounding:.3g})"
        lines.append(f"{verdict} tolerance {self.tolerance:.3g}{measured}")
        return "\n".join(lines)

    def failure(self) -> str:
        """The one-line explanation of a failed check."""
        message = (f"{self.candidate} differs from the unmerged adapters: max relative logit error "
                   f"{self.max_relative_error:.3g} > tolerance {self.tolerance:.3g}, worst on {self.worst.label}")
        if self.culprit is not None:
            message += f"; the difference comes from {self.culprit} (alone it gives {self.culprit_error:.3g})"
        return message

    def to_dict(self) -> dict[str, Any]:
        return json_safe({
            "candidate": self.candidate,
            "passed": self.passed,
            "tolerance": self.tolerance,
            "rounding": self.rounding,
            "overall": {"max_relative_error": self.max_relative_error, "mean_kl": self.mean_kl,
                        "top1_agreement": self.top1_agreement},
            "worst": self.worst.__dict__,
            "prompts": [p.__dict__ for p in self.prompts],
            "culprit": self.culprit,
            "culprit_error": self.culprit_error,
            "tried": self.tried,
            "coverage": self.coverage.to_dict(),
        })

    def write_json(self, path: str | Path, *, force: bool = True) -> Path:
        with atomic_output(path, force=force, directory=False) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return Path(path)


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def coverage(runtime: Runtime, sources: Sequence[Adapter], merged: Adapter | None = None) -> Coverage:
    """Resolve every module of ``sources`` (and ``merged``) onto the runtime's model; unmatched is an error."""
    matches: list[Match] = []
    labelled = [(a, a.source or f"adapter {i + 1}") for i, a in enumerate(sources)]
    if merged is not None:
        labelled.append((merged, merged.source or "merged"))
    for adapter, label in labelled:
        for module, placement in runtime.placements(adapter).items():
            matches.append(Match(label, module, placement.parameter, placement.kind, placement.shape,
                                 placement.transposed))
    kinds = sorted({m.kind for m in matches})
    touched = {m.parameter.removesuffix(".weight") for m in matches}
    untouched = [name for name, kind in runtime.adaptable_modules(kinds).items() if name not in touched]
    missing = []
    if merged is not None:
        have = set(merged.layers)
        missing = [m for m in dict.fromkeys(mod for a in sources for mod in a.layers) if m not in have]
    return Coverage(matches, untouched, kinds, missing)


@dataclass
class _Inputs:
    ids: list[torch.Tensor]
    labels: list[str]


def _inputs(runtime: Runtime, prompts: str | Path | None, samples: int, length: int, seed: int,
            limit: int | None) -> _Inputs:
    context = runtime.context_length()
    if prompts is not None:
        rows = read_prompts(prompts, limit=limit)
        ids, labels = [], []
        for row in rows:
            where = f"{prompts}: row {row.line}"
            tokens = row_ids(row, runtime.tokenizer, where)
            if context is not None and len(tokens) > context:
                raise DataError(f"{where}: {len(tokens)} tokens, longer than the model's context of {context} tokens")
            ids.append(torch.tensor(tokens, dtype=torch.long))
            text = " ".join(str(v) for v in row.data.values() if isinstance(v, str)) or str(row.data)
            labels.append(f"row {row.line} of {Path(prompts).name} ({text[:40]!r})")
        return _Inputs(ids, labels)
    if samples < 1 or length < 2:
        raise InvalidParameter(f"random inputs need at least 1 sample of 2 tokens, got {samples} of {length}")
    vocab = _vocab_size(runtime)
    length = min(length, context) if context else length
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, vocab, (length,), generator=g) for _ in range(samples)]
    return _Inputs(ids, [f"random sequence {i} (seed {seed})" for i in range(samples)])


def _vocab_size(runtime: Runtime) -> int:
    for holder in (runtime.config, runtime.config.get("text_config") or {}):
        if isinstance(holder.get("vocab_size"), int):
            return int(holder["vocab_size"])
    embeddings = getattr(runtime.model, "get_input_embeddings", lambda: None)()
    if embeddings is not None:
        return int(embeddings.num_embeddings)
    raise InvalidParameter("the model declares no vocabulary size; give --prompts")


def _outputs(runtime: Runtime, inputs: _Inputs, batch_size: int, only: Sequence[int] | None = None,
             desc: str | None = None, progress: bool = False) -> dict[int, torch.Tensor]:
    """Output scores (float32, on the CPU) of each selected input, real tokens only."""
    chosen = list(range(len(inputs.ids))) if only is None else list(only)
    out: dict[int, torch.Tensor] = {}
    groups = [chosen[i:i + batch_size] for i in range(0, len(chosen), batch_size)]
    with torch.inference_mode():
        for group in tqdm(groups, desc=desc, unit="batch", disable=True if not progress else None, leave=False):
            ids, mask = pad_right([inputs.ids[i] for i in group])
            logits = forward_logits(runtime.model, ids.to(runtime.device), mask.to(runtime.device), runtime.kind)
            for row, i in enumerate(group):
                out[i] = logits[row, :len(inputs.ids[i])].float().cpu()
    return out


def _compare(reference: torch.Tensor, candidate: torch.Tensor, distributions: bool
             ) -> tuple[float, torch.Tensor | None, torch.Tensor | None]:
    """(max relative error, KL per position, top-1 agreement per position)."""
    scale = reference.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    relative = float((candidate - reference).abs().max() / scale)
    if not math.isfinite(relative):
        relative = math.inf
    if not distributions:
        return relative, None, None
    log_p = reference.double().log_softmax(-1)
    log_q = candidate.double().log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    agree = reference.argmax(-1) == candidate.argmax(-1)
    return relative, kl, agree


def verify(
    base: str | Path | Runtime,
    adapters: AdapterLike | Sequence[AdapterLike],
    *,
    weights: Sequence[float] | None = None,
    merged: AdapterLike | None = None,
    folded: str | Path | None = None,
    prompts: str | Path | None = None,
    limit: int | None = None,
    samples: int = 8,
    length: int = 32,
    seed: int = 0,
    tolerance: float | None = None,
    batch_size: int = 8,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    locate: bool = True,
    allow_pickle: bool = False,
    progress: bool = False,
) -> Verification:
    """Check that ``merged`` (an adapter) or ``folded`` (a model folder) does what the unmerged
    weighted sum of ``adapters`` does on the base model ``base``.

    Inputs are the rows of ``prompts`` (JSONL evaluation rows or plain text lines, at most
    ``limit``), or ``samples`` seeded random sequences of ``length`` tokens. ``tolerance`` bounds
    the max relative logit error; its default passes the rounding of the stored dtype (the folded
    model's, or the base's for a merged adapter). See the module docstring for the figures.
    """
    if (merged is None) == (folded is None):
        raise InvalidParameter("give exactly one of a merged adapter (--merged) or a folded model (--folded)")
    runtime = base if isinstance(base, Runtime) else Runtime.load(base, device=device, dtype=dtype, mode="hooks",
                                                                   allow_pickle=allow_pickle)
    listed = [adapters] if isinstance(adapters, (Adapter, str, Path)) else list(adapters)
    sources = [a if isinstance(a, Adapter) else load(a) for a in listed]
    if weights is not None and len(weights) != len(sources):
        raise InvalidParameter(f"got {len(weights)} weight(s) for {len(sources)} adapter(s); give one weight per adapter")
    weight_list = [float(w) for w in weights] if weights is not None else [1.0] * len(sources)
    candidate_adapter = None if merged is None else (merged if isinstance(merged, Adapter) else load(merged))
    cover = coverage(runtime, sources, candidate_adapter)
    inputs = _inputs(runtime, prompts, samples, length, seed, limit)
    distributions = runtime.kind in ("causal", "seq2seq") or runtime.kind is None

    runtime.apply(sources, weight_list, mode="hooks")
    reference = _outputs(runtime, inputs, batch_size, desc="unmerged", progress=progress)
    folded_runtime = None
    if candidate_adapter is not None:
        runtime.apply(candidate_adapter, mode="hooks")
        candidate = _outputs(runtime, inputs, batch_size, desc="merged", progress=progress)
        label = f"merged adapter {candidate_adapter.source or ''}".rstrip()
        stored = candidate_adapter.dtype or runtime.dtype
    else:
        runtime.restore()
        folded_runtime = Runtime.load(folded, device=runtime.device, dtype=dtype, allow_pickle=allow_pickle)  # type: ignore[arg-type]
        candidate = _outputs(folded_runtime, inputs, batch_size, desc="folded", progress=progress)
        label = f"folded model {folded}"
        stored = folded_runtime.dtype
    rounding = None
    if tolerance is None:
        rounding = _rounding_error(runtime, sources, weight_list, stored, inputs, batch_size, reference,
                                   folded=folded_runtime is not None)
        floor = TOLERANCE_FLOOR.get(_lowest_precision(stored, runtime.dtype), 1e-5)
        limit_value = min(max(ROUNDING_MARGIN * (rounding or 0.0), floor), MAX_TOLERANCE)
    else:
        limit_value = float(tolerance)
    runtime.restore()

    results: list[PromptResult] = []
    kls, agrees = [], []
    for i in range(len(inputs.ids)):
        relative, kl, agree = _compare(reference[i], candidate[i], distributions)
        if kl is not None and agree is not None:
            kls.append(kl)
            agrees.append(agree)
        results.append(PromptResult(i, inputs.labels[i], len(inputs.ids[i]), relative,
                                    float(kl.mean()) if kl is not None else None,
                                    float(agree.double().mean()) if agree is not None else None))
    overall_kl = float(torch.cat(kls).mean()) if kls else None
    overall_top1 = float(torch.cat(agrees).double().mean()) if agrees else None
    outcome = Verification(label, cover, results, limit_value, max(r.max_relative_error for r in results),
                           overall_kl, overall_top1, rounding=rounding)
    if not outcome.passed and locate:
        worst = outcome.worst.index
        if candidate_adapter is not None:
            tried = _blame_modules(runtime, sources, weight_list, candidate_adapter, inputs, worst, reference[worst])
        else:
            assert folded_runtime is not None
            tried = _blame_tensors(runtime, folded_runtime, sources, weight_list, inputs, worst, reference[worst])
        outcome.tried = tried
        if tried:
            outcome.culprit, outcome.culprit_error = max(tried.items(), key=lambda kv: kv[1])
    runtime.restore()
    return outcome


def _rounding_error(runtime: Runtime, sources: list[Adapter], weights: list[float], stored: torch.dtype,
                    inputs: _Inputs, batch_size: int, reference: dict[int, torch.Tensor], *, folded: bool) -> float | None:
    """The max relative error of the correct result rounded to ``stored``: the sources patched into the
    weights (a fold), or their factors rounded to ``stored`` (a merged adapter). None when the base's
    own dtype cannot stand for the folded model's."""
    if folded:
        if stored != runtime.dtype:
            return None
        runtime.apply(sources, weights, mode="patch")
    else:
        rounded = [a.with_layers({k: lr.to(dtype=stored) for k, lr in a.layers.items()}) for a in sources]
        runtime.apply(rounded, weights, mode="hooks")
    outputs = _outputs(runtime, inputs, batch_size)
    runtime.restore()
    return max(_relative_error(reference[i], outputs[i]) for i in outputs)


def _lowest_precision(*dtypes: torch.dtype) -> torch.dtype:
    order = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    known = [d for d in dtypes if d in order]
    return min(known, key=order.index) if known else torch.float32


def _relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return _compare(reference, candidate, False)[0]


def _blame_modules(runtime: Runtime, sources: list[Adapter], weights: list[float], merged: Adapter,
                   inputs: _Inputs, worst: int, reference: torch.Tensor) -> dict[str, float]:
    """Swap one module at a time from the unmerged sum to the merged adapter, largest weight-space gaps first."""
    gaps: dict[str, float] = {}
    device = runtime.device
    for module in dict.fromkeys([*(m for a in sources for m in a.layers), *merged.layers]):
        expected = sum((w * a.layers[module].product(device=device) for a, w in zip(sources, weights)
                        if module in a.layers), start=torch.zeros((), device=device))
        got = merged.layers[module].product(device=device) if module in merged.layers else torch.zeros((), device=device)
        gap = float((got - expected).norm())
        gaps[module] = gap / max(float(expected.norm()) if isinstance(expected, torch.Tensor) else 0.0, 1e-30)
    tried: dict[str, float] = {}
    for module in sorted(gaps, key=gaps.get, reverse=True)[:CANDIDATES_TRIED]:  # type: ignore[arg-type]
        if gaps[module] == 0.0:
            break
        rest = [a.with_layers({k: v for k, v in a.layers.items() if k != module}) for a in sources]
        one = merged.with_layers({module: merged.layers[module]} if module in merged.layers else {})
        runtime.apply([*rest, one], [*weights, 1.0], mode="hooks")
        output = _outputs(runtime, inputs, 1, only=[worst])[worst]
        tried[module] = _relative_error(reference, output)
    runtime.restore()
    return tried


def _blame_tensors(runtime: Runtime, folded: Runtime, sources: list[Adapter], weights: list[float],
                   inputs: _Inputs, worst: int, reference: torch.Tensor) -> dict[str, float]:
    """Put one folded tensor at a time into the unmerged model, largest gaps to the expected fold first."""
    runtime.apply(sources, weights, mode="patch")
    gaps: dict[str, float] = {}
    for name in runtime.parameter_names:
        if name not in folded.parameter_names:
            continue
        expected, got = runtime.parameter(name), folded.parameter(name)
        if expected.shape != got.shape:
            gaps[name] = math.inf
            continue
        difference = float((got.float() - expected.float()).norm())
        gaps[name] = difference / max(float(expected.float().norm()), 1e-30)
    placements = {p.parameter: module for a in sources for module, p in runtime.placements(a).items()}
    tried: dict[str, float] = {}
    for name in sorted(gaps, key=gaps.get, reverse=True)[:CANDIDATES_TRIED]:  # type: ignore[arg-type]
        if gaps[name] == 0.0 or folded.parameter(name).shape != runtime.parameter(name).shape:
            continue
        module = placements.get(name)
        rest = [a.with_layers({k: v for k, v in a.layers.items() if k != module}) for a in sources]
        runtime.apply(rest, weights, mode="hooks")
        runtime.set_parameter(name, folded.parameter(name).detach())
        output = _outputs(runtime, inputs, 1, only=[worst])[worst]
        tried[name] = _relative_error(reference, output)
    runtime.restore()
    return tried
