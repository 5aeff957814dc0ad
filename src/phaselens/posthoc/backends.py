"""Where checkpoint tasks run: in this process, in local worker processes, or on Ray.

A backend takes (run path, [(step, probes)]) and yields `TaskResult`s as they finish; it
never touches the store.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Callable, Iterator, Sequence

from phaselens.errors import PhaselensError
from phaselens.posthoc.runner import TaskResult, measure_checkpoint

Tasks = list[tuple[int, list[str]]]


def _one_thread() -> None:
    """Worker initialiser: one torch thread per process, so N workers share N cores without thrashing."""
    import torch

    torch.set_num_threads(1)


def _context():
    """fork (workers start at once, torch already imported) unless CUDA is live, which fork would break."""
    import torch

    if "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def local(run_path: str, tasks: Tasks, workers: int = 1, address: str | None = None) -> Iterator[TaskResult]:
    """Sequential in this process (workers <= 1), or a pool of `workers` spawned processes."""
    if workers <= 1:
        for step, probes in tasks:
            yield measure_checkpoint(run_path, step, probes)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=_context(), initializer=_one_thread) as pool:
        futures = [pool.submit(measure_checkpoint, run_path, step, probes) for step, probes in tasks]
        for future in as_completed(futures):
            yield future.result()


def ray_map(function: Callable[..., Any], calls: Sequence[tuple], workers: int = 1, address: str | None = None) -> Iterator[Any]:
    """`function(*args)` for each of `calls` as one-CPU Ray tasks, yielded as they finish.

    Connects to `address`, or starts a local cluster of `workers` CPUs (and shuts down what it started).
    """
    try:
        import ray
    except ImportError:
        raise PhaselensError("--backend ray needs Ray: pip install 'phaselens[ray]' (or pip install 'ray[default]')") from None
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False)
        started = True
    try:
        remote = ray.remote(num_cpus=1)(function)
        pending = [remote.remote(*args) for args in calls]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        if started:
            ray.shutdown()


def ray_backend(run_path: str, tasks: Tasks, workers: int = 1, address: str | None = None) -> Iterator[TaskResult]:
    """One Ray task per checkpoint; connects to `address` or starts a local cluster of `workers` CPUs."""
    yield from ray_map(_ray_measure, [(run_path, step, probes) for step, probes in tasks], workers, address)


def _ray_measure(run_path: str, step: int, probes: list[str]) -> TaskResult:
    _one_thread()
    return measure_checkpoint(run_path, step, probes)


BACKENDS: dict[str, Callable[..., Iterator[TaskResult]]] = {"local": local, "ray": ray_backend}


def get_backend(name: str) -> Callable[..., Iterator[TaskResult]]:
    if name not in BACKENDS:
        raise PhaselensError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]
