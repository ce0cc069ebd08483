"""The HTTP face: an OpenAI- and Anthropic-compatible server over one engine (FastAPI + uvicorn).

Owns the app (routes, API-key and Host checks, the budget of request bytes held at once, error bodies in
each API's style, /health, /v1/models), the graceful end on SIGTERM / SIGINT, and serve(). Must not: render
terminal output (cli/ does), or run generation outside the one worker of runner.EngineRunner; no request
may take the server down.
"""
from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import signal
import socket
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import replace
from types import FrameType
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hybrid.runtime.options import LoadOptions
from hybrid.runtime.warmup import COMPILING, WARMING, kernels_cached, warm_up
from hybrid.serve import anthropic_api as api_anthropic, openai_api as api_openai
from hybrid.serve.common import ApiError, ServerState, check_model, longest_token_bytes, server_state
from hybrid.serve.limits import (SERVE_CONTEXT, DEFAULT_KEEPALIVE_S, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_PENDING_BYTES,
                                 DEFAULT_MAX_QUEUE)
from hybrid.serve.runner import EngineRunner

log = logging.getLogger(__name__)

BACKLOG = 2048  # uvicorn's default: connections that may wait to be accepted
GRACE_S = 5  # after a signal, how long connections may take to close (all jobs end at once; this is slack)
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # bound here without a key, it answers only requests addressed here

_OPENAI_TYPES = {401: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_exceeded",
                 500: "server_error", 503: "server_error"}
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                    503: "overloaded_error"}


def error_response(path: str, status: int, message: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error body in the style of the API the path belongs to."""
    if path.startswith("/v1/messages"):
        kind = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
        return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status_code=status,
                            headers=headers)
    kind = _OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


class RequestGuard:
    """ASGI middleware, before any route runs: with allowed_hosts, the Host header must name one of them
    (403: a web page that rebinds its DNS name to 127.0.0.1 cannot reach the model); with api_key,
    every request must carry it as `Authorization: Bearer KEY` (OpenAI) or `x-api-key: KEY` (Anthropic),
    except GET / HEAD /health: load balancers probe it without a key, and it tells nothing private."""

    def __init__(self, app: ASGIApp, api_key: str | None, allowed_hosts: tuple[str, ...] | None):
        self.app, self.hosts = app, allowed_hosts
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            open_path = scope["path"] == "/health" and scope["method"] in ("GET", "HEAD")
            refusal = self._refusal(dict(scope["headers"]), open_path)
            if refusal is not None:
                status, why, code = refusal
                log.warning("%d for %s %s: %s", status, scope["method"], scope["path"], why)
                await error_response(scope["path"], status, why, None, code)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, headers: dict[bytes, bytes], open_path: bool) -> tuple[int, str, str] | None:
        if self.hosts is not None:
            host = headers.get(b"host", b"").decode("latin-1")
            name = host.rsplit("]", 1)[0].lstrip("[") if host.startswith("[") else host.split(":")[0]
            if name not in self.hosts:
                return 403, (f"Host {host!r} is not allowed here; address the server as {' or '.join(self.hosts)} "
                             "(or start it with an API key)"), "host_not_allowed"
        if self.key is not None and not open_path:
            bearer = headers.get(b"authorization", b"")
            given = headers.get(b"x-api-key") or (bearer[7:].strip() if bearer[:7].lower() == b"bearer " else b"")
            if not hmac.compare_digest(given, self.key):
                why = "the API key is wrong" if given else "an API key is required (Authorization: Bearer KEY or x-api-key)"
                return 401, why, "invalid_api_key"
        return None


class BodyBudget:
    """ASGI middleware: bounds the request bytes that requests hold at once (bodies being read, parsed,
    rendered, tokenized, until their response starts) to max_bytes. A request whose body would pass the
    budget while others hold bytes is refused with a 429 (one request alone may always use it all), so
    a burst of huge prompts cannot take the machine's memory."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes, self.held = app, max_bytes, 0
        self.holders = 0  # requests holding bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        mine = 0

        def release() -> None:
            nonlocal mine
            if mine:
                self.held, self.holders, mine = self.held - mine, self.holders - 1, 0

        async def counted() -> Message:
            nonlocal mine
            message = await receive()
            n = len(message.get("body", b"")) if message["type"] == "http.request" else 0
            if n and self.held + n > self.max_bytes and self.holders > (1 if mine else 0):
                raise ApiError(429, f"the server is busy reading other large requests ({self.held} bytes held, "
                                    f"max_pending_bytes={self.max_bytes}); retry in a second", None,
                               "too_many_pending_bytes", {"Retry-After": "1"})
            if n:
                self.holders += 0 if mine else 1
                self.held, mine = self.held + n, mine + n
            return message

        async def sent(message: Message) -> None:
            if message["type"] == "http.response.start":
                release()
            await send(message)

        try:
            await self.app(scope, counted, sent)
        finally:
            release()


def create_app(engine: Any, api_key: str | None = None, model_name: str = "kimi-k2-thinking",
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_prompt_tokens: int | None = None,
               allowed_hosts: tuple[str, ...] | None = None, max_queue: int | None = DEFAULT_MAX_QUEUE,
               keepalive_s: float | None = DEFAULT_KEEPALIVE_S,
               max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES) -> FastAPI:
    """The app over a loaded engine (hybrid.load(...), or anything with its generate / apply_chat_template /
    chat_prompt / answer_budget / tokenizer / context). Requests run one at a time, in arrival order.
    allowed_hosts: host names the Host header may give (None: any). max_queue: requests that may
    wait behind the running one (None: no limit); beyond it a 429 with a Retry-After header.
    keepalive_s: a streamed answer that has nothing to send for this long (queued, a long prefill)
    sends an SSE comment, so idle-timeouts in proxies and clients do not cut it (None: never).
    max_pending_bytes: request bytes held at once (BodyBudget); beyond it a 429."""
    if keepalive_s is not None and not keepalive_s > 0:
        raise ValueError(f"keepalive_s must be > 0 or None, got {keepalive_s}")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1 or None, got {max_prompt_tokens}")
    if max_pending_bytes < 1:
        raise ValueError(f"max_pending_bytes must be >= 1, got {max_pending_bytes}")
    runner = EngineRunner(engine, max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runner.start()
        log.info("serving %r (context %d tokens)", model_name, engine.context)
        undo = end_jobs_on_signal(runner)
        try:
            yield
        finally:
            undo()
            runner.stop()

    app = FastAPI(title="kimi-hybrid", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = ServerState(engine, runner, model_name, max_body_bytes, max_prompt_tokens, keepalive_s,
                                   longest_token_bytes(engine.tokenizer))
    app.add_middleware(BodyBudget, max_bytes=max_pending_bytes)
    if api_key or allowed_hosts:  # added last: it runs first, before a body is read
        app.add_middleware(RequestGuard, api_key=api_key, allowed_hosts=allowed_hosts)
    app.include_router(api_openai.router)
    app.include_router(api_anthropic.router)
    _add_error_handlers(app)
    _add_info_routes(app, engine, model_name)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, raised or unforeseen, as a body in the style of the API its path belongs to."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        log.info("%d for %s %s: %s", exc.status, request.method, request.url.path, exc.message)
        return error_response(request.url.path, exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(request.url.path, exc.status_code, message, None, None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request.url.path, 400, f"invalid request: {exc.errors()[:1]}", None, "invalid_request")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("500 for %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(request.url.path, 500, f"internal error: {type(exc).__name__}: {exc}", None, "server_error")


def _add_info_routes(app: FastAPI, engine: Any, model_name: str) -> None:
    """/health (the queue's state) and /v1/models (the one model, as OpenAI lists models)."""
    created = int(time.time())

    @app.get("/health")
    async def health(request: Request) -> Any:
        st = server_state(request)
        body = {"status": "ok", "model": st.model_name, "busy": st.runner.active is not None,
                "waiting": st.runner.waiting, "max_queue": st.runner.max_queue, "served": st.runner.served,
                "cancelled": st.runner.cancelled}
        reason = engine.health()  # None, or why requests fail (closed; a shard changed, missing or short)
        if reason is not None:
            return JSONResponse({**body, "status": "unusable", "reason": reason}, status_code=503)
        return body

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "kimi-hybrid",
                "context_length": engine.context}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> dict:
        check_model(server_state(request), model_id)
        return model_card()


def end_jobs_on_signal(runner: EngineRunner) -> Callable[[], None]:
    """On SIGTERM or SIGINT, end every job at once (runner.shutdown, run on the event loop: the running
    answer gets an error event, queued requests a 503), then hand the signal to the handler before ours
    (uvicorn's: stop accepting, wait for connections to close). Without this, jobs ended only when
    uvicorn's grace period ran out and it cancelled their tasks. Returns what undoes it. Signal handlers
    belong to the main thread: in another (a server run by a test) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}

    def handler(sig: int, frame: FrameType | None) -> None:
        before = previous[sig]
        if before == signal.SIG_IGN:
            return
        loop.call_soon_threadsafe(runner.shutdown)  # not here: a signal handler may interrupt a lock's holder
        if callable(before):
            before(sig, frame)
        else:  # nobody else handles it (SIG_DFL): what it would have done without us
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)

    def undo() -> None:
        for sig, before in previous.items():
            signal.signal(sig, before)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    return undo


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          backend: str = "auto", context: int | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          max_prompt_tokens: int | None = None, log_level: str = "info", model_name: str = "kimi-k2-thinking",
          max_queue: int | None = DEFAULT_MAX_QUEUE, keepalive_s: float | None = DEFAULT_KEEPALIVE_S,
          max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES, **load_options: Any) -> None:
    """Load the model (a checkpoint directory or a repo id in the Hugging Face cache; `kimi-hybrid serve`
    resolves presets first; load_options go to hybrid.load) and serve it as `model_name` until SIGTERM or
    SIGINT, then return (every request answered; see end_jobs_on_signal). Binds to loopback unless told
    otherwise. The port is bound and listening before the model loads, and held until the server stops (no
    other process can take it meanwhile; connections made during the load wait and are answered once it is
    ready). The model runs once before requests are answered (Numba's first compile, logged, is never paid by
    a request). context: None (the default) is serve_context's."""
    from hybrid.runtime.loader import load

    # a bad option is refused before logging or loading starts
    options = LoadOptions(model=model, backend=backend, context=context, **load_options)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("hybrid").setLevel(log_level.upper())  # queue positions and per-request figures
    if host not in LOOPBACK and not api_key:
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model", host)
    # before the load: a port in use is said at once, not after minutes of loading
    with bind_port(host, port) as sock:
        if context is None:
            options = replace(options, context=serve_context(options))
        engine = load(**options.kwargs())
        try:
            log.info("%s before requests are answered", WARMING if kernels_cached() else COMPILING)
            warm_up(engine)  # so the first request does not pay for the compile
            app = create_app(engine, api_key=api_key, model_name=model_name, max_body_bytes=max_body_bytes,
                             max_prompt_tokens=max_prompt_tokens, max_queue=max_queue, keepalive_s=keepalive_s,
                             max_pending_bytes=max_pending_bytes,
                             allowed_hosts=LOOPBACK if host in LOOPBACK and not api_key else None)
        except BaseException:
            _close(engine)
            raise
        # uvicorn raises the signal again once it has shut down; SIGTERM then returns from here, as Ctrl-C does
        # (exit 0), rather than killing the process before the engine is closed
        previous = signal.signal(signal.SIGTERM, lambda sig, frame: None)
        try:
            serve_on(sock, app, host=host, log_level=log_level)
        finally:
            signal.signal(signal.SIGTERM, previous)
            _close(engine)


def serve_context(options: LoadOptions) -> int | None:
    """The context a server loads without --context: the plan's choice (hybrid.runtime.context), raised to
    SERVE_CONTEXT where its KV pages take no more than the same KV_SHARE of the same memory (the VRAM budget, or
    the RAM available without a GPU), the model's window holds it and the plan fits it. Agent loops run long, so
    there a server takes 32K over keeping bf16 weights ('auto' then stores them in int8) or some hot experts.
    None: the plan's choice stands (load() plans it again, the same way)."""
    from hybrid.checkpoint.config import ModelConfig
    from hybrid.runtime.context import COW_TOKENS, KV_SHARE
    from hybrid.runtime.loader import plan_for
    from hybrid.runtime.placement import PlanError
    from hybrid.runtime.resolve import resolve_model

    cfg = ModelConfig.from_file(resolve_model(options.model) / "config.json")
    p = plan_for(cfg, options)
    memory = p.gpu_budget if p.device == "cuda" else p.ram_available
    if not p.context < SERVE_CONTEXT <= cfg.max_position_embeddings or \
            (SERVE_CONTEXT + COW_TOKENS) * p.kv_bytes_per_token > KV_SHARE * memory:
        log.info("%s", p.context_why)
        return None
    try:
        plan_for(cfg, replace(options, context=SERVE_CONTEXT))
    except PlanError as e:
        log.info("%s; a server's %d does not fit: %s", p.context_why, SERVE_CONTEXT, e)
        return None
    log.info("context %d: a server's, since its KV pages take <= %.0f%% of the %s too", SERVE_CONTEXT,
             100 * KV_SHARE, "VRAM budget" if p.device == "cuda" else "RAM available")
    return SERVE_CONTEXT


def _close(engine: Any) -> None:
    close = getattr(engine, "close", None)
    if close is not None:
        close()


def bind_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening, for serve_on; OSError naming the port when that fails (in
    use, not an address of this machine, a privileged port). Bound once and served as is: checking the port
    and letting uvicorn bind it again later left a gap in which another process could take it."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"cannot listen on {host!r}: {e.strerror}; pass --host an address of this machine") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a closing socket does not count
        sock.bind(address)
        sock.listen(BACKLOG)  # now: on Linux a bound socket that is not listening can still be bound by another
    except OSError as e:
        sock.close()
        why = "is already in use (another server?)" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
        raise OSError(f"port {port} on {host} {why}; stop what holds it or choose another with --port") from None
    return sock


def serve_on(sock: socket.socket, app: ASGIApp, host: str, log_level: str) -> None:
    """Run uvicorn on sock (from bind_port) until a signal ends it; uvicorn closes sock on the way out."""
    import uvicorn

    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, backlog=BACKLOG,
                                           timeout_graceful_shutdown=GRACE_S))
    # uvicorn says this itself only when it binds; given sockets (its reload and worker modes) it is said by
    # uvicorn's Config.bind_socket, which we replace. The socket already listens: a client may connect now.
    address = f"[{host}]" if ":" in host else host
    logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", address, port)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises SIGINT again once it has shut down, as uvicorn.run expects
        pass
