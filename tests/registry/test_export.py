"""The ONNX and INT8 variants of a registered version (pipeline.registry.export): stored with
the version's run, scored on the whole test split against the float model, judged by the
gate's variant policy, and refused (tagged, kept for inspection) when a broken calibration set
ruins the INT8 model. A small real training, evaluation and registration, shared."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from recipes import SMALL_RECIPE, prepare_small

from pipeline.config import GatePolicy, TrainConfig
from pipeline.data.processed import load_split
from pipeline.errors import GateFailedError
from pipeline.evaluation.evaluate import evaluate
from pipeline.models.export import predict_probabilities
from pipeline.models.onnx_runtime import OnnxClassifier
from pipeline.models.registered import load_registered
from pipeline.registry.export import export_variants
from pipeline.registry.gate import gate
from pipeline.registry.register import register
from pipeline.storage import storage_for
from pipeline.tracking import tracking_client
from pipeline.training.fit import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def version(module_settings, small_dataset):
    settings = module_settings
    storage = storage_for(settings)
    prepared = prepare_small(storage, small_dataset)
    result = train(prepared.processed, storage, TrainConfig(**SMALL_RECIPE, epochs=2, batch_size=64), settings)
    evaluation = evaluate(result, prepared.processed, storage, settings)
    ref = register(result, evaluation, prepared.validation, prepared.processed, storage, settings)
    return {"settings": settings, "storage": storage, "processed": prepared.processed, "ref": ref}


def variant_tags(client, ref, variant: str) -> dict[str, str]:
    found = client.get_model_version(ref.model_name, ref.version).tags
    return {key.rsplit(".", 1)[1]: value for key, value in found.items() if key.startswith(f"export.{variant}.")}


def test_the_variants_are_stored_with_the_run_tagged_and_answer_like_the_float_model(version, tmp_path):
    settings, storage, processed, ref = version["settings"], version["storage"], version["processed"], version["ref"]
    result = export_variants(ref, processed, storage, settings, GatePolicy())
    client = tracking_client(settings)
    images, labels = load_split(processed, storage, "test")
    float_classes = predict_probabilities(load_registered(ref.model_uri), images).argmax(axis=1)
    assert result.test_images == len(labels)
    assert result.calibration_images == len(load_split(processed, storage, "val")[1])  # all of it, under 512

    reports = {report["name"]: report for report in result.variants}
    for variant, report in reports.items():
        tags = variant_tags(client, ref, variant)
        assert tags["artifact"] == report["artifact"] and int(tags["bytes"]) == report["bytes"]
        assert tags["verdict"] == ("passed" if not report["reasons"] else "failed: " + "; ".join(report["reasons"]))
        # What is stored is what was scored: the run's file gives the reported classes.
        stored = Path(client.download_artifacts(ref.run_id, report["artifact"], str(tmp_path)))
        classes = OnnxClassifier(stored).predict_probabilities(images).argmax(axis=1)
        assert float(tags["agreement"]) == pytest.approx((classes == float_classes).mean(), abs=5e-5)
        assert float(tags["test_accuracy"]) == pytest.approx((classes == labels).mean(), abs=5e-5)
        metrics = client.get_run(ref.run_id).data.metrics
        assert metrics[f"{variant}_agreement"] == report["agreement"]

    # ONNX float32 is the same model; INT8 about a third of its size (a quarter for the default
    # network: the per-channel scales weigh more in this small one) and nearly the same answers.
    assert reports["onnx"]["agreement"] == 1.0 and reports["onnx"]["reasons"] == []
    assert reports["onnx_int8"]["bytes"] < 0.4 * reports["onnx"]["bytes"]
    # This model is two epochs on a small sample (about 0.7 accuracy): many of its answers are near
    # ties, which INT8 rounding flips (0.94 seen on one CI machine).
    assert reports["onnx_int8"]["agreement"] >= 0.9
    signature = json.loads(
        Path(client.download_artifacts(ref.run_id, "onnx/signature.json", str(tmp_path))).read_text()
    )
    assert signature["inputs"][0]["shape"] == [-1, 1, 28, 28] and signature["classes"] == list(processed.classes)

    # A second export of the same version reads what the first stored.
    assert export_variants(ref, processed, storage, settings, GatePolicy()) == result


def test_a_broken_calibration_set_fails_the_int8_variant_tagged_with_why_and_the_gate_may_require_it(version):
    settings, storage, processed, ref = version["settings"], version["storage"], version["processed"], version["ref"]
    black = np.zeros((64, 1, 28, 28), dtype=np.float32)  # every activation range collapses to zero
    result = export_variants(ref, processed, storage, settings, GatePolicy(), calibration=black, force=True)
    reports = {report["name"]: report for report in result.variants}
    assert reports["onnx"]["reasons"] == []
    int8 = variant_tags(tracking_client(settings), ref, "onnx_int8")
    assert int8["verdict"].startswith("failed: test accuracy ")
    assert "below the float model's" in int8["verdict"] and "top-1 agreement with the float model" in int8["verdict"]
    assert float(int8["agreement"]) < 0.5
    assert variant_tags(tracking_client(settings), ref, "onnx")["verdict"] == "passed"

    # The float model's promotion goes on, unless the policy requires every variant to pass.
    assert gate(ref, processed, storage, settings, GatePolicy(min_accuracy=0)).passed
    with pytest.raises(GateFailedError, match="onnx_int8 variant failed: test accuracy"):
        gate(ref, processed, storage, settings, GatePolicy(min_accuracy=0, require_variants=True))


def test_pipeline_export_prints_each_variant_its_size_accuracy_and_verdict(version, capsys):
    from pipeline.entrypoints.cli import main

    ref = version["ref"]
    export_variants(ref, version["processed"], version["storage"], version["settings"], GatePolicy())
    assert main(["export", "--version", ref.version]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{ref.model_name} v{ref.version}: float model (pt2) ")
    assert [line.split()[0] for line in lines[1:]] == ["onnx", "onnx_int8"]
    assert all(
        " kB  accuracy 0." in line and "agreement " in line and f"in run {ref.run_id})" in line for line in lines[1:]
    )
    assert main(["export", "--version", "99"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_served_in_int8_the_version_passes_infra_validation_against_its_own_variant(version, monkeypatch):
    from pipeline.registry.history import alias_version
    from pipeline.registry.infra_validate import PROBABILITY_TOLERANCE, infra_validate

    settings, storage, processed, ref = version["settings"], version["storage"], version["processed"], version["ref"]
    gate(ref, processed, storage, settings, GatePolicy(min_accuracy=0))
    # Whatever the small model's INT8 verdict, the check below needs a served one: judged loosely.
    export_variants(
        ref,
        processed,
        storage,
        settings,
        GatePolicy(variant_min_agreement=0.8, variant_max_accuracy_drop=0.05),
        force=True,
    )
    monkeypatch.setenv("PIPELINE_SERVE_RUNTIME", "onnx-int8")
    result = infra_validate(ref, processed, storage, settings, "test")
    assert result.runtime["name"] == "onnx-int8"
    assert result.runtime["max_probability_difference"] <= PROBABILITY_TOLERANCE
    assert result.runtime["agreement_with_float"] >= 0.9
    tags = tracking_client(settings).get_model_version(ref.model_name, ref.version).tags
    assert tags["infra_validation"] == "passed" and float(tags["infra.onnx-int8.agreement_with_float"]) >= 0.9
    assert alias_version(tracking_client(settings), ref.model_name, "staging") == ref.version


def test_a_variant_that_failed_its_checks_is_not_served(version):
    from services import run_cli

    settings, storage, processed, ref = version["settings"], version["storage"], version["processed"], version["ref"]
    black = np.zeros((64, 1, 28, 28), dtype=np.float32)
    export_variants(ref, processed, storage, settings, GatePolicy(), calibration=black, force=True)
    served = run_cli(
        "serve", "--model-uri", f"models:/{ref.model_name}/{ref.version}", "--runtime", "onnx-int8", "--port", "0"
    )
    assert served.returncode == 2, served.stderr[-2000:]
    line = served.stderr.strip().splitlines()[-1]  # the one-line error (the server logged it before)
    assert f"{ref.model_name} version {ref.version}: expected an onnx_int8 variant that passed its checks" in line
    assert "found failed: test accuracy" in line
