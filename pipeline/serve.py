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
"""

# No `from __future__ import annotations` here: FastAPI reads the route functions' annotations
# (``request: Request``) at runtime, and their names live inside create_app.
import asyncio
import logging
import threading
import time
from typing import Annotated, Any

from pydantic import BaseModel, Field

from pipeline.config import Settings
from pipeline.payload import MAX_BATCH, MAX_BODY_BYTES, RequestError, load_json, parse_images, parse_png
from pipeline.served_model import ModelSlot, ServedModel

log = logging.getLogger(__name__)

POLL_S = 10.0
"""How often a server on an alias asks the registry where the alias points."""
ANSWER_TIMEOUT_S = 30.0
"""A request whose forward pass has not come back by then gets a 503 (a wedged device)."""
PARSE_INLINE_BYTES = 64 * 1024
"""Bodies up to this size are parsed on the event loop (a few hundred microseconds); larger
ones in a thread, so that one big batch does not stall every other request."""


Pixel = Annotated[float, Field(ge=0, le=255, description="An integer 0-255, or a float in [0, 1].")]
Row = Annotated[list[Pixel], Field(min_length=28, max_length=28)]
Image = Annotated[list[Row], Field(min_length=28, max_length=28, description="28 rows of 28 pixels.")]


class PredictRequest(BaseModel):
    """JSON body of ``POST /predict``: ``instances`` or ``image``. In one image, integers are
    pixels 0-255 and floats are pixels in [0, 1]."""

    instances: Annotated[list[Image], Field(min_length=1, max_length=MAX_BATCH)] | None = Field(
        None, description=f"1 to {MAX_BATCH} images (and at most {MAX_BODY_BYTES} bytes of JSON)."
    )
    image: Image | None = Field(None, description="One image.")


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
        "application/json": {"schema": PredictRequest.model_json_schema()},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
    },
}


def create_app(slot: ModelSlot, metrics: Metrics | None = None, settings: Settings | None = None,
               poll_s: float = POLL_S) -> Any:
    """The ASGI app over ``slot``; with ``settings``, it loads the model and follows an alias."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, Response

    from pipeline.batching import MicroBatcher

    metrics = metrics or Metrics()
    batcher = MicroBatcher(slot, on_batch=metrics.batch.observe)
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        if settings is not None:
            threading.Thread(target=slot.load_first, args=(settings,), daemon=True, name="model-loader").start()
            if slot.follows_alias():
                def reloaded(result: str) -> None:
                    metrics.reloads.labels(result=result).inc()

                threading.Thread(target=slot.watch, args=(settings, poll_s, stop, reloaded), daemon=True,
                                 name="registry-watch").start()
        yield
        stop.set()
        await batcher.stop()

    app = FastAPI(title="Fashion-MNIST classifier", version="1", description=__doc__, lifespan=lifespan)

    app.add_middleware(CountRequests, metrics=metrics)

    def problem(status: int, detail: str) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status)

    @app.get("/health", summary="The process is up")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="A model is loaded", responses={503: {"description": "Not loaded (yet)"}})
    def ready() -> JSONResponse:
        if not batcher.alive():
            return JSONResponse({"ready": False, "error": "the inference loop stopped"}, status_code=503)
        if slot.current is not None:
            return JSONResponse({"ready": True, "version": slot.current.version})
        return JSONResponse({"ready": False, "error": slot.error}, status_code=503)

    @app.get("/metadata", summary="The model being served")
    def metadata() -> JSONResponse:
        served = slot.current
        if served is None:
            return problem(503, "no model loaded yet")
        return JSONResponse(served.metadata)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/predict", summary="Classify one image or a batch", response_model=PredictResponse,
        openapi_extra={"requestBody": PREDICT_BODY},
        responses={code: {"model": Problem, "description": text} for code, text in (
            (400, "Not JSON"), (413, "Body too large"), (415, "Neither JSON nor PNG"),
            (422, "Wrong shape, type or range, or an empty batch"), (503, "No model loaded yet, or no answer in time"))},
    )
    async def predict(request: Request) -> Response:
        from starlette.requests import ClientDisconnect

        if not batcher.alive() or slot.current is None:
            return problem(503, "no model loaded yet" if batcher.alive() else "the inference loop stopped")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return problem(413, f"body: expected at most {MAX_BODY_BYTES} bytes, found {declared}")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    return problem(413, f"body: expected at most {MAX_BODY_BYTES} bytes, found more")
        except ClientDisconnect:
            return Response(status_code=499)  # nobody is listening; counted, not an error of ours
        kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if kind not in ("image/png", "application/json", ""):
            return problem(415, f"Content-Type: expected application/json or image/png, found {kind}")
        try:
            if kind == "image/png":
                pixels = parse_png(bytes(body))
            else:
                try:
                    payload = load_json(bytes(body))
                except RequestError as exc:
                    return problem(400, str(exc))
                if len(body) > PARSE_INLINE_BYTES:
                    pixels = await run_in_threadpool(parse_images, payload)
                else:
                    pixels = parse_images(payload)
        except RequestError as exc:
            return problem(422, str(exc))
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
    metrics = Metrics()
    slot = ModelSlot(model_uri, on_swap=metrics.served)
    config = uvicorn.Config(create_app(slot, metrics, settings, poll_s), host=host, port=port, log_level="warning",
                            access_log=False)
    server = uvicorn.Server(config)

    def stop_if_unloadable() -> None:
        while not slot.ready.wait(0.2):
            if slot.error:
                server.should_exit = True
                return

    threading.Thread(target=stop_if_unloadable, daemon=True).start()
    server.run()
    if slot.error:
        raise InfraValidationError(model_uri, "a model that loads", slot.error)  # the CLI exits 2
