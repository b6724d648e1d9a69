"""Serve: an HTTP endpoint for the registered model that follows the registry.

``pipeline serve`` (default ``--model-uri models:/<name>@production``; infra validation starts
it on a fixed ``models:/<name>/<version>``). The model loads in the background, so ``/health``
answers at once; with an alias, the registry is polled and a promotion or rollback is served
without a restart and without failing a request in flight (:mod:`pipeline.served_model`).

* ``GET /health``: the process is up (200).
* ``GET /ready``: 200 once a model is loaded, else 503 (with the load error if it failed).
* ``GET /metadata``: model name, version, alias, data hash, training run, classes.
* ``POST /predict``: JSON ``{"instances": [image, ...]}`` or ``{"image": image}`` (28x28
  integers 0-255 or floats in [0, 1]), or the bytes of one 28x28 grayscale PNG
  (``Content-Type: image/png``). Answers class ids, class names, probabilities and the version
  that computed them. Malformed input gets a 4xx saying what was expected and what came
  (:mod:`pipeline.payload`).
* ``GET /metrics``: Prometheus: requests by route and status, latency histogram, images per
  forward pass, the model version served, reloads.

Concurrent requests share forward passes (:mod:`pipeline.batching`); inference runs without
autograd on every CPU the process may use, or on the GPU when there is one.

Under abuse (:class:`~pipeline.config.ServingSettings`): with a token configured, every route but
``/health``, ``/ready`` and the OpenAPI document needs ``Authorization: Bearer <token>`` (401);
connections, requests in flight and buffered body bytes are capped (503 with ``Retry-After``
beyond); a body that does not arrive within the body timeout gets 408 and its connection is
closed, as are connections that send no complete headers in time or sit idle; bodies over 64 KiB
are parsed in worker processes, so that the event loop (and ``/health``) never waits for one.
"""

# No `from __future__ import annotations` here: FastAPI reads the route functions' annotations
# (``request: Request``) at runtime, and their names live inside create_app.
import asyncio
import hmac
import json
import logging
import os
import threading
import time
from typing import Any

from pydantic import BaseModel, Field

from pipeline.config import ServingSettings, Settings
from pipeline.payload import MAX_BODY_BYTES, RequestError, decode_body, png_schema, request_schema
from pipeline.served_model import ModelSlot, ServedModel

log = logging.getLogger(__name__)

POLL_S = 10.0
"""How often a server on an alias asks the registry where the alias points."""
ANSWER_TIMEOUT_S = 30.0
"""A request whose forward pass has not come back by then gets a 503 (a wedged device)."""
PARSE_INLINE_BYTES = 64 * 1024
"""Bodies up to this size are parsed on the event loop (about a millisecond); larger ones in a
worker process: ``json.loads`` and ``np.asarray`` hold the GIL for their whole call (about 0.1 s
for 8 MB), so a thread would still stall every other request, ``/health`` included."""
PARSE_WORKERS = 2
"""Worker processes for big bodies; more requests queue for them (their bodies are counted
against ``max_buffered_bytes`` meanwhile)."""
MAX_HEADER_BYTES = 16 * 1024
"""Request line and headers (h11's incomplete-event limit): beyond, 400 and the connection closed."""
PROBES = frozenset({"/health", "/ready"})
"""Routes that are never authenticated nor counted against ``max_in_flight`` or ``max_connections``."""
PROBE_LINES = tuple(f"GET {path}{end}".encode() for path in sorted(PROBES) for end in (" ", "?"))
"""How a probe's request line starts: such a connection beyond ``max_connections`` is served one
answer and closed, so that a connection flood does not fail the orchestrator's liveness probe."""
OPEN_DOCS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
"""The interface description (no data, no model): open, so that clients can read it."""
KERNEL_CACHE = "64"
"""oneDNN's primitive cache capacity in the server (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``; an
operator's own value wins). Its default, 1024, keeps the kernels of every batch size the
micro-batcher has ever formed: +1.2 GB over a few hundred sizes with the default network, and the
soak's slow growth. 64 keeps single-image passes at full speed (their kernels stay cached)."""


class Problem(BaseModel):
    detail: str = Field(description="What was expected and what came.")


class Prediction(BaseModel):
    class_id: int
    class_name: str
    probabilities: list[float] = Field(description="One per class, in class-id order; they sum to 1.")


class PredictResponse(BaseModel):
    model_version: str = Field(description="The registered version that computed these predictions.")
    predictions: list[Prediction]


class Metrics:
    """Prometheus metrics in a registry of their own (several apps can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("serve_requests", "HTTP requests by route and status code", ["route", "code"],
                                registry=self.registry)
        self.latency = Histogram("serve_request_seconds", "Request latency by route", ["route"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.batch = Histogram("serve_batch_images", "Images per forward pass (micro-batching)", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.version = Gauge("serve_model_version", "The model version being served (1 on its labels)",
                             ["model_name", "version", "alias"], registry=self.registry)
        self.reloads = Counter("serve_model_reloads", "Alias moves followed (swapped) or not (failed)", ["result"],
                               registry=self.registry)

    def served(self, served: ServedModel) -> None:
        meta = served.metadata
        labels = (meta["model_name"], meta["version"], meta["alias"] or "")
        self.version.labels(*labels).set(1)  # the new one first: a scrape always sees a version
        for old in [key for key in self.version._metrics if key != labels]:
            self.version.remove(*old)


ROUTES = {"/health", "/ready", "/metadata", "/metrics", "/predict"}


class CountRequests:
    """ASGI middleware: requests by route and status, and their latency (a plain ASGI wrapper:
    Starlette's BaseHTTPMiddleware costs a task and a stream per request)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def record(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


PREDICT_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": request_schema()},
        "image/png": {"schema": png_schema()},
    },
}


DRAIN_S = 2.0
"""A refused request's body is read and dropped for up to this long before the answer, so that
the client, still sending, reads the 503 (or 401, 413) instead of a reset connection."""


async def drain(scope: dict, receive: Any, seconds: float = DRAIN_S) -> None:
    """Read and drop the request body (none kept) until it ends or ``seconds`` pass."""
    headers = dict(scope["headers"])
    if headers.get(b"content-length", b"0") == b"0" and b"transfer-encoding" not in headers:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (left := deadline - loop.time()) > 0:
        try:
            message = await asyncio.wait_for(receive(), left)
        except TimeoutError:
            return
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


async def refuse(scope: dict, receive: Any, send: Any, status: int, detail: str,
                 headers: dict[str, str] | None = None) -> None:
    await drain(scope, receive)
    await send_problem(send, status, detail, headers)


async def send_problem(send: Any, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """A JSON problem straight on the ASGI ``send`` (for middleware), closing the connection."""
    body = json.dumps({"detail": detail}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"), *((k.encode(), v.encode()) for k, v in (headers or {}).items())]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class RequireToken:
    """ASGI middleware: ``Authorization: Bearer <token>`` on every route but the probes and the
    docs (and ``/metrics`` when opened); 401 with ``WWW-Authenticate: Bearer`` otherwise."""

    def __init__(self, app: Any, token: str, open_paths: frozenset[str]) -> None:
        self.app, self.token, self.open_paths = app, token.encode(), open_paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            header = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
                found = "no Authorization header" if not header else "a wrong or malformed one"
                await refuse(scope, receive, send, 401, f"Authorization: expected a bearer token, found {found}",
                             {"www-authenticate": 'Bearer realm="pipeline serve"'})
                return
        await self.app(scope, receive, send)


class Admission:
    """ASGI middleware: at most ``max_in_flight`` requests at once (the probes not counted);
    beyond, 503 with ``Retry-After``. The event loop is single-threaded: a plain counter."""

    def __init__(self, app: Any, serving: ServingSettings) -> None:
        self.app, self.serving, self.in_flight = app, serving, 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in PROBES:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.serving.max_in_flight:
            await refuse(scope, receive, send, 503, f"requests in flight: expected at most {self.serving.max_in_flight}, found "
                               "that many already; retry later", {"retry-after": str(self.serving.retry_after_s)})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class BodyDecoder:
    """Decodes big bodies in worker processes (spawned on first use), so that the GIL they hold
    is not the server's."""

    def __init__(self, workers: int = PARSE_WORKERS) -> None:
        self.workers = workers
        self._pool: Any = None

    def start(self) -> None:
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: the server process runs threads (torch, the registry watch).
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_die_with_server, initargs=(os.getpid(),))

    async def decode(self, kind: str, body: bytes) -> Any:
        from concurrent.futures.process import BrokenProcessPool

        self.start()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, decode_body, kind, body)
        except BrokenProcessPool:  # a worker died (killed for memory?): new ones for the next request
            self._pool = None
            raise

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _die_with_server(server_pid: int) -> None:
    """In a decoder worker: end when the server process ends, even by SIGKILL. A pool's workers
    hold both ends of their task queue, so they never see it close, and would wait for ever."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != server_pid:  # the server died before the line above
        os._exit(0)


def _secure_openapi(app: Any, open_paths: frozenset[str]) -> None:
    """Declare the bearer scheme, and 401, on every operation that needs the token."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, operations in schema["paths"].items():
                if path in open_paths:
                    continue
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
                    operation["responses"]["401"] = {
                        "description": "No bearer token, or a wrong one",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def create_app(slot: ModelSlot, metrics: Metrics | None = None, settings: Settings | None = None,
               poll_s: float = POLL_S, serving: ServingSettings | None = None) -> Any:
    """The ASGI app over ``slot``; with ``settings``, it loads the model and follows an alias.
    ``serving`` holds the token and the limits (default: none, and the default limits)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    from pipeline.batching import MicroBatcher

    metrics = metrics or Metrics()
    serving = serving or ServingSettings()
    batcher = MicroBatcher(slot, on_batch=metrics.batch.observe)
    decoder = BodyDecoder()
    buffered = [0]  # body bytes held by requests in flight (one event loop: no lock)
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        if settings is not None:
            decoder.start()
            threading.Thread(target=slot.load_first, args=(settings,), daemon=True, name="model-loader").start()
            if slot.follows_alias():
                def reloaded(result: str) -> None:
                    metrics.reloads.labels(result=result).inc()

                threading.Thread(target=slot.watch, args=(settings, poll_s, stop, reloaded), daemon=True,
                                 name="registry-watch").start()
        yield
        stop.set()
        await batcher.stop()
        decoder.stop()

    app = FastAPI(title="Fashion-MNIST classifier", version="1", description=__doc__, lifespan=lifespan)

    app.add_middleware(Admission, serving=serving)  # innermost: unauthenticated requests take no slot
    if serving.token:
        open_paths = PROBES | OPEN_DOCS | ({"/metrics"} if serving.metrics_open else set())
        app.add_middleware(RequireToken, token=serving.token, open_paths=open_paths)
        _secure_openapi(app, open_paths)
    app.add_middleware(CountRequests, metrics=metrics)

    def problem(status: int, detail: str, close: bool = False) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status, headers={"connection": "close"} if close else None)

    # async: answered on the event loop, never queued behind the thread pool.
    @app.get("/health", summary="The process is up")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="A model is loaded", responses={503: {"description": "Not loaded (yet)"}})
    async def ready() -> JSONResponse:
        if not batcher.alive():
            return JSONResponse({"ready": False, "error": "the inference loop stopped"}, status_code=503)
        if slot.current is not None:
            return JSONResponse({"ready": True, "version": slot.current.version})
        return JSONResponse({"ready": False, "error": slot.error}, status_code=503)

    busy = {503: {"model": Problem, "description": "No model loaded yet, or too many requests (Retry-After)"}}

    @app.get("/metadata", summary="The model being served", responses=busy)
    def metadata() -> JSONResponse:
        served = slot.current
        if served is None:
            return problem(503, "no model loaded yet")
        return JSONResponse(served.metadata)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response, responses=busy)
    def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/predict", summary="Classify one image or a batch", response_model=PredictResponse,
        openapi_extra={"requestBody": PREDICT_BODY},
        responses={code: {"model": Problem, "description": text} for code, text in (
            (400, "Not UTF-8 JSON"), (408, "The body did not arrive in time (the connection is closed)"),
            (413, "Body too large"), (415, "Neither JSON nor PNG"),
            (422, "Wrong shape, type or range, an empty batch, or an unreadable PNG"),
            (503, "No model loaded yet, no answer in time, or too many requests or bytes in flight (Retry-After)"))},
    )
    async def predict(request: Request) -> Response:
        if not batcher.alive() or slot.current is None:
            return problem(503, "no model loaded yet" if batcher.alive() else "the inference loop stopped")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            await drain(request.scope, request.receive)
            return problem(413, f"body: expected at most {MAX_BODY_BYTES} bytes, found {declared}", close=True)
        kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if kind not in ("image/png", "application/json", ""):
            return problem(415, f"Content-Type: expected application/json or image/png, found {kind}")
        reserved = [0]

        def reserve(size: int) -> bool:
            if buffered[0] + size > serving.max_buffered_bytes:
                return False
            buffered[0] += size
            reserved[0] += size
            return True

        async def over_budget() -> Response:
            await drain(request.scope, request.receive)
            return JSONResponse({"detail": f"request bodies in memory: expected at most {serving.max_buffered_bytes} "
                                 "bytes over all requests, found that many already; retry later"}, status_code=503,
                                headers={"retry-after": str(serving.retry_after_s), "connection": "close"})

        try:
            if declared and declared.isdigit() and not reserve(int(declared)):
                return await over_budget()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + serving.body_timeout_s
            chunks, size = [], 0
            while True:
                try:
                    message = await asyncio.wait_for(request.receive(), max(deadline - loop.time(), 0))
                except TimeoutError:
                    return JSONResponse(
                        {"detail": f"body: expected all of it within {serving.body_timeout_s:g} s, found {size} bytes "
                                   "by then"}, status_code=408, headers={"connection": "close"})
                if message["type"] == "http.disconnect":
                    return Response(status_code=499)  # nobody is listening; counted, not an error of ours
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    return problem(413, f"body: expected at most {MAX_BODY_BYTES} bytes, found more")
                if size > reserved[0] and not reserve(size - reserved[0]):  # chunked, or more than declared
                    return await over_budget()
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body = b"".join(chunks)
            del chunks
            try:
                pixels = decode_body(kind, body) if size <= PARSE_INLINE_BYTES else await decoder.decode(kind, body)
            except RequestError as exc:
                return problem(exc.status, str(exc))
        finally:
            buffered[0] -= reserved[0]
        try:
            probabilities, served = await asyncio.wait_for(batcher.predict(pixels), ANSWER_TIMEOUT_S)
        except TimeoutError:
            return problem(503, f"no answer from the model within {ANSWER_TIMEOUT_S:.0f} s")
        classes = served.metadata["classes"]
        ids = probabilities.argmax(axis=1)
        return JSONResponse({
            "model_version": served.version,
            "predictions": [{"class_id": int(i), "class_name": classes[int(i)], "probabilities": p.tolist()}
                            for i, p in zip(ids, probabilities, strict=True)],
        })

    return app


def serve(model_uri: str, settings: Settings, host: str = "127.0.0.1", port: int = 8000, poll_s: float = POLL_S) -> None:
    """Run the endpoint until stopped; raise if the model never loaded."""
    import torch
    import uvicorn

    from pipeline.errors import InfraValidationError
    from pipeline.train import usable_cpus

    torch.set_num_threads(usable_cpus())
    serving = ServingSettings.from_env()
    metrics = Metrics()
    slot = ModelSlot(model_uri, on_swap=metrics.served)
    server = uvicorn.Server(server_config(create_app(slot, metrics, settings, poll_s, serving), serving, host, port))

    def stop_if_unloadable() -> None:
        while not slot.ready.wait(0.2):
            if slot.error:
                server.should_exit = True
                return

    settle_process()
    threading.Thread(target=stop_if_unloadable, daemon=True).start()
    server.run()
    if slot.error:
        raise InfraValidationError(model_uri, "a model that loads", slot.error)  # the CLI exits 2


def settle_process() -> None:
    """Make a long-lived serving process steady, before its first request and its first model:

    * bound oneDNN's primitive cache (:data:`KERNEL_CACHE`), so that memory stops growing with
      every new batch size;
    * move the heap of the imports (half a million objects: torch, MLflow, FastAPI) out of the
      garbage collector's reach with :func:`gc.freeze`. Without it, every full collection scans
      them all: a 0.3 s pause of the event loop every few seconds under load, which is what
      ``/health`` p99 and the request p99 measured. Models load after this, so an old model
      that a swap lets go is still collected.
    """
    import gc

    import mlflow.pytorch  # noqa: F401  the loader's modules, imported now to be frozen with the rest

    import pipeline.models  # noqa: F401

    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", KERNEL_CACHE)
    gc.collect()
    gc.freeze()


def server_config(app: Any, serving: ServingSettings, host: str = "127.0.0.1", port: int = 8000) -> Any:
    """The uvicorn configuration ``pipeline serve`` runs ``app`` with: h11 with its header limit,
    the keep-alive timeout, and :func:`guarded_protocol` for the connection limit and timeouts."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                          http=guarded_protocol(serving), timeout_keep_alive=serving.keep_alive_s,
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES)


def guarded_protocol(serving: ServingSettings) -> type:
    """uvicorn's h11 protocol, plus: a connection beyond ``max_connections`` gets 503 with
    ``Retry-After`` and is closed (unless it asks for a probe: answered, then closed); a connection that sends no complete request line and headers
    within ``header_timeout_s`` (of its start, or of the previous answer) is closed; and a
    connection whose request body was left unread by the answer (413, 401, 503) is closed
    rather than kept reading it. (uvicorn's own ``limit_concurrency`` answers 503 without
    ``Retry-After`` and counts the probes too.)"""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.over_limit = len(self.connections) > serving.max_connections
            self.probe_only = False
            self.header_timer: Any = None
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            self.header_timer = self.loop.call_later(serving.header_timeout_s, self._headers_too_slow)

        def _headers_too_slow(self) -> None:
            self.header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.over_limit and self.conn.their_state is h11.IDLE and data.startswith(PROBE_LINES):
                self.probe_only = True  # a liveness probe is answered even beyond the limit, then closed
                self.over_limit = False
            if self.over_limit:
                if not self.transport.is_closing():
                    body = json.dumps({"detail": f"connections: expected at most {serving.max_connections}, found "
                                                 "that many already; retry later"}).encode()
                    self.transport.write(
                        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
                        + f"retry-after: {serving.retry_after_s}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
                        + body)
                    self.transport.close()
                return
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE and self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def on_response_complete(self) -> None:
            body_unread = self.conn.their_state is h11.SEND_BODY
            super().on_response_complete()
            if self.transport.is_closing():
                return
            if body_unread or self.probe_only:
                self.transport.close()
            elif self.conn.their_state is h11.IDLE:
                self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None
            super().connection_lost(exc)

    return GuardedH11Protocol
