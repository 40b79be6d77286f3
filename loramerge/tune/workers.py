"""Where trials run: in this process, in worker processes, or on Ray actors.

Every pool keeps one :class:`~loramerge.tune.evaluator.TrialEvaluator` (a resident base model,
the sources loaded once) per worker for the whole search, and answers :meth:`map` with the
outcomes in the order of the jobs, so results never depend on which worker finished first.

- :class:`LocalPool`: one evaluator in this process.
- :class:`ProcessPool`: ``N`` processes (spawned, so CUDA works in them), one per GPU round-robin
  when there are several, each with its own model; on the CPU the cores are split between them.
  Workers ignore Ctrl-C, so an interrupted search can still score its best candidate on them.
- :class:`RayPool`: ``N`` Ray actors on an existing cluster (``ray.init(address=...)``), each
  holding its own evaluator; the base model and the sources must be reachable from every node
  (a shared file system or Hub ids). Ray is the optional extra ``loramerge[ray]``.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import socket
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import Any, Protocol

import torch

from loramerge.errors import InvalidParameter, MissingDependency
from loramerge.runtime.data import Task
from loramerge.runtime.resident import Runtime
from loramerge.tune.evaluator import EvaluatorSpec, Outcome, TrialEvaluator
from loramerge.tune.space import Candidate

Job = tuple[Candidate | None, str]
RAY_HINT = 'pip install "loramerge[ray]"'


class Pool(Protocol):
    size: int
    description: str

    def map(self, jobs: Sequence[Job]) -> list[Outcome]: ...

    def close(self) -> None: ...


def portable(spec: EvaluatorSpec) -> EvaluatorSpec:
    """``spec`` without per-process caches (the tasks' tokenizations), to send to another process."""
    tasks = {split: [Task(t.name, t.rows, t.source) for t in ts] for split, ts in spec.tasks.items()}
    return replace(spec, tasks=tasks)


class LocalPool:
    """One evaluator in this process (``runtime`` reuses a model already in memory)."""

    def __init__(self, spec: EvaluatorSpec, runtime: Runtime | None = None) -> None:
        self.evaluator = TrialEvaluator(spec, runtime)
        self.size = 1
        self.description = f"1 worker in this process ({self.evaluator.runtime.device})"

    def map(self, jobs: Sequence[Job]) -> list[Outcome]:
        return [self.evaluator.evaluate(candidate, split) for candidate, split in jobs]

    def close(self) -> None:
        self.evaluator.runtime.restore()


# ---------------------------------------------------------------------------------------- processes

_WORKER: dict[str, Any] = {}


def _start_worker(spec: EvaluatorSpec, counter: Any, devices: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides what an interruption means
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    _WORKER["spec"] = replace(spec, device=devices[index % len(devices)]) if devices else spec


def _evaluator() -> TrialEvaluator:
    # Built by the worker's first job rather than by the initializer, so that a model that fails to
    # load raises its own error in the main process instead of breaking the pool.
    if "evaluator" not in _WORKER:
        _WORKER["evaluator"] = TrialEvaluator(_WORKER["spec"])
    return _WORKER["evaluator"]


def _run_job(candidate: Candidate | None, split: str) -> Outcome:
    return _evaluator().evaluate(candidate, split)


def _load_model(_: int) -> int:
    _evaluator()
    return os.getpid()


class ProcessPool:
    """``workers`` processes, each with its own resident model (see the module docstring)."""

    def __init__(self, spec: EvaluatorSpec, workers: int) -> None:
        if spec.base is None:
            raise InvalidParameter("worker processes load the base model themselves: give it as a folder or Hub id, "
                                   "not as a model object")
        devices = _worker_devices(spec.device)
        threads = spec.threads
        if threads is None and not any(d.startswith("cuda") for d in devices):
            threads = max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context("spawn")
        counter = context.Value("i", 0)
        self._executor = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_start_worker,
                                             initargs=(portable(replace(spec, threads=threads)), counter, devices))
        self.size = workers
        where = ", ".join(sorted(set(devices))) if devices else f"cpu, {threads} thread(s) each"
        self.description = f"{workers} worker processes ({where})"
        try:  # start every worker now, so a model that fails to load fails here, once
            list(self._executor.map(_load_model, range(workers)))
        except BaseException:
            self.close()
            raise

    def map(self, jobs: Sequence[Job]) -> list[Outcome]:
        futures = [self._executor.submit(_run_job, candidate, split) for candidate, split in jobs]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _worker_devices(device: str | torch.device) -> list[str]:
    """One entry per GPU when the device is ``auto``/``cuda`` and there are GPUs; else empty (the spec's device)."""
    name = str(device)
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return []


# ---------------------------------------------------------------------------------------- Ray


def require_ray() -> Any:
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise MissingDependency(f"--ray needs ray, which is not installed; install it with: {RAY_HINT}") from None


def check_address(address: str, timeout: float = 3.0) -> None:
    """Refuse, in one line, a Ray address whose host and port do not answer (``auto``/``local`` are not probed).

    Example:
        >>> check_address("127.0.0.1:1")
        Traceback (most recent call last):
        ...
        loramerge.errors.InvalidParameter: --ray 127.0.0.1:1: no Ray cluster answers there (Connection refused); start one with `ray start --head` or give the address it prints
    """
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidParameter(f"--ray {address}: give the cluster's address as HOST:PORT (e.g. 10.0.0.5:6379)",
                               parameter="ray")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InvalidParameter(f"--ray {address}: no Ray cluster answers there ({reason}); start one with "
                               "`ray start --head` or give the address it prints", parameter="ray") from None


class RayPool:
    """``workers`` Ray actors on the cluster at ``address``, each with its own resident evaluator.

    An address of ``local`` starts a private single-machine Ray instance; when this process is
    already connected to Ray (``ray.init`` was called), that connection is used.
    """

    def __init__(self, spec: EvaluatorSpec, address: str, workers: int) -> None:
        if spec.base is None:
            raise InvalidParameter("Ray actors load the base model themselves: give it as a folder or Hub id")
        check_address(address)
        ray = require_ray()
        self._ray = ray
        self._owns = not ray.is_initialized()
        if self._owns:
            try:
                ray.init(address=None if address == "local" else address, include_dashboard=False,
                         log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise InvalidParameter(f"--ray {address}: could not connect ({str(exc).splitlines()[0]})",
                                       parameter="ray") from None
        gpus = int(ray.cluster_resources().get("GPU", 0))
        options = {"num_gpus": 1} if gpus >= 1 else {"num_cpus": 1}
        actor = ray.remote(**options)(_RayEvaluator)
        sent = portable(spec)
        self._actors = [actor.remote(replace(sent, device="cuda" if gpus else "cpu")) for _ in range(workers)]
        self.size = workers
        self.description = f"{workers} Ray actor(s) at {address} ({'1 GPU' if gpus else '1 CPU'} each)"
        try:
            ray.get([a.ready.remote() for a in self._actors])
        except Exception as exc:
            self.close()
            cause = getattr(exc, "cause", None) or exc
            raise InvalidParameter(f"--ray {address}: a worker failed to start: {str(cause).splitlines()[-1]}",
                                   parameter="ray") from None

    def map(self, jobs: Sequence[Job]) -> list[Outcome]:
        refs = [self._actors[i % self.size].evaluate.remote(candidate, split)
                for i, (candidate, split) in enumerate(jobs)]
        return list(self._ray.get(refs))

    def close(self) -> None:
        for a in getattr(self, "_actors", []):
            self._ray.kill(a)
        self._actors = []
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()


class _RayEvaluator:
    """The Ray actor: a :class:`TrialEvaluator` built on the node it runs on."""

    def __init__(self, spec: EvaluatorSpec) -> None:
        self.evaluator = TrialEvaluator(spec)

    def ready(self) -> bool:
        return True

    def evaluate(self, candidate: Candidate | None, split: str) -> Outcome:
        return self.evaluator.evaluate(candidate, split)


def make_pool(spec: EvaluatorSpec, *, workers: int = 1, ray: str | None = None,
              runtime: Runtime | None = None) -> Pool:
    """The pool for ``workers`` and ``ray`` (see the module docstring)."""
    if workers < 1:
        raise InvalidParameter(f"--workers must be at least 1, got {workers}", parameter="workers")
    if ray:
        return RayPool(spec, ray, workers)
    if workers == 1:
        return LocalPool(spec, runtime)
    return ProcessPool(spec, workers)
