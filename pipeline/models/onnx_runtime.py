"""Running an ONNX variant of a registered model (float or INT8) with ONNX Runtime alone.

Nothing here imports torch: this is what a CPU server or an edge device without PyTorch needs
to answer with a model exported by :mod:`pipeline.models.onnx_variants` (``onnxruntime``,
``numpy``; ``pillow`` to read image files).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

INPUT, OUTPUT = "pixels", "probabilities"
"""The names of the graph's one input (float32 pixels in [0, 1], ``(n, c, h, w)``) and output."""


def to_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 images ``(n, h, w)`` or ``(n, h, w, c)`` -> the served model's float32 pixels in
    [0, 1], ``(n, c, h, w)``."""
    planes = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(planes, dtype=np.float32) / np.float32(255.0)


class OnnxClassifier:
    """An ONNX classifier on the CPU: float32 pixels ``(n, c, h, w)`` in, probabilities out.

    ``threads`` bounds ONNX Runtime's intra-op pool (default: one per core), so that several
    server workers on one machine do not oversubscribe it.
    """

    def __init__(self, model: Path | bytes, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        if threads:
            options.intra_op_num_threads = threads
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        [graph_input] = self.session.get_inputs()
        self.input_name = graph_input.name
        # (batch, channels, height, width); the batch dimension is symbolic.
        self.image_shape = tuple(int(d) for d in graph_input.shape[1:])

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(pixels, dtype=np.float32)})[0]

    def predict_probabilities(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Probabilities for uint8 images ``(n, h, w)`` or ``(n, h, w, c)``."""
        return np.concatenate(
            [self(to_pixels(images[start : start + batch_size])) for start in range(0, len(images), batch_size)]
        )
