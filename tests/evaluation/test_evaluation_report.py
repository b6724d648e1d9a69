"""The evaluation report: calibration, worst class, confusions, attributions, figures and the model
card, first as pure functions on numbers worked out by hand, then logged by a real evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from recipes import SMALL_RECIPE

from pipeline.config import FASHION_MNIST_CLASSES, TrainConfig
from pipeline.evaluation.attributions import integrated_gradients
from pipeline.evaluation.evaluate import (
    ARTIFACTS,
    ATTRIBUTIONS,
    CONFUSION,
    MISTAKES,
    MODEL_CARD_HTML,
    MODEL_CARD_MD,
    RELIABILITY,
    REPORT,
    evaluate,
    predict,
)
from pipeline.evaluation.model_card import model_card_html, model_card_markdown
from pipeline.evaluation.report import (
    build_report,
    calibration_bins,
    confident_mistakes,
    expected_calibration_error,
    most_confused_pairs,
    worst_class,
)
from pipeline.models.classifier import ImageClassifier
from pipeline.tracking import tracking_client
from pipeline.training.fit import train

CLASSES = list(FASHION_MNIST_CLASSES)
PARAMS = {"architecture": "resnet_small", "epochs": "15", "learning_rate": "0.004", "augment": "True"}


def ece(confidence: list[float], correct: list[bool]) -> float:
    return expected_calibration_error(calibration_bins(np.array(confidence), np.array(correct)))


def test_ece_is_zero_when_confidence_matches_accuracy():
    # 0.8 confident and right 4 times in 5; 0.6 confident and right 3 times in 5.
    assert ece([0.8] * 5 + [0.6] * 5, [1, 1, 1, 1, 0, 1, 1, 1, 0, 0]) == pytest.approx(0.0, abs=1e-12)


def test_ece_is_the_error_rate_when_every_prediction_is_certain():
    assert ece([1.0] * 10, [1, 0] * 5) == pytest.approx(0.5)


def test_ece_weights_each_bin_by_its_share_of_predictions():
    # Bin (0.867, 0.933]: confidence 0.9, accuracy 1 -> gap 0.1; bin (0.267, 0.333]: 0.3 against 0 -> 0.3.
    # Each holds half of the predictions: 0.5 * 0.1 + 0.5 * 0.3 = 0.2.
    bins = calibration_bins(np.array([0.9, 0.9, 0.3, 0.3]), np.array([1, 1, 0, 0]))
    assert len(bins) == 15 and [b["count"] for b in bins if b["count"]] == [2, 2]
    assert bins[0]["lower"] == 0 and bins[-1]["upper"] == 1
    assert expected_calibration_error(bins) == pytest.approx(0.2)


def test_worst_class_and_gap_ignore_classes_without_test_images():
    per_class = {
        "Trouser": {"recall": 0.98, "support": 100},
        "Shirt": {"recall": 0.61, "support": 100},
        "Bag": {"recall": 0.90, "support": 100},
        "Coat": {"recall": 0.0, "support": 0},
    }
    assert worst_class(per_class) == {
        "class": "Shirt",
        "recall": 0.61,
        "best_class": "Trouser",
        "best_recall": 0.98,
        "gap": pytest.approx(0.37),
    }


def test_most_confused_pairs_add_both_directions():
    matrix = np.array([[50, 7, 1], [3, 40, 0], [0, 4, 45]])
    pairs = most_confused_pairs(matrix, ["A", "B", "C"])
    # 15 mistakes: A/B 7 + 3, B/C 0 + 4, A/C 1 + 0.
    assert [(p["classes"], p["count"]) for p in pairs] == [(["A", "B"], 10), (["B", "C"], 4), (["A", "C"], 1)]
    assert (pairs[0]["first_as_second"], pairs[0]["second_as_first"]) == (7, 3)
    assert pairs[0]["share_of_mistakes"] == pytest.approx(10 / 15)
    assert most_confused_pairs(matrix, ["A", "B", "C"], top=1) == pairs[:1]


def test_confident_mistakes_are_the_wrong_predictions_most_confident_first():
    probabilities = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3], [0.95, 0.05]])
    labels = np.array([0, 0, 0, 1, 1])
    assert confident_mistakes(probabilities, labels).tolist() == [4, 2, 3, 1]
    assert confident_mistakes(probabilities, labels, count=2).tolist() == [4, 2]


def synthetic_report(classes: list[str]) -> dict:
    """100 test images, 10 a class: right at 0.8 confidence except 4 Shirts taken for T-shirt/top
    at 0.95 and 1 Pullover taken for Coat at 0.6."""
    labels = np.repeat(np.arange(10), 10)
    predicted = labels.copy()
    predicted[60:64] = 0
    predicted[20] = 4
    confidence = np.full(100, 0.8)
    confidence[60:64], confidence[20] = 0.95, 0.6
    probabilities = np.full((100, 10), 0.0)
    probabilities[np.arange(100), predicted] = confidence
    probabilities[np.arange(100), (predicted + 1) % 10] = 1 - confidence
    report = build_report(probabilities, labels, classes)
    return {
        "run_id": "0123abcd",
        "data": {
            "dataset_hash": "feedc0ffee123456",
            "processed_hash": "abad1dea00000001",
            "counts": {"train": 900, "val": 100, "test": 100},
            "removed": {"duplicates": 3, "leaked": 2},
            "classes": classes,
            "dataset_name": "fashion-mnist",
            "image_shape": [1, 28, 28],
        },
        **report,
    }


def test_report_has_every_number():
    report = synthetic_report(CLASSES)
    assert report["overall"]["accuracy"] == pytest.approx(0.95)
    # Bins: 95 right at 0.8 (gap 0.2), 4 wrong at 0.95 (gap 0.95), 1 wrong at 0.6 (gap 0.6).
    assert report["overall"]["ece"] == pytest.approx((95 * 0.2 + 4 * 0.95 + 1 * 0.6) / 100)
    assert sum(b["count"] for b in report["calibration"]["table"]) == 100
    assert report["worst_class"]["class"] == "Shirt" and report["worst_class"]["gap"] == pytest.approx(0.4)
    assert report["most_confused_pairs"][0]["classes"] == ["T-shirt/top", "Shirt"]
    assert [m["index"] for m in report["mistakes"]["most_confident"]] == [60, 61, 62, 63, 20]
    assert report["mistakes"]["confident_count"] == 4
    assert report["per_class"]["Shirt"] == {"precision": 1.0, "recall": 0.6, "f1": pytest.approx(0.75), "support": 10}
    json.dumps(report)  # plain JSON, for report.json


def test_model_card_names_the_data_the_metrics_every_class_and_the_configuration():
    report = synthetic_report(CLASSES)
    for card in (model_card_markdown(report, PARAMS), model_card_html(report, PARAMS)):
        assert "feedc0ffee123456" in card and "abad1dea00000001" in card
        assert all(name in card for name in CLASSES)
        assert "0.9500" in card and f"{report['overall']['macro_f1']:.4f}" in card
        assert f"{report['overall']['ece']:.4f}" in card
        assert "Shirt is the worst-served class" in card and "a gap of 0.4000" in card
        assert "T-shirt/top and Shirt are confused 4 times" in card
        assert all(key in card and value in card for key, value in PARAMS.items())
        assert "28x28 grayscale images like those of the fashion-mnist dataset" in card
        assert "Decisions about people" in card
    markdown = model_card_markdown(report, PARAMS)
    assert markdown.startswith("# Model card: fashion-mnist classifier (resnet_small), run 0123abcd")
    assert "| T-shirt/top | 0.7143 | 1.0000 |" in markdown


def test_model_card_escapes_names_and_values():
    hostile = "<script>alert('x')</script>"
    classes = [*CLASSES[:9], hostile]
    report = synthetic_report(classes)
    params = {**PARAMS, "note": "a | b <b>bold</b> & more"}
    page = model_card_html(report, params)
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<td>T-shirt/top</td>" in page and "&lt;b&gt;bold&lt;/b&gt; &amp; more" in page
    markdown = model_card_markdown(report, params)
    assert "<script>" not in markdown and "<b>" not in markdown
    assert "| a \\| b &lt;b&gt;bold&lt;/b&gt; &amp; more |" in markdown


def test_integrated_gradients_are_complete():
    # A network whose output moves a lot between the black baseline and the image, so that the
    # check means something: resnet_small with its last layer scaled up (p changes by 0.84).
    torch.manual_seed(3)
    model = ImageClassifier(architecture="resnet_small", mean=0.29, std=0.35).eval()
    with torch.no_grad():
        model.net[-1].weight.mul_(30)
    images = np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8)
    probabilities = predict(model, images)
    targets = probabilities.argmax(axis=1)
    rows = np.arange(len(images))
    change = probabilities[rows, targets] - predict(model, np.zeros_like(images))[rows, targets]
    assert np.abs(change).min() > 0.8

    attributions, completeness = integrated_gradients(model, images, targets)
    assert attributions.shape == (8, 28, 28)
    # Completeness: attributions sum to f(image) - f(baseline) up to the quadrature error of the
    # path integral. The integrand is only piecewise smooth (ReLUs), so the error shrinks about as
    # 1/steps, not exponentially: here 0.006 at 32 steps, 0.004 at the stage's 64 (0.5% of the
    # change), 0.003 at 128; over 5 seeds and sharper networks, at most 0.01 at 64 steps.
    assert np.abs(attributions.sum(axis=(1, 2)) - change).max() < 0.01
    # The error the stage reports is that same quantity.
    np.testing.assert_allclose(completeness, attributions.sum(axis=(1, 2)) - change, atol=1e-5)


def test_figures_are_images(tmp_path):
    import matplotlib.image

    from pipeline.evaluation import figures

    report = synthetic_report(CLASSES)
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    figures.confusion_figure(np.array(report["confusion_matrix"]), CLASSES, tmp_path / "confusion.png")
    figures.reliability_figure(report["calibration"]["table"], report["overall"]["ece"], tmp_path / "reliability.png")
    figures.mistakes_figure(images, [f"image {i}" for i in range(5)], tmp_path / "mistakes.png")
    figures.mistakes_figure(images[:0], [], tmp_path / "none.png")
    figures.attribution_figure(images, images - 128.0, [f"image {i}" for i in range(5)], "method", tmp_path / "ig.png")
    for name in ("confusion", "reliability", "mistakes", "none", "ig"):
        pixels = matplotlib.image.imread(tmp_path / f"{name}.png")
        assert pixels.ndim == 3 and min(pixels.shape[:2]) > 200, name


@pytest.mark.slow
def test_evaluation_logs_the_report_figures_and_model_card(small_processed, settings, storage):
    import matplotlib.image

    processed = small_processed.processed
    trained = train(processed, storage, TrainConfig(**SMALL_RECIPE, epochs=1, batch_size=64), settings)
    evaluation = evaluate(trained, processed, storage, settings)

    client = tracking_client(settings)
    run_id = trained.run_id
    assert {a.path for a in client.list_artifacts(run_id, "evaluation")} == set(ARTIFACTS) == set(evaluation.artifacts)
    metrics = client.get_run(run_id).data.metrics
    assert 0 <= metrics["test_ece"] <= 1 and metrics["test_ece"] == pytest.approx(evaluation.ece)
    assert 0 <= metrics["test_worst_class_gap"] <= 1
    assert metrics["test_worst_class_gap"] == pytest.approx(evaluation.worst_class_gap)
    assert evaluation.worst_class in processed.classes

    for path in (CONFUSION, RELIABILITY, MISTAKES, ATTRIBUTIONS):
        pixels = matplotlib.image.imread(client.download_artifacts(run_id, path))
        assert pixels.ndim == 3 and pixels.shape[2] in (3, 4) and min(pixels.shape[:2]) > 200, path

    with open(client.download_artifacts(run_id, REPORT)) as f:
        report = json.load(f)
    assert sum(b["count"] for b in report["calibration"]["table"]) == processed.counts["test"]
    assert report["worst_class"]["class"] == evaluation.worst_class
    mistakes = report["mistakes"]["most_confident"]
    assert len(mistakes) == min(16, report["mistakes"]["count"]) and all(m["true"] != m["predicted"] for m in mistakes)
    assert [m["confidence"] for m in mistakes] == sorted((m["confidence"] for m in mistakes), reverse=True)
    assert len(report["attributions"]["images"]) == 8
    assert max(abs(a["completeness_error"]) for a in report["attributions"]["images"]) < 0.05

    with open(client.download_artifacts(run_id, MODEL_CARD_MD)) as f:
        card = f.read()
    assert processed.dataset_hash in card and "resnet_small" in card and run_id in card
    with open(client.download_artifacts(run_id, MODEL_CARD_HTML)) as f:
        assert processed.dataset_hash in f.read()

    # A rerun reads the same result back from the run.
    assert evaluate(trained, processed, storage, settings) == evaluation


def test_the_card_of_another_dataset_says_what_that_data_is_and_nothing_of_fashion_mnist():
    digits = [str(d) for d in range(10)]
    report = synthetic_report(digits)
    report["data"].update(dataset_name="digits", image_shape=[1, 8, 8])
    card = model_card_markdown(report, PARAMS)
    assert card.startswith("# Model card: digits classifier")
    assert "8x8 grayscale images like those of the digits dataset" in card and "0, 1, 2, 3" in card
    assert "fashion" not in card.lower() and "28x28" not in card
