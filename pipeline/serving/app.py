"""Serve: an HTTP endpoint for the registered model that follows the registry.

``pipeline serve`` (default ``--model-uri models:/<name>@production``; infra validation starts
it on a fixed ``models:/<name>/<version>``). The model loads in the background, so ``/health``
answers at once; with an alias, the registry is polled and a promotion or rollback is served
without a restart and without failing a request in flight (:mod:`pipeline.serving.slot`).

* ``GET /health``: the process is up (200).
* ``GET /ready``: 200 once a model is loaded, else 503 (with the load error if it failed).
* ``GET /metadata``: model name, version, alias, data hash, training run, classes, input shape.
* ``POST /predict``: JSON ``{"instances": [image, ...]}`` or ``{"image": image}`` (integers
  0-255 or floats in [0, 1]); the bytes of one PNG, JPEG or WebP image (``Content-Type:
  image/png``, ``image/jpeg``, ``image/webp``); or a binary array of one image or a batch,
  channels first: ``numpy.save`` bytes (``application/x-npy``) or raw uint8 pixels
  (``application/octet-stream`` with ``X-Image-Shape: n,c,h,w``). Each image of the served
  version's input shape (the OpenAPI document states it). Answers class ids, class names, probabilities and the version
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
from typing import Any

import orjson

from pipeline.config import ServingSettings, Settings
from pipeline.serving.arrays import SHAPE_HEADER
from pipeline.serving.bodies import MEDIA_TYPES, PARSED_INLINE, decode_body
from pipeline.serving.guards import PARSE_INLINE_BYTES, PROBES, Admission, BodyDecoder, RequireToken, drain
from pipeline.serving.metrics import CountRequests, Metrics
from pipeline.serving.openapi import OPEN_DOCS, PredictResponse, Problem, describe_api, predict_body
from pipeline.serving.payload import MAX_BODY_BYTES, RequestError
from pipeline.serving.slot import ModelSlot

log = logging.getLogger(__name__)

POLL_S = 10.0
"""How often a server on an alias asks the registry where the alias points."""
ANSWER_TIMEOUT_S = 30.0
"""A request whose forward pass has not come back by then gets a 503 (a wedged device)."""


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
            if slot.current is None:  # a supervised worker has loaded it before it listens
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

    app = FastAPI(title="Image classifier", version="1", description=__doc__, lifespan=lifespan)

    app.add_middleware(Admission, serving=serving)  # innermost: unauthenticated requests take no slot
    open_paths = PROBES | OPEN_DOCS | ({"/metrics"} if serving.metrics_open else set())
    if serving.token:
        app.add_middleware(RequireToken, token=serving.token, open_paths=open_paths)
    describe_api(app, open_paths if serving.token else None, lambda: slot.current and slot.current.input_shape)
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
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/predict",
        summary="Classify one image or a batch",
        response_model=PredictResponse,
        openapi_extra={"requestBody": predict_body(None)},  # the served shape: describe_api
        responses={
            code: {"model": Problem, "description": text}
            for code, text in (
                (400, "Not UTF-8 JSON"),
                (408, "The body did not arrive in time (the connection is closed)"),
                (413, "Body too large"),
                (415, "Neither JSON, a PNG, JPEG or WebP image, nor an .npy or raw uint8 array"),
                (422, "Wrong shape, channels, type or range, an empty batch, or an unreadable image"),
                (503, "No model loaded yet, no answer in time, or too many requests or bytes in flight (Retry-After)"),
            )
        },
    )
    async def predict(request: Request) -> Response:
        current = slot.current
        if not batcher.alive() or current is None:
            return problem(503, "no model loaded yet" if batcher.alive() else "the inference loop stopped")
        shape = current.input_shape  # a swap meanwhile to another shape: the batcher says so (409)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            await drain(request.scope, request.receive)
            return problem(413, f"body: expected at most {MAX_BODY_BYTES} bytes, found {declared}", close=True)
        kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if kind not in (*MEDIA_TYPES, ""):
            return problem(415, f"Content-Type: expected one of {', '.join(MEDIA_TYPES)}, found {kind}")
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
                declared_shape = request.headers.get(SHAPE_HEADER)
                if size <= PARSE_INLINE_BYTES or kind in PARSED_INLINE:
                    pixels = decode_body(kind, body, shape, declared_shape)
                else:
                    pixels = await decoder.decode(kind, body, shape, declared_shape)
            except RequestError as exc:
                return problem(exc.status, str(exc))
        finally:
            buffered[0] -= reserved[0]
        try:
            probabilities, served = await asyncio.wait_for(batcher.predict(pixels), ANSWER_TIMEOUT_S)
        except TimeoutError:
            return problem(503, f"no answer from the model within {ANSWER_TIMEOUT_S:.0f} s")
        except RequestError as exc:  # the version changed to another input shape meanwhile
            return problem(exc.status, str(exc))
        classes = served.metadata["classes"]
        ids = probabilities.argmax(axis=1)
        answer = {
            "model_version": served.version,
            "predictions": [
                {"class_id": int(i), "class_name": classes[int(i)], "probabilities": p.tolist()}
                for i, p in zip(ids, probabilities, strict=True)
            ],
        }
        return Response(orjson.dumps(answer), media_type="application/json")  # 5x json.dumps for a batch

    return app
