"""The model behind the serving endpoint, and how it follows the registry.

A :class:`ModelSlot` holds one :class:`ServedModel` (the loaded pt2 program, or the version's
ONNX or INT8 variant on ONNX Runtime, and what ``/metadata`` says about it) and swaps it whole: a request, or a micro-batch, takes the current
model once and answers with it, so a swap drops nothing in flight and every answer names the
version that computed it. Given an alias (``models:/<name>@production``), :meth:`ModelSlot.watch`
polls the registry and, when the alias moves (a promotion or a rollback), loads the new version
beside the old one and swaps it in; a version that fails to load is logged and the old one keeps
serving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import Settings
from pipeline.models.registered import MODEL_URI, resolve
from pipeline.serving.payload import InputShape

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    model: Any
    """Pixels ``(n, *input_shape)`` in [0, 1] -> probabilities ``(n, classes)``: a torch module,
    or an :class:`~pipeline.models.onnx_runtime.OnnxClassifier` for the ONNX runtimes."""
    metadata: dict[str, Any]
    device: str = "cpu"
    runtime: str = "torch"

    @property
    def version(self) -> str:
        return self.metadata["version"]

    @property
    def input_shape(self) -> InputShape:
        """``(channels, height, width)`` of the images this version takes."""
        channels, height, width = self.metadata["input_shape"]
        return int(channels), int(height), int(width)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        if self.runtime != "torch":
            return self.model(pixels)
        import torch

        with torch.inference_mode():  # no autograd bookkeeping
            return self.model(torch.from_numpy(pixels).to(self.device)).cpu().numpy()


def load(model_uri: str, settings: Settings, runtime: str = "torch") -> ServedModel:
    """The version behind ``model_uri`` in ``runtime``; torch on the GPU when there is one."""
    import torch

    from pipeline.models.registered import load_registered

    metadata = resolve(model_uri, settings)
    if runtime != "torch":  # the version's ONNX or INT8 variant, refused unless it passed its checks
        from pipeline.models.registered import load_variant
        from pipeline.training.hardware import usable_cpus

        variant = load_variant(metadata["model_name"], metadata["version"], runtime, settings, usable_cpus())
        served_metadata = {**metadata, "model_uri": model_uri, "device": "cpu", "runtime": runtime}
        return ServedModel(model=variant, metadata=served_metadata, runtime=runtime)
    model = load_registered(f"models:/{metadata['model_name']}/{metadata['version']}")
    served = ServedModel(
        model=model, metadata={**metadata, "model_uri": model_uri, "device": "cpu", "runtime": runtime}
    )
    if torch.cuda.is_available():
        # Full float32 on the GPU too: TF32 convolutions would move probabilities by about 1e-3,
        # beyond what infra validation accepts between served and offline answers.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            on_gpu = ServedModel(model=model.to("cuda"), metadata={**served.metadata, "device": "cuda"}, device="cuda")
            on_gpu.predict(np.zeros((1, *served.input_shape), dtype=np.float32))  # fails here, not on a request
            return on_gpu
        except (RuntimeError, NotImplementedError) as exc:  # an exported program with CPU-only constants
            log.warning("%s: serving on the CPU, the program does not run on the GPU: %s", model_uri, _one_line(exc))
            model.to("cpu")
    return served


def _one_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


class ModelSlot:
    """The current :class:`ServedModel`; empty until the first load."""

    def __init__(
        self, model_uri: str, on_swap: Callable[[ServedModel], None] | None = None, runtime: str = "torch"
    ) -> None:
        self.model_uri = model_uri
        self.runtime = runtime
        self.current: ServedModel | None = None
        self.error: str | None = None
        """Why the first load failed (the endpoint then never becomes ready)."""
        self.ready = threading.Event()
        self._on_swap = on_swap

    def swap(self, served: ServedModel) -> None:
        previous, self.current = self.current, served  # one reference assignment: atomic for readers
        self.ready.set()
        if self._on_swap:
            self._on_swap(served)
        log.info(
            "serving %s version %s%s",
            served.metadata["model_name"],
            served.version,
            f" (was {previous.version})" if previous else "",
        )

    def load_first(self, settings: Settings) -> None:
        try:
            self.swap(load(self.model_uri, settings, self.runtime))
        except Exception as exc:  # whatever broke, /ready says so and `pipeline serve` exits non-zero
            self.error = _one_line(exc)
            log.error("%s: could not load the model: %s", self.model_uri, self.error)

    def follows_alias(self) -> bool:
        match = MODEL_URI.match(self.model_uri)
        return bool(match and match["alias"])

    def watch(
        self, settings: Settings, poll_s: float, stop: threading.Event, on_reload: Callable[[str], None] | None = None
    ) -> None:
        """Until ``stop``: every ``poll_s`` seconds, reload when the alias points elsewhere."""
        failed: str | None = None  # a version that would not load: not downloaded again and again
        while not stop.wait(poll_s):
            if self.current is None:
                continue
            target = None
            try:
                target = resolve(self.model_uri, settings)["version"]
                if target in (self.current.version, failed):
                    continue
                self.swap(load(self.model_uri, settings, self.runtime))
                result = "swapped"
            except Exception as exc:  # keep serving the old version; the next move of the alias is tried
                log.error("%s: staying on version %s: %s", self.model_uri, self.current.version, _one_line(exc))
                failed = target  # None when the registry could not be asked: ask again next time
                result = "failed"
            if on_reload:
                on_reload(result)
