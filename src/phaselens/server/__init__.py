"""The interactive dashboard: `phaselens serve RUN...` or, beside a notebook, `pl.serve(run=..., model=...)`.

    handle = pl.serve(run="runs/demo", model=model)   # a server in a background thread of this process
    handle                                            # in Jupyter: the page, inline
    model.blocks[1].attn.W_O.data[0] = 0; handle.refresh()   # open pages re-run on the edited model
    handle.stop()
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK


def check_port(port: int) -> None:
    """Refuse a port no socket can bind (the server would otherwise announce a URL and never answer)."""
    if not 0 <= port <= 65535:
        from phaselens.errors import ConfigError

        raise ConfigError(f"--port must be between 0 and 65535, got {port}")


def _paths(run: Any) -> list[Path]:
    if run is None:
        return []
    if isinstance(run, (str, Path)) or hasattr(run, "dir"):
        run = [run]
    return [Path(r.path) if hasattr(r, "dir") else Path(r) for r in run]


def build(runs: Sequence[Any] = (), model: Any = None, host: str = "127.0.0.1", token: str | None = None,
          device: str = "cpu"):
    """The app and the token it requires (one is made up when bound beyond this machine); checkpoints load
    on `device` (auto|cpu|cuda|cuda:N|mps, refused here when the machine lacks it)."""
    from phaselens.models.device import resolve_device
    from phaselens.server.app import create_app
    from phaselens.server.session import Session

    if token is None and not is_loopback(host):
        token = secrets.token_urlsafe(24)
    session = Session(_paths(runs), model=model, device=str(resolve_device(device, "device")))
    return create_app(session, token=token, local_only=is_loopback(host)), token


@dataclass
class ServerHandle:
    """A dashboard served from a background thread of this process."""

    url: str
    app: Any = field(repr=False)
    server: Any = field(repr=False)
    thread: threading.Thread = field(repr=False)

    def refresh(self) -> None:
        """Tell open pages that the model changed (weights edited, hooks added): they re-run their views."""
        session = self.app.state.session
        session.model_changed()
        self.app.state.hub.publish({"type": "model_changed", "model_version": session.model_version})

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def _repr_html_(self) -> str:
        return f'<iframe src="{self.url}" width="100%" height="820" style="border:1px solid #ccc"></iframe>'

    def __repr__(self) -> str:
        return f"ServerHandle(url={self.url!r})"


def serve(run: Any = None, model: Any = None, host: str = "127.0.0.1", port: int = 0,
          token: str | None = None, timeout: float = 30.0, device: str = "cpu") -> ServerHandle:
    """Start the dashboard in a background thread and return its handle (`.url`, `.refresh()`, `.stop()`).

    Args:
        run: a run directory, a `Run`, or a list of them.
        model: a model to show as it is now, by reference: edits made in the notebook are what
            the next request sees (call `handle.refresh()` to make open pages re-run).
        host: 127.0.0.1 by default; any other address requires a token (made up if not given).
        port: 0 picks a free port.
        device: where the runs' checkpoints load, auto|cpu|cuda|cuda:N|mps (the dashboard's forwards are
            small: the CPU by default).
    """
    import uvicorn

    check_port(port)
    app, token = build(_paths(run), model=model, host=host, token=token, device=device)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="phaselens-dashboard", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the dashboard did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{bound}/" + (f"?token={token}" if token else "")
    return ServerHandle(url=url, app=app, server=server, thread=thread)


def run_forever(runs: Sequence[Any], host: str = "127.0.0.1", port: int = 8050, announce=print,
                device: str = "cpu") -> None:
    """Serve until interrupted (the `phaselens serve` command)."""
    import uvicorn

    check_port(port)
    app, token = build(runs, host=host, device=device)
    listening = listen_socket(host, port)  # bound first: port 0 picks a free port, and the URL names the one it got
    bound = listening.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    announce(f"phaselens dashboard: http://{shown}:{bound}/" + (f"?token={token}" if token else ""))
    uvicorn.Server(uvicorn.Config(app, host=host, port=bound, log_level="warning")).run(sockets=[listening])


def listen_socket(host: str, port: int):
    """A TCP socket bound to (host, port); ConfigError naming the address where it cannot be (in use, not this machine's)."""
    import socket

    from phaselens.errors import ConfigError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((host, port))
    except OSError as exc:
        listening.close()
        raise ConfigError(f"cannot serve on {host}:{port}: {exc.strerror or exc}; choose another --port (0 picks a free one)") from exc
    return listening

