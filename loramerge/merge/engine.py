"""The merge engine: plan the sources, run the method module by module, apply the rank policy.

Memory stays bounded because only one module's factors (and, for per-entry methods, its dense
updates) live on the compute device at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from loramerge.core.adapter import Adapter, LowRank
from loramerge.core.devices import device_errors, execution_context, parse_dtype
from loramerge.core.linalg import factored_svd
from loramerge.core.rank import RankPolicy, spectrum_stats, truncate_dense
from loramerge.core.report import MergeReport, ModuleReport
from loramerge.errors import InvalidParameter, NonFiniteValues
from loramerge.io.sources import load
from loramerge.merge.blocks import BlockWeighting, weigh_blocks
from loramerge.merge.methods import MergeMethod, MethodOutput, ModuleInputs, get_method, module_seed
from loramerge.merge.overrides import Overrides, module_settings
from loramerge.merge.plan import MergePlan, plan_merge
from loramerge.merge.statistics import InputStatistics

DEFAULT_SEED = 0
# Dense methods hold every source's full update of a module at once; above this many bytes per
# module they run one module at a time (with multi-threaded ops) rather than on the thread pool.
DENSE_PARALLEL_LIMIT = 64 * 2**20
T = TypeVar("T")


def merge(
    adapters: Sequence[Adapter | str | Path],
    method: str = "linear",
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    *,
    energy: float | None = None,
    max_error: float | None = None,
    rank_max: int | None = None,
    sv_ratio: float | None = None,
    sv_cumulative: float | None = None,
    sv_fro: float | None = None,
    seed: int = DEFAULT_SEED,
    device: str | torch.device = "auto",
    dtype: torch.dtype | str | None = None,
    compute_dtype: torch.dtype | str = torch.float32,
    ignore_base_mismatch: bool = False,
    progress: bool = False,
    overrides: Overrides | None = None,
    block_weights: BlockWeighting | str | Sequence[str] | None = None,
    statistics: InputStatistics | None = None,
    **params: Any,
) -> Adapter:
    """Merge LoRA adapters into one adapter.

    ``adapters`` are :class:`Adapter` objects or paths. ``weights`` (default 1 each, negative
    allowed) multiply each source's update. ``method`` is a registered name (see
    ``loramerge methods``); ``params`` are its parameters. The rank policy is ``rank``, ``energy``,
    ``max_error``, ``sv_ratio``, ``sv_cumulative`` or ``sv_fro`` (= ``energy`` sv_fro²; see
    :class:`~loramerge.core.rank.RankPolicy`) with an optional ``rank_max`` cap. The result carries a per-module
    :class:`~loramerge.core.report.MergeReport` in ``.report``. ``overrides(module)`` may return
    per-module parameters, ``weights`` and rank-policy keys (see :mod:`loramerge.merge.overrides`).
    ``block_weights`` scales each source's modules by block before the merge, as the LoRA Block
    Weight extension does (``"OUTALL"``, ``"2:INS"``, ``"double_blocks.0-9=0.5"``; see
    :mod:`loramerge.merge.blocks`).
    A data-aware method (``regmean``) needs ``statistics``, the sources' input Grams; the
    facade :func:`loramerge.merge` collects them from a model and data.

    Example:
        >>> import torch
        >>> from loramerge import Adapter, LowRank, merge
        >>> g = torch.Generator().manual_seed(0)
        >>> a = Adapter({"fc": LowRank(torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g))})
        >>> b = Adapter({"fc": LowRank(torch.randn(3, 6, generator=g), torch.randn(5, 3, generator=g))})
        >>> m = merge([a, b], weights=[0.7, 0.3])
        >>> m["fc"].rank, bool(torch.allclose(m.delta("fc"), 0.7 * a.delta("fc") + 0.3 * b.delta("fc"), atol=1e-6))
        (5, True)
        >>> merge([a, b], method="svd", rank=2)["fc"].rank
        2
    """
    spec = get_method(method)
    given = spec.resolve(params)
    # Everything that can be checked without the sources is checked before any is loaded (or
    # downloaded): the device, the dtypes, the weights and the rank policy.
    context = execution_context(device, compute_dtype)
    adapters = list(adapters)
    requested_dtype = parse_dtype(dtype)
    policy = RankPolicy.from_options(rank=rank, energy=energy, max_error=max_error, sv_ratio=sv_ratio,
                                     sv_cumulative=sv_cumulative, sv_fro=sv_fro, rank_max=rank_max)
    if not spec.accepts_rank and not policy.is_exact:
        raise InvalidParameter(f"method {spec.name!r} keeps rank Σ rᵢ and takes no rank option; use 'linear' or 'svd'",
                               parameter="rank")
    if not adapters:
        raise InvalidParameter("no sources to merge")
    spec.check_source_count(len(adapters))
    if spec.needs_statistics:
        if statistics is None:
            raise InvalidParameter(
                f"method {spec.name!r} needs data: give the base model and one data file per source "
                "(--model BASE --data a.jsonl --data b.jsonl; in Python, model= and data=)", parameter="statistics"
            )
        statistics.check_sources(len(adapters), spec.name)
    weight_list = _check_weights(weights, len(adapters))
    weighting = BlockWeighting.parse(block_weights, sources=len(adapters))
    sources = weigh_blocks([load(a) for a in adapters], weighting)
    resolved = spec.resolve(params, sources=len(sources))
    plan = plan_merge(sources, ignore_base_mismatch=ignore_base_mismatch)
    compute = context.compute_dtype
    out_dtype = requested_dtype or _common_dtype(sources)
    target = context.device_for(spec.uses_accelerator)

    started = time.perf_counter()

    def merge_module(module: str) -> tuple[LowRank, ModuleReport]:
        with device_errors(target, module=module):
            row = plan.terms[module]
            module_params, module_weights, module_policy = resolved, weight_list, policy
            if overrides is not None:
                s = module_settings(spec, params, weight_list, policy, overrides(module), module)
                module_params, module_weights, module_policy = s.params, s.weights, s.policy
            inputs = ModuleInputs(
                module=module,
                terms=[t.to(dtype=compute, device=target) if t is not None else None for t in row],
                weights=module_weights,
                seed=module_seed(seed, module),
                statistics=None if statistics is None or not spec.needs_statistics else [
                    g.to(device=target) if g is not None else None for g in statistics.for_module(module)],
            )
            lowrank, module_report = finalize(spec.function(inputs, **module_params), inputs, spec, module_policy)
            return lowrank.to(dtype=out_dtype, device=context.storage), module_report

    layers: dict[str, LowRank] = {}
    reports: list[ModuleReport] = []
    results = map_modules(merge_module, plan.modules, target, parallel=not (spec.dense and _largest_dense(plan) > DENSE_PARALLEL_LIMIT))
    # The bar is closed (and its line cleared) when a module fails, so the error is the only line
    # left; without a terminal there is no bar.
    with tqdm(total=len(plan.modules), desc=f"merge ({spec.name})", unit="module",
              disable=None if progress else True, leave=False) as bar:
        for module, (lowrank, module_report) in zip(plan.modules, results):
            layers[module] = lowrank
            reports.append(module_report)
            bar.update(1)

    report = MergeReport(
        method=spec.name,
        weights=weight_list,
        parameters={**{p.key: _plain(given[p.name]) for p in spec.params}, **policy.as_dict(), "seed": seed,
                    **_block_weights_record(sources)},
        modules=reports,
        sources=[s.source or f"source {i + 1}" for i, s in enumerate(sources)],
        origins=[dict(s.origin) for s in sources],
        seconds=time.perf_counter() - started,
    )
    return Adapter(
        layers,
        base_model=plan.base_model,
        task_type=plan.task_type,
        source_format=sources[0].source_format,
        dtype=out_dtype,
        source=None,
        config={"architectures": plan.architectures} if plan.architectures else {},
        report=report,
    )


def map_modules(work: Callable[[str], T], modules: Sequence[str], device: torch.device, *,
                parallel: bool = True) -> Iterator[T]:
    """``work`` applied to every module, in order.

    On the CPU, modules run on a small thread pool with single-threaded torch ops: a LoRA module's
    linear algebra is too small to keep several threads busy, while independent modules are not,
    and each module's result no longer depends on the machine's thread count. On an accelerator
    modules run one after another, and so do methods that build dense per-module updates
    (``parallel=False``), whose memory would otherwise multiply by the number of workers.
    """
    workers = min(torch.get_num_threads(), len(modules)) if device.type == "cpu" and parallel else 1
    if workers <= 1:
        yield from map(work, modules)
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loramerge") as pool:
            yield from pool.map(work, modules)
    finally:
        torch.set_num_threads(previous)


def finalize(result: LowRank | torch.Tensor | MethodOutput, inputs: ModuleInputs, spec: MergeMethod,
             policy: RankPolicy) -> tuple[LowRank, ModuleReport]:
    """Turn one module's method result into a LoRA under the rank policy, with its report row."""
    stats: dict[str, float] = {}
    if isinstance(result, MethodOutput):
        stats = dict(result.stats)
        result = result.delta
    source_ranks = [t.rank if t is not None else None for t in inputs.terms]
    max_rank = max(r for r in source_ranks if r is not None)
    effective = policy if spec.default_rank == "exact" else policy.with_default_rank(max_rank)
    template = inputs.template

    if isinstance(result, LowRank):
        if effective.is_exact:
            lowrank, energy, error = result.baked(), 1.0, 0.0
        else:
            B, A = result.matrices(result.dtype)
            svd = factored_svd(B if result.scale == 1.0 else B * result.scale, A)
            k = effective.choose(svd.S)
            energy, error = spectrum_stats(svd.S, k)
            lowrank = template.from_matrices(*svd.factors(k))
    else:
        lowrank, energy, error = rerank_dense(result, template, effective, seed=inputs.seed)
    _check_finite_result(lowrank, inputs.module)
    report = ModuleReport(
        module=inputs.module, source_ranks=source_ranks, output_rank=lowrank.rank,
        energy_kept=energy, relative_error=error, extra=stats,
    )
    return lowrank, report


def rerank_dense(delta: torch.Tensor, template: LowRank, policy: RankPolicy,
                 seed: int = 0) -> tuple[LowRank, float, float]:
    """Factor a dense ``(out, in·k)`` update under ``policy``; energy and error are measured, not assumed.

    See :func:`~loramerge.core.rank.truncate_dense`: a randomized SVD (seeded by ``seed``) for ranks
    well below min(m, n), an exact one otherwise. An empty policy keeps the numerical rank
    (error ≤ 1e-6).
    """
    t = truncate_dense(delta, policy, seed=seed)
    return template.from_matrices(t.B, t.A), t.energy_kept, t.relative_error


def _largest_dense(plan: MergePlan) -> int:
    """Bytes of float32 dense updates one module of ``plan`` needs (all its sources at once)."""
    largest = 0
    for row in plan.terms.values():
        present = [t for t in row if t is not None]
        out_f, in_f = present[0].matrix_shape
        largest = max(largest, 4 * out_f * in_f * len(row))
    return largest


def _check_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0] * count
    values = [float(w) for w in weights]
    if len(values) != count:
        raise InvalidParameter(f"got {len(values)} weight(s) for {count} source(s); give one weight per source",
                               parameter="weights")
    if not all(math.isfinite(w) for w in values):
        raise NonFiniteValues(f"weights must be finite, got {values}", parameter="weights")
    return values


def _common_dtype(sources: Sequence[Adapter]) -> torch.dtype:
    dtypes = {s.dtype for s in sources if s.dtype is not None}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _block_weights_record(sources: Sequence[Adapter]) -> dict[str, Any]:
    """``{"block_weights": [each source's weighting or None]}`` when a source was weighted by block."""
    recorded = [s.config.get("block_weights") for s in sources]
    return {"block_weights": recorded} if any(r is not None for r in recorded) else {}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _check_finite_result(lowrank: LowRank, module: str) -> None:
    # A finite sum proves every entry finite; only an overflowing sum needs the full check.
    if all(bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all()) for t in (lowrank.A, lowrank.B)):
        return
    raise NonFiniteValues(f"module {module}: the merge produced NaN/Inf values", module=module)
