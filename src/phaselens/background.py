"""One background thread that runs submitted functions in order (live telemetry, the metrics writer).

The caller never waits for the work itself: `submit` returns at once unless `depth` functions
are already waiting (a bound on what the queue holds alive). An exception in the thread stops
further work and is raised again in the caller, once, at its next `submit` or `wait`.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable


def spare_core(device: Any) -> bool:
    """True when work on `device` runs on the CPU and this process has a core its torch threads leave
    free: a background thread can then overlap the model's compute. None (no device) is False."""
    import torch  # lazily: the rest of this module is plain Python

    if device is None or torch.device(device).type != "cpu":
        return False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores > torch.get_num_threads()


class OrderedThread:
    def __init__(self, name: str, what: str, depth: int = 0):
        """`name`: the thread's name; `what`: the work, for error messages ("writing metrics.sqlite");
        `depth`: how many submissions may wait (0: no bound)."""
        self.what = what
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            fn = self._queue.get()
            try:
                if isinstance(fn, _Last):
                    if fn.cleanup is not None:
                        fn.cleanup()
                    return
                if self._error is None:
                    fn()
            except BaseException as exc:  # raised again in the caller's thread
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"{self.what} failed: {type(error).__name__}: {error}") from error

    def submit(self, fn: Callable[[], None]) -> None:
        self._raise()
        self._queue.put(fn)

    def wait(self) -> None:
        """Block until everything submitted has run; raise the error of any that failed."""
        self._queue.join()
        self._raise()

    def close(self, cleanup: Callable[[], None] | None = None) -> None:
        """Let what was submitted run, then `cleanup` (on the thread, even after an error), then stop the thread."""
        self._queue.put(_Last(cleanup))
        self.thread.join()


class _Last:
    """The final item of the queue: stops the thread after an optional cleanup."""

    def __init__(self, cleanup: Callable[[], None] | None):
        self.cleanup = cleanup
