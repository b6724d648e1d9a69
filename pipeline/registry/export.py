"""Export: the ONNX and INT8 variants of a registered version, each judged against its float model.

For the version's registered pt2 program (the model that is served): an ONNX float32 model
(``onnx/model.onnx``) and an INT8 one (``onnx/model.int8.onnx``, calibrated on the first
``calibration_images`` images of the run's own validation split), both artifacts of the
version's run beside ``onnx/signature.json`` (input and output names, dtypes and shapes, the
classes) and ``onnx/variants.json`` (the numbers below). Each variant is scored on the whole
test split: its accuracy, and its top-1 agreement with the float model image by image. The
gate's variant policy (:func:`~pipeline.registry.gate.variant_reasons`) judges it; a variant
that fails is kept for inspection but not served.

The version's tags say it all: ``export.<variant>.bytes``, ``.test_accuracy``, ``.agreement``,
``.artifact`` and, last, ``.verdict`` (``passed``, or ``failed: <reasons>``), so that a version
carries a verdict only once its files are stored. A failed variant does not fail the stage (the
float model's promotion goes on); an export that cannot be made raises and tags nothing. A
version already exported is not exported again.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import GatePolicy, Settings
from pipeline.models.registered import variant_tag
from pipeline.refs import ModelVersionRef, ProcessedDatasetRef, Ref
from pipeline.registry.gate import variant_reasons
from pipeline.storage import Storage
from pipeline.tracking import tracking_client

log = logging.getLogger(__name__)

ARTIFACTS = "onnx"
VARIANT_FILES = {"onnx": "model.onnx", "onnx_int8": "model.int8.onnx"}
"""Each variant's name (as in its tags) and its file under the run's ``onnx/`` artifacts."""
CALIBRATION_IMAGES = 512


@dataclass(frozen=True)
class VariantReport(Ref):
    """One variant's numbers on the test split, against the float model of the same version."""

    name: str
    artifact: str
    """Its path among the run's artifacts (``onnx/model.onnx``)."""
    bytes: int
    test_accuracy: float
    agreement: float
    """Share of test images on which it gives the float model's class."""
    reasons: list[str]
    """Why it may not be served (empty when it passed)."""

    @property
    def passed(self) -> bool:
        return not self.reasons

    @property
    def verdict(self) -> str:
        return "passed" if self.passed else "failed: " + "; ".join(self.reasons)


@dataclass(frozen=True)
class ExportResult(Ref):
    model_name: str
    version: str
    run_id: str
    float_bytes: int
    """The registered pt2 program's size, for comparison."""
    float_accuracy: float
    test_images: int
    calibration_images: int
    variants: list[dict] = field(default_factory=list)
    """:class:`VariantReport` of each variant, as dicts."""


tag = variant_tag
"""The version tag holding ``key`` of ``variant`` (``export.onnx_int8.verdict``)."""


def exported(client: object, name: str, version: str) -> bool:
    """Whether the version carries every variant's verdict (the tags written last)."""
    tags = client.get_model_version(name, version).tags  # type: ignore[attr-defined]
    return all(tag(variant, "verdict") in tags for variant in VARIANT_FILES)


def signature(image_shape: tuple[int, int, int] | list[int], classes: list[str]) -> dict:
    """``signature.json``: what ``pipeline predict`` (and any ONNX Runtime client) needs to feed
    the model and name its answers."""
    from pipeline.models.onnx_runtime import INPUT, OUTPUT

    channels, height, width = image_shape
    return {
        "inputs": [{"name": INPUT, "type": "float32", "shape": [-1, channels, height, width], "range": [0, 1]}],
        "outputs": [{"name": OUTPUT, "type": "float32", "shape": [-1, len(classes)]}],
        "classes": list(classes),
    }


def export_variants(
    version: ModelVersionRef,
    processed: ProcessedDatasetRef,
    storage: Storage,
    settings: Settings,
    policy: GatePolicy,
    calibration_images: int = CALIBRATION_IMAGES,
    calibration: np.ndarray | None = None,
    force: bool = False,
) -> ExportResult:
    """Export, quantize, score and tag the variants of ``version``: once, unless ``force``.

    ``calibration`` (float32 pixels ``(n, c, h, w)``) replaces the validation images the INT8
    model is calibrated on."""
    from mlflow.artifacts import download_artifacts

    from pipeline.data.processed import load_split
    from pipeline.models.export import predict_probabilities
    from pipeline.models.onnx_runtime import OnnxClassifier, to_pixels
    from pipeline.models.onnx_variants import export_onnx, quantize_int8
    from pipeline.models.registered import PT2_FILE, load_registered

    client = tracking_client(settings)
    name, number = version.model_name, version.version
    if exported(client, name, number) and not force:
        log.info("%s version %s: its ONNX variants were exported before", name, number)
        return ExportResult.from_dict(
            json.loads(Path(client.download_artifacts(version.run_id, f"{ARTIFACTS}/variants.json")).read_text())
        )
    images, labels = load_split(processed, storage, "test")
    if calibration is None:
        calibration = to_pixels(load_split(processed, storage, "val")[0][:calibration_images])
    model = load_registered(version.model_uri)
    float_top1 = predict_probabilities(model, images).argmax(axis=1)
    float_accuracy = float((float_top1 == labels).mean())

    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        folder = Path(tmp) / ARTIFACTS
        folder.mkdir()
        pt2 = Path(download_artifacts(artifact_uri=version.model_uri, dst_path=f"{tmp}/pt2")) / "data" / PT2_FILE
        onnx_path = export_onnx(model, calibration[:4], folder / VARIANT_FILES["onnx"])
        quantize_int8(onnx_path, calibration, folder / VARIANT_FILES["onnx_int8"])
        reports = []
        for variant, file in VARIANT_FILES.items():
            top1 = OnnxClassifier(folder / file).predict_probabilities(images).argmax(axis=1)
            accuracy, agreement = float((top1 == labels).mean()), float((top1 == float_top1).mean())
            reports.append(
                VariantReport(
                    name=variant,
                    artifact=f"{ARTIFACTS}/{file}",
                    bytes=(folder / file).stat().st_size,
                    test_accuracy=accuracy,
                    agreement=agreement,
                    reasons=variant_reasons(float_accuracy, accuracy, agreement, policy),
                )
            )
        result = ExportResult(
            model_name=name,
            version=number,
            run_id=version.run_id,
            float_bytes=pt2.stat().st_size,
            float_accuracy=float_accuracy,
            test_images=len(labels),
            calibration_images=len(calibration),
            variants=[report.to_dict() for report in reports],
        )
        (folder / "signature.json").write_text(
            json.dumps(signature(processed.image_shape, list(processed.classes)), indent=2)
        )
        (folder / "variants.json").write_text(json.dumps(result.to_dict(), indent=2))
        client.log_artifacts(version.run_id, str(folder), ARTIFACTS)
    _record(client, result, reports)
    return result


def _record(client: object, result: ExportResult, reports: list[VariantReport]) -> None:
    """Metrics on the run, then the version's tags, each variant's verdict last."""
    for report in reports:
        metrics = {"bytes": float(report.bytes), "test_accuracy": report.test_accuracy, "agreement": report.agreement}
        for key, number in metrics.items():
            client.log_metric(result.run_id, f"{report.name}_{key}", number)  # type: ignore[attr-defined]
        tags = {
            tag(report.name, "artifact"): report.artifact,
            tag(report.name, "bytes"): str(report.bytes),
            tag(report.name, "test_accuracy"): f"{report.test_accuracy:.4f}",
            tag(report.name, "agreement"): f"{report.agreement:.4f}",
            tag(report.name, "verdict"): report.verdict[:4900],
        }
        for key, value in tags.items():
            client.set_model_version_tag(result.model_name, result.version, key, value)  # type: ignore[attr-defined]
        log.info(
            "%s version %s %s: %.1f kB (float pt2 %.1f kB), test accuracy %.4f (float %.4f), agreement %.4f: %s",
            result.model_name,
            result.version,
            report.name,
            report.bytes / 1e3,
            result.float_bytes / 1e3,
            report.test_accuracy,
            result.float_accuracy,
            report.agreement,
            report.verdict,
        )
