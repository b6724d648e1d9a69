"""ONNX variants of a served model, for CPUs and edge devices without PyTorch.

* :func:`export_onnx`: the served module (a loaded torch.export program, or a
  :class:`~pipeline.models.export.ServingModel`) as one ONNX file through torch.onnx's dynamo
  exporter, with a dynamic batch dimension; float32, the same answers to about 1e-6.
* :func:`quantize_int8`: that graph in INT8 by ONNX Runtime's static quantization: shape
  inference and graph optimisation first (``quant_pre_process``, which folds batch norm into the
  convolutions), then ``quantize_static`` in QDQ format with per-channel weights, calibrated on
  real images. Activations are unsigned and weights signed (U8S8), the pair x86's VNNI
  instructions multiply fastest.

Both are judged against the float model by :mod:`pipeline.registry.export`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from torch import nn

from pipeline.models.onnx_runtime import INPUT, OUTPUT

log = logging.getLogger(__name__)


def export_onnx(model: nn.Module, example: np.ndarray, path: Path) -> Path:
    """Write ``model`` (float32 pixels ``(n, c, h, w)`` -> probabilities; in eval mode, as a
    loaded pt2 program is) to ``path`` as ONNX, traced on ``example`` (a few real images: the
    batch dimension stays dynamic)."""
    import torch

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        torch.onnx.export(
            model,
            (torch.from_numpy(np.ascontiguousarray(example, dtype=np.float32)),),
            str(path),
            dynamo=True,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=({0: torch.export.Dim.AUTO},),
            external_data=False,  # one file, weights inside
            verbose=False,
        )
    return path


def _after_last_linear(model: Path) -> list[str]:
    """Names of the nodes after the graph's last Gemm or MatMul: what turns logits into
    probabilities (softmax, temperature, test-time flip averaging)."""
    import onnx

    nodes = onnx.load(str(model), load_external_data=False).graph.node  # topologically sorted
    last = max((i for i, node in enumerate(nodes) if node.op_type in ("Gemm", "MatMul")), default=len(nodes) - 1)
    tail = [node.name for node in nodes[last + 1 :]]
    if not all(tail):
        raise ValueError(f"{model}: expected named nodes after the last linear layer, found unnamed ones")
    return tail


class _Batches:
    """ONNX Runtime's calibration reader over float32 pixels, ``batch_size`` at a time."""

    def __init__(self, pixels: np.ndarray, batch_size: int) -> None:
        self._batches: Iterator[np.ndarray] = (
            pixels[start : start + batch_size] for start in range(0, len(pixels), batch_size)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT: batch}


def quantize_int8(float_model: Path, calibration: np.ndarray, path: Path, batch_size: int = 64) -> Path:
    """Write the INT8 version of the ONNX model ``float_model`` to ``path``, its activation
    ranges calibrated on ``calibration`` (float32 pixels ``(n, c, h, w)``, a few hundred real
    images of the training data's own validation split)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise ValueError("quantize_int8: expected calibration images, found none")

    class Reader(_Batches, CalibrationDataReader):
        pass

    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(float_model), str(prepared))
        quantize_static(
            str(prepared),
            str(path),
            Reader(np.ascontiguousarray(calibration, dtype=np.float32), batch_size),
            # The head stays float: quantized logits are fine, quantized probabilities are not
            # (a grid of 1/255 steps that no longer sums to one).
            nodes_to_exclude=_after_last_linear(prepared),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    return path
