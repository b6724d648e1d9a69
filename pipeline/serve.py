"""Serve: an HTTP endpoint for one registered model version.

``pipeline serve --model-uri models:/<name>@production`` (or ``models:/<name>/<version>``)
starts it; infra validation starts it too, in a fresh process, before a version may become
``staging``. The model loads in the background so that ``/health`` answers at once:

* ``GET /health``: the process is up (200).
* ``GET /ready``: 200 once the model is loaded, else 503 (with the load error if it failed).
* ``GET /metadata``: model name, version, the alias it was loaded by, data hash, training run.
* ``POST /predict``: ``{"instances": [image, ...]}`` or ``{"image": image}``, each image a 28x28
  array of integers 0-255 or of floats in [0, 1]. Answers class ids, class names, probabilities
  and the model version. A malformed request gets a 4xx saying what was expected and found.

Only the registry's pt2 programs are loaded (no pickle); request bodies are parsed as JSON and
never touch the filesystem.
"""

# No `from __future__ import annotations` here: FastAPI reads the route functions' annotations
# (``request: Request``) at runtime, and their names live inside create_app.
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import FASHION_MNIST_CLASSES, Settings
from pipeline.errors import ReferenceNotFoundError

log = logging.getLogger(__name__)

IMAGE_SHAPE = (28, 28)
MAX_BODY_BYTES = 8 * 1024 * 1024
"""A batch of 256 images as JSON integers is about 1 MB; anything far larger is refused (413)."""
MAX_BATCH = 1024

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


class RequestError(ValueError):
    """A client's request is malformed; the message says what was expected and what came."""


def parse_images(payload: Any) -> np.ndarray:
    """``{"instances": [...]}`` or ``{"image": ...}`` -> float32 pixels in [0, 1], ``(n, 1, 28, 28)``."""
    if not isinstance(payload, dict) or not ({"instances", "image"} & payload.keys()):
        raise RequestError('body: expected a JSON object with "instances" (a list of images) or "image", '
                           f"found {type(payload).__name__}{' with keys ' + str(sorted(payload)) if isinstance(payload, dict) else ''}")
    images = payload["instances"] if "instances" in payload else [payload["image"]]
    if not isinstance(images, list) or not images:
        raise RequestError(f"instances: expected a non-empty list of 28x28 images, found {_describe(images)}")
    if len(images) > MAX_BATCH:
        raise RequestError(f"instances: expected at most {MAX_BATCH} images, found {len(images)}")
    try:
        array = np.asarray(images)
    except ValueError:
        array = np.empty(0, dtype=object)
    if array.dtype == object or array.shape[1:] != IMAGE_SHAPE:
        shapes = sorted({str(np.shape(img)) for img in images[:8]})
        raise RequestError(f"instances: expected images of shape 28x28, found shape(s) {', '.join(shapes)}")
    if array.dtype.kind in "iu":
        if array.min() < 0 or array.max() > 255:
            raise RequestError(f"pixels: expected integers 0-255, found values from {array.min()} to {array.max()}")
        return (array.astype(np.float32) / 255.0)[:, None]
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise RequestError(f"pixels: expected floats in [0, 1], found values from {np.nanmin(array)} to {np.nanmax(array)}")
        return array.astype(np.float32)[:, None]
    raise RequestError(f"pixels: expected numbers (integers 0-255 or floats 0-1), found {array.dtype.kind!r} values "
                       f"such as {array.flat[0]!r}")


def _describe(value: Any) -> str:
    return f"an empty {type(value).__name__}" if value == [] else type(value).__name__


@dataclass
class LoadedModel:
    """The model behind the endpoint and what ``/metadata`` tells about it."""

    uri: str
    model: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)

    def load(self, settings: Settings) -> None:
        try:
            self.metadata = resolve(self.uri, settings)
            from pipeline.models import load_registered

            model_uri = f"models:/{self.metadata['model_name']}/{self.metadata['version']}"
            self.model = load_registered(model_uri)
            self.ready.set()
            log.info("serving %s version %s", self.metadata["model_name"], self.metadata["version"])
        except Exception as exc:  # whatever broke, /ready says so and `pipeline serve` exits non-zero
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self.error = f"{type(exc).__name__}: {first_line}"
            log.error(self.error)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.from_numpy(pixels)).numpy()


def resolve(model_uri: str, settings: Settings) -> dict[str, Any]:
    """The registry's facts about ``models:/<name>/<version>`` or ``models:/<name>@<alias>``."""
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import tracking_client

    match = MODEL_URI.match(model_uri)
    if not match:
        raise ReferenceNotFoundError("--model-uri", "models:/<name>/<version> or models:/<name>@<alias>", repr(model_uri))
    client = tracking_client(settings)
    try:
        if match["alias"]:
            version = client.get_model_version_by_alias(match["name"], match["alias"])
        else:
            version = client.get_model_version(match["name"], match["version"])
    except MlflowException as exc:
        raise ReferenceNotFoundError(model_uri, "a registered model version", "none") from exc
    return {
        "model_name": version.name, "version": str(version.version), "alias": match["alias"],
        "aliases": sorted(version.aliases), "run_id": version.run_id,
        "dataset_hash": version.tags.get("dataset_hash"), "processed_hash": version.tags.get("processed_hash"),
        # Registered with the version; versions registered before that were all Fashion-MNIST.
        "classes": json.loads(version.tags["classes"]) if "classes" in version.tags else list(FASHION_MNIST_CLASSES),
    }


def create_app(loaded: LoadedModel) -> Any:
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    app = FastAPI(title="Fashion-MNIST classifier", version="1", description=__doc__)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> JSONResponse:
        if loaded.ready.is_set():
            return JSONResponse({"ready": True, "version": loaded.metadata["version"]})
        return JSONResponse({"ready": False, "error": loaded.error}, status_code=503)

    @app.get("/metadata")
    def metadata() -> JSONResponse:
        if not loaded.ready.is_set():
            return JSONResponse({"detail": "no model loaded yet"}, status_code=503)
        return JSONResponse({**loaded.metadata, "model_uri": loaded.uri})

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        if not loaded.ready.is_set():
            return JSONResponse({"detail": "no model loaded yet"}, status_code=503)
        size = int(request.headers.get("content-length") or 0)
        if size > MAX_BODY_BYTES:
            return JSONResponse({"detail": f"body: expected at most {MAX_BODY_BYTES} bytes, found {size}"}, status_code=413)
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return JSONResponse({"detail": f"body: expected at most {MAX_BODY_BYTES} bytes, found {len(body)}"}, status_code=413)
        try:
            pixels = parse_images(json.loads(body))
        except json.JSONDecodeError as exc:
            return JSONResponse({"detail": f"body: expected JSON, found a syntax error at {exc.pos}: {exc.msg}"}, status_code=400)
        except RequestError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=422)
        # Off the event loop: /health and /ready answer while a batch is computed.
        probabilities = await run_in_threadpool(loaded.predict, pixels)
        classes = loaded.metadata["classes"]
        return JSONResponse({
            "model_version": loaded.metadata["version"],
            "predictions": [
                {"class_id": int(p.argmax()), "class_name": classes[int(p.argmax())], "probabilities": p.tolist()}
                for p in probabilities
            ],
        })

    return app


def serve(model_uri: str, settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the endpoint until stopped; raise if the model never loaded."""
    import uvicorn

    from pipeline.errors import InfraValidationError

    loaded = LoadedModel(model_uri)
    threading.Thread(target=loaded.load, args=(settings,), daemon=True, name="model-loader").start()
    config = uvicorn.Config(create_app(loaded), host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)

    def stop_if_unloadable() -> None:
        while not loaded.ready.wait(0.2):
            if loaded.error:
                server.should_exit = True
                return

    threading.Thread(target=stop_if_unloadable, daemon=True).start()
    server.run()
    if loaded.error:
        raise InfraValidationError(model_uri, "a model that loads", loaded.error)  # the CLI exits 2
