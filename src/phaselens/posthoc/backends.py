"""Where independent tasks run: in this process, in local worker processes, or on Ray.

A backend maps a function over argument tuples and yields the results as they finish, so
probe sweeps (a task per checkpoint) and training sweeps (a task per run) share it. Every
worker computes with one torch thread: N workers share N cores without thrashing.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Callable, Iterator, Sequence

from phaselens.errors import ConfigError, PhaselensError

_PR_SET_PDEATHSIG = 1  # linux/prctl.h: the signal a process receives when its parent dies


def _one_thread() -> None:
    """Worker initialiser: one torch thread per process."""
    import torch

    torch.set_num_threads(1)


def _worker_start(driver: int) -> None:
    """Worker initialiser: one torch thread, and no life beyond the driver's. The driver ends its workers when it
    is interrupted (Ctrl-C, SIGTERM); where it dies without a word (SIGKILL), Linux sends them SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the driver ends the workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the driver's handler, inherited through fork
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != driver:  # the driver died before the request took effect
            os._exit(1)
    _one_thread()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (a scheduler's stop, `kill PID`) raises KeyboardInterrupt as Ctrl-C does, so what
    was done is kept and worker processes end with this one; a second SIGTERM kills at once. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


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
    before = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_context(), initializer=_worker_start, initargs=(os.getpid(),))
    try:
        for future in as_completed([pool.submit(function, *args) for args in calls]):
            yield future.result()
    except BaseException:  # interrupted, closed early or failed: the workers go with the driver, pending calls are dropped
        pool.shutdown(wait=False, cancel_futures=True)
        for worker in set(multiprocessing.active_children()) - before:
            worker.terminate()
        raise
    finally:
        pool.shutdown(wait=True)


def _one_thread_call(function: Callable[..., Any], *args: Any) -> Any:
    _one_thread()
    return function(*args)


def ray_map(function: Callable[..., Any], calls: Sequence[tuple], workers: int = 1, address: str | None = None) -> Iterator[Any]:
    """`function(*args)` for each of `calls` as one-CPU Ray tasks, yielded as they finish.

    Connects to `address`, or starts a local cluster of `workers` CPUs (and shuts down what it started).
    """
    ray = _ray()
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


def _ray() -> Any:
    """The `ray` module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise PhaselensError("--backend ray needs Ray: pip install 'phaselens[ray]' (or pip install 'ray[default]')") from None
    return ray


def get_backend(name: str) -> Callable[..., Iterator[Any]]:
    """The map function of backend `name` ("local" or "ray"); a missing Ray is said here, before any work starts."""
    if name not in BACKENDS:
        raise PhaselensError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "ray":
        _ray()
    return BACKENDS[name]
