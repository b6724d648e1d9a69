"""Serve: an HTTP endpoint for the registered model that follows the registry.

``pipeline serve`` (default ``--model-uri models:/<name>@production``; infra validation starts
it on a fixed ``models:/<name>/<version>``). The model loads in the background, so ``/health``
answers at once; with an alias, the registry is polled and a promotion or rollback is served
without a restart and without failing a request in flight (:mod:`pipeline.serving.slot`).

* ``GET /health``: the process is up (200).
* ``GET /ready``: 200 once a model is loaded, else 503 (with the load error if it failed).
* ``GET /metadata``: model name, version, alias, data hash, training run, classes.
* ``POST /predict``: JSON ``{"instances": [image, ...]}`` or ``{"image": image}`` (28x28
  integers 0-255 or floats in [0, 1]), or the bytes of one 28x28 grayscale PNG
  (``Content-Type: image/png``). Answers class ids, class names, probabilities and the version
  that computed them. Malformed input gets a 4xx saying what was expected and what came
  (:mod:`pipeline.serving.payload`).
* ``GET /metrics``: Prometheus: requests by route and status, latency histogram, images per
  forward pass, the model version served, reloads.

Concurrent requests share forward passes (:mod:`pipeline.serving.batching`); inference runs without
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
import logging
import threading
import time
from typing import Any

from pydantic import BaseModel, Field

from pipeline.config import ServingSettings, Settings
from pipeline.serving.guards import PARSE_INLINE_BYTES, PROBES, Admission, BodyDecoder, RequireToken, drain
from pipeline.serving.payload import MAX_BODY_BYTES, RequestError, decode_body, png_schema, request_schema
from pipeline.serving.slot import ModelSlot, ServedModel

log = logging.getLogger(__name__)

POLL_S = 10.0
"""How often a server on an alias asks the registry where the alias points."""
ANSWER_TIMEOUT_S = 30.0
"""A request whose forward pass has not come back by then gets a 503 (a wedged device)."""
OPEN_DOCS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
"""The interface description (no data, no model): open, so that clients can read it."""


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
        self.requests = Counter(
            "serve_requests", "HTTP requests by route and status code", ["route", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "serve_request_seconds",
            "Request latency by route",
            ["route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.batch = Histogram(
            "serve_batch_images",
            "Images per forward pass (micro-batching)",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        )
        self.version = Gauge(
            "serve_model_version",
            "The model version being served (1 on its labels)",
            ["model_name", "version", "alias"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "serve_model_reloads", "Alias moves followed (swapped) or not (failed)", ["result"], registry=self.registry
        )

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
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
                    }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def create_app(
    slot: ModelSlot,
    metrics: Metrics | None = None,
    settings: Settings | None = None,
    poll_s: float = POLL_S,
    serving: ServingSettings | None = None,
) -> Any:
    """The ASGI app over ``slot``; with ``settings``, it loads the model and follows an alias.
    ``serving`` holds the token and the limits (default: none, and the default limits)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    from pipeline.serving.batching import MicroBatcher

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

                threading.Thread(
                    target=slot.watch, args=(settings, poll_s, stop, reloaded), daemon=True, name="registry-watch"
                ).start()
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

    busy: dict[int | str, dict[str, Any]] = {
        503: {"model": Problem, "description": "No model loaded yet, or too many requests (Retry-After)"}
    }

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
        "/predict",
        summary="Classify one image or a batch",
        response_model=PredictResponse,
        openapi_extra={"requestBody": PREDICT_BODY},
        responses={
            code: {"model": Problem, "description": text}
            for code, text in (
                (400, "Not UTF-8 JSON"),
                (408, "The body did not arrive in time (the connection is closed)"),
                (413, "Body too large"),
                (415, "Neither JSON nor PNG"),
                (422, "Wrong shape, type or range, an empty batch, or an unreadable PNG"),
                (503, "No model loaded yet, no answer in time, or too many requests or bytes in flight (Retry-After)"),
            )
        },
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
            return JSONResponse(
                {
                    "detail": f"request bodies in memory: expected at most {serving.max_buffered_bytes} "
                    "bytes over all requests, found that many already; retry later"
                },
                status_code=503,
                headers={"retry-after": str(serving.retry_after_s), "connection": "close"},
            )

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
                        {
                            "detail": f"body: expected all of it within {serving.body_timeout_s:g} s, found {size} bytes "
                            "by then"
                        },
                        status_code=408,
                        headers={"connection": "close"},
                    )
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
        return JSONResponse(
            {
                "model_version": served.version,
                "predictions": [
                    {"class_id": int(i), "class_name": classes[int(i)], "probabilities": p.tolist()}
                    for i, p in zip(ids, probabilities, strict=True)
                ],
            }
        )

    return app
