"""The FastAPI app: the JSON API of `schemas`, a WebSocket for pushes, and the static page.

Security: only the runs given to the `Session` are served, by name; static files come from the
package's own folder; request bodies and texts are size-limited; with a token, every request
must carry it (query `?token=`, the cookie the page gets, or `Authorization: Bearer TOKEN`, nothing else); errors
are JSON `{"error": message}` naming files relative to the runs, never a traceback. Every response
carries a strict Content-Security-Policy (the page's own scripts only, no inline script or eval), a
second wall behind the page rendering every name, label and error as text. Bound to loopback,
it answers only requests whose Host and Origin are this machine (DNS-rebinding protection).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from phaselens.errors import PhaselensError
from phaselens.server.session import Busy, NotFound, Session

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 64 * 1024
TOKEN_COOKIE = "phaselens_token"
POLL_SECONDS = 1.0
# A second wall behind rendering data as text: the page runs only its own scripts (no inline script,
# no eval; plotly's SVG needs inline styles) and talks only to this server.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
                           "font-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def plotly_js() -> Path:
    """plotly.min.js as shipped inside the installed `plotly` package (no CDN)."""
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


class EventHub:
    """Open WebSockets, and a thread-safe way to push a message to all of them."""

    def __init__(self):
        self.queues: set[asyncio.Queue] = set()
        self.loop: asyncio.AbstractEventLoop | None = None

    def publish(self, message: dict) -> None:
        """Push `message` to every open page; callable from any thread."""
        if self.loop is None or self.loop.is_closed():
            return

        def put() -> None:
            for queue in list(self.queues):
                queue.put_nowait(message)

        self.loop.call_soon_threadsafe(put)


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes with a JSON 413."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _too_large(scope, receive, send, self.limit)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _too_large(scope, receive, send, self.limit)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def is_local_name(host: str) -> bool:
    """True for localhost and loopback addresses (`127.0.0.1`, `[::1]`), with or without a port."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8050
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:  # 127.0.0.1:8050, localhost:8050
        host = host.split(":", 1)[0]
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LocalOnly:
    """ASGI middleware for a server bound to loopback: refuse a foreign `Host` header and a foreign
    `Origin` (DNS rebinding: a web page whose name now points at 127.0.0.1 must not reach the API)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        host, origin = headers.get("host"), headers.get("origin")
        problem = None
        if host is not None and not is_local_name(host):
            problem = f"Host {host!r} is not this machine"
        elif origin is not None and origin != "null" and not is_local_name(urlsplit(origin).netloc):
            problem = f"requests from {origin!r} are not accepted"
        elif origin == "null":
            problem = "requests from an opaque origin are not accepted"
        if problem is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        message = f"refused: {problem} (DNS-rebinding protection); open the dashboard at http://127.0.0.1:<port>/"
        await JSONResponse({"error": message}, status_code=403)(scope, receive, send)


async def _too_large(scope, receive, send, limit: int) -> None:
    response = JSONResponse({"error": f"request body over {limit // 1024} KiB"}, status_code=413)
    await response(scope, receive, send)


def bearer_token(header: str) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header (the scheme in any case, RFC 7235); None for any other
    form: a bare token, `Basic ...`, `Bearer` alone. The query's `?token=` and the page's cookie are the other forms."""
    scheme, _, value = header.strip().partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def create_app(session: Session, token: str | None = None, local_only: bool = True) -> FastAPI:
    """The dashboard app for `session`; `token` set: every request must carry it; `local_only` (a server
    bound to loopback): requests must name this machine as their Host and Origin."""
    hub = EventHub()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        hub.loop = asyncio.get_running_loop()
        # The runs' whole-run views (series, transitions, stages) are computed while the page loads its scripts.
        threading.Thread(target=routes.prewarm, args=(session,), name="phaselens-prewarm", daemon=True).start()
        yield

    app = FastAPI(title="phaselens dashboard", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.session = session
    app.state.hub = hub
    app.state.token = token

    def authorised(params, cookies, headers) -> bool:
        if token is None:
            return True
        offered = params.get("token") or cookies.get(TOKEN_COOKIE) or bearer_token(headers.get("authorization", ""))
        return bool(offered) and hmac.compare_digest(offered.encode("utf-8", "surrogateescape"), token.encode())

    @app.middleware("http")
    async def check_token(request: Request, call_next):
        if not authorised(request.query_params, request.cookies, request.headers):
            return JSONResponse({"error": "this server needs its token: open the URL it printed at start (…/?token=…), "
                                          "or send the header 'Authorization: Bearer TOKEN'"}, status_code=401)
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        if token is not None and request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    if local_only:
        app.add_middleware(LocalOnly)  # added last: it runs first

    # ------------------------------------------------------------------ errors as JSON

    # Messages name runs and files relative to the runs served, never by the server's absolute paths.
    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        return JSONResponse({"error": session.redact(str(exc))}, status_code=404)

    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Busy):
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(PhaselensError)
    async def refused(request: Request, exc: PhaselensError):
        return JSONResponse({"error": session.redact(str(exc))}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}" for e in exc.errors()[:5]]
        return JSONResponse({"error": "invalid request: " + "; ".join(parts)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = "not found" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse({"error": message}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        return JSONResponse({"error": session.redact(f"internal error ({type(exc).__name__}): {exc}")}, status_code=500)

    # ------------------------------------------------------------------ page and assets

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/vendor/plotly.min.js", include_in_schema=False)
    def plotly():
        return FileResponse(plotly_js(), media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    from phaselens.server import circuits, routes

    app.include_router(routes.runs_router(session))
    app.include_router(routes.model_router(session))
    app.include_router(circuits.circuits_router(session))

    # ------------------------------------------------------------------ pushes

    @app.websocket("/api/events")
    async def events(socket: WebSocket):
        if not authorised(socket.query_params, socket.cookies, socket.headers):
            await socket.close(code=1008)
            return
        hub.loop = asyncio.get_running_loop()
        await socket.accept()
        queue: asyncio.Queue = asyncio.Queue()
        hub.queues.add(queue)
        seen = routes.runs_signature(session)
        closed = asyncio.ensure_future(_until_closed(socket))  # noticing a closed page lets shutdown finish
        try:
            await socket.send_json({"type": "hello", "runs": session.names(), "model_version": session.model_version})
            while not closed.done():
                pushed = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({pushed, closed}, timeout=POLL_SECONDS, return_when=asyncio.FIRST_COMPLETED)
                if pushed in done:
                    await socket.send_json(pushed.result())
                    continue
                pushed.cancel()
                if not closed.done():
                    now = await asyncio.to_thread(routes.runs_signature, session)
                    if now != seen:
                        seen = now
                        await socket.send_json({"type": "runs_changed"})
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            closed.cancel()
            hub.queues.discard(queue)

    return app


async def _until_closed(socket: WebSocket) -> None:
    """Read (and ignore) what the page sends until it goes away."""
    while (await socket.receive())["type"] != "websocket.disconnect":
        pass
