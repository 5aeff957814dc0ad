"""Where independent tasks run: in this process, in local worker processes, or on Ray.

A backend maps a function over argument tuples and yields the results as they finish, so
probe sweeps (a task per checkpoint) and training sweeps (a task per run) share it. Every
worker computes with one torch thread: N workers share N cores without thrashing.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Callable, Iterator, Sequence

from phaselens.errors import ConfigError, PhaselensError


def _one_thread() -> None:
    """Worker initialiser: one torch thread per process."""
    import torch

    torch.set_num_threads(1)


def _context():
    """fork (workers start at once, torch already imported) unless CUDA is live, which fork would break."""
    import torch

    if "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def local_map(function: Callable[..., Any], calls: Sequence[tuple], workers: int = 1, address: str | None = None) -> Iterator[Any]:
    """`function(*args)` for each of `calls`: in order in this process (workers <= 1), or in a pool of `workers` processes."""
    if workers <= 1:
        for args in calls:
            yield function(*args)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=_context(), initializer=_one_thread) as pool:
        for future in as_completed([pool.submit(function, *args) for args in calls]):
            yield future.result()


def _one_thread_call(function: Callable[..., Any], *args: Any) -> Any:
    _one_thread()
    return function(*args)


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
        remote = ray.remote(num_cpus=1)(_one_thread_call)
        pending = [remote.remote(function, *args) for args in calls]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        if started:
            ray.shutdown()


BACKENDS: dict[str, Callable[..., Iterator[Any]]] = {"local": local_map, "ray": ray_map}


def check_workers(workers: int) -> None:
    """Refuse a worker count below one (it would silently run as one)."""
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")


def get_backend(name: str) -> Callable[..., Iterator[Any]]:
    """The map function of backend `name` ("local" or "ray")."""
    if name not in BACKENDS:
        raise PhaselensError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]
