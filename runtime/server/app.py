"""create_app(pipeline_or_factory, settings) -> FastAPI, its thin routes, and serve() for the CLI.

Routes: POST /v1/chat/completions, GET /v1/models[/{id}], GET /health (503 until the model has
loaded), GET /metrics (Prometheus text). With an API key set, /v1/* and /metrics need
"Authorization: Bearer KEY"; /health stays open for load balancers.
"""

from __future__ import annotations

import errno
import hmac
import logging
import secrets
import socket
import sys
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from ..errors import MiniCPMOError
from .api_errors import ApiError, install_handlers
from .completions import ServerState, chat_completion, not_ready, served_names
from .media import MediaPolicy
from .metrics import ServerMetrics
from .schemas import ChatCompletion, ChatCompletionRequest, ErrorResponse, ModelCard, ModelList
from .settings import ServerSettings
from .worker import BatchWorker, Worker

log = logging.getLogger("minicpmo.server")
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 500, 503, 504)}


def create_app(pipeline_or_factory: Any, settings: ServerSettings | None = None) -> FastAPI:
    """Build the app. The pipeline (or the zero-argument factory that loads one) is loaded in the
    background when the app starts (lifespan), so /health answers 503 until it is ready.

    Args:
        pipeline_or_factory: an object with `generate(messages, params)`, `model_name` and
            `context_length`, or a callable returning one.
        settings: server settings (defaults: ServerSettings()).
    """
    settings = settings or ServerSettings()
    factory = pipeline_or_factory
    if hasattr(pipeline_or_factory, "generate"):
        def factory():
            return pipeline_or_factory
    worker = (BatchWorker(factory, settings.max_queue, settings.parallel) if settings.parallel > 1
              else Worker(factory, settings.max_queue))
    state = ServerState(settings, worker, ServerMetrics(), MediaPolicy.from_settings(settings))
    _add_gauges(state)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(state.worker.stop)

    app = FastAPI(title="minicpmo-onnx", summary="OpenAI-compatible MiniCPM-o server", lifespan=lifespan)
    app.state.server = state
    install_handlers(app)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["X-Request-Id"])
    app.add_middleware(RequestLog, state=state)  # outermost: it logs what CORS answers too
    app.include_router(_public_routes(state))
    app.include_router(_api_routes(state), dependencies=[Depends(_api_key_check(settings.api_key))])
    return app


def _add_gauges(state: ServerState) -> None:
    w = state.worker
    state.metrics.add_gauge("minicpmo_queue_depth", "Requests waiting for the model.", lambda: w.waiting)
    state.metrics.add_gauge("minicpmo_requests_running", "Generations running (up to --parallel).", lambda: w.running)
    state.metrics.add_gauge("minicpmo_model_loaded", "1 once the model has loaded.", lambda: w.state == "ready")


def _api_key_check(api_key: str | None) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return check


def _public_routes(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    def health() -> JSONResponse:
        worker = state.worker
        if worker.state == "ready":
            return JSONResponse({"status": "ok", "model": worker.pipeline.model_name})
        if worker.state == "failed":
            return JSONResponse({"status": "error", "message": worker.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})

    return router


def _api_routes(state: ServerState) -> APIRouter:
    router = APIRouter(responses=_ERRORS)

    @router.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @router.get("/v1/models", response_model=ModelList)
    def list_models() -> dict:
        return ModelList(data=_model_cards(state)).model_dump()

    @router.get("/v1/models/{model_id:path}", response_model=ModelCard)
    def get_model(model_id: str) -> dict:
        card = next((c for c in _model_cards(state) if c.id == model_id), None)
        if card is None:
            raise ApiError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return card.model_dump()

    @router.post("/v1/chat/completions", response_model=ChatCompletion,
                 responses={200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await chat_completion(body, request, state)

    return router


def _model_cards(state: ServerState) -> list[ModelCard]:
    worker = state.worker
    if worker.state != "ready":
        raise not_ready(worker)
    p = worker.pipeline
    return [ModelCard(id=name, created=int(state.started), context_length=p.context_length)
            for name in served_names(state)]


class RequestLog:
    """ASGI middleware: refuses oversized bodies, then logs one line per request and counts it."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.monotonic(), [500]
        info = scope.setdefault("state", {})
        info["request_id"] = f"req-{secrets.token_hex(8)}"  # the chat route replaces it with its completion id

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = list(message.get("headers", ()))
                headers.append((b"x-request-id", info["request_id"].encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            if _too_large(scope, self.state.settings.max_request_bytes):
                err = ApiError(413, f"request body is larger than {self.state.settings.max_request_bytes} bytes",
                               code="request_too_large")
                info["error"] = err.log_text()
                return await err.response()(scope, receive, send_status)
            await self.app(scope, receive, send_status)
        finally:
            self._record(scope, status[0], time.monotonic() - t0)

    def _record(self, scope, status: int, seconds: float) -> None:
        info = scope.get("state") or {}
        status = info.get("status_override", status)
        path = scope.get("path", "")
        route = path if path in ("/v1/chat/completions", "/v1/models", "/health", "/metrics") else "other"
        self.state.metrics.requests.inc(endpoint=route, status=str(status))
        if route == "/v1/chat/completions":
            self.state.metrics.latency.observe(seconds)
        usage = info.get("usage")
        tokens = f" prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens}" if usage else ""
        queue = f" queue={info['queue_seconds']:.3f}s" if "queue_seconds" in info else ""
        level = logging.DEBUG if route in ("/health", "/metrics") and status < 400 else logging.INFO
        error = f" error={info['error']}" if status >= 400 and info.get("error") else ""
        log.log(level, "%s %s %s %d%s%s latency=%.3fs%s", info.get("request_id", "-"), scope.get("method"), path,
                status, tokens, queue, seconds, error)


def _too_large(scope, limit: int) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return not value.isdigit() or int(value) > limit
    return False


def serve(pipeline_factory: Callable[[], Any], settings: ServerSettings) -> None:
    """Run the server in the foreground until interrupted (the `minicpmo serve` command).

    Raises:
        MiniCPMOError: the model failed to load (the server stops instead of answering 503 forever).
    """
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    sock = bind_socket(settings.host, settings.port)  # before the model loads: a port in use fails at once
    app = create_app(pipeline_factory, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    worker: Worker = app.state.server.worker
    worker.on_load_failed.append(lambda _message: setattr(server, "should_exit", True))
    host, port = sock.getsockname()[:2]
    log.info("serving %s on http://%s:%d (model loads in the background; /health is 503 until then; API docs "
             "at /docs)", settings.model_dir or "the model", f"[{host}]" if ":" in host else host, port)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if worker.state == "failed":
        raise MiniCPMOError(worker.load_error or "the model failed to load")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; MiniCPMOError with one clear line when that fails."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise MiniCPMOError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise MiniCPMOError(f"port {port} on {host} is already in use (another server?); choose another "
                                "with --port") from None
        raise MiniCPMOError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock
