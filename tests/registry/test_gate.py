"""The promotion policy, number by number (pipeline.registry.gate.decide and score)."""

from __future__ import annotations

import numpy as np

from pipeline.config import GatePolicy
from pipeline.registry.gate import ModelScore, decide, score, variant_reasons

CLASSES = ["a", "b"]
POLICY = GatePolicy(min_accuracy=0.8, max_accuracy_drop=0.01, max_class_drop=0.05)


def model(version: str, accuracy: float, a: float, b: float) -> ModelScore:
    return ModelScore(version=version, accuracy=accuracy, class_recall={"a": a, "b": b})


def test_score_counts_accuracy_and_recall_per_class():
    labels = np.array([0, 0, 1, 1])
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6]])
    result = score("7", probabilities, labels, CLASSES)
    assert result.accuracy == 0.75 and result.class_recall == {"a": 0.5, "b": 1.0}


def test_without_production_only_the_floor_applies():
    assert decide(model("1", 0.85, 0.5, 1.0), None, POLICY) == []
    [reason] = decide(model("1", 0.79, 0.8, 0.8), None, POLICY)
    assert reason == "test accuracy 0.7900 below the floor 0.8000"


def test_a_small_drop_within_the_tolerance_passes_a_larger_one_fails():
    production = model("1", 0.90, 0.90, 0.90)
    assert decide(model("2", 0.895, 0.89, 0.90), production, POLICY) == []
    [reason] = decide(model("2", 0.88, 0.88, 0.88), production, POLICY)
    assert reason.startswith("test accuracy 0.8800 is 0.0200 below production v1 (0.9000; tolerance 0.0100)")


def test_one_class_falling_beyond_its_tolerance_fails_even_when_the_total_improves():
    production = model("1", 0.90, 0.90, 0.90)
    [reason] = decide(model("2", 0.92, 0.84, 1.0), production, POLICY)
    assert reason.startswith("class a recall 0.8400 is 0.0600 below production (0.9000; tolerance 0.0500)")


def test_minimum_improvement_when_asked():
    production = model("1", 0.90, 0.90, 0.90)
    strict = GatePolicy(min_accuracy=0.8, max_accuracy_drop=0.01, max_class_drop=0.05, min_improvement=0.005)
    assert decide(model("2", 0.903, 0.9, 0.906), production, strict)[0].startswith("gain over production v1 +0.0030")
    assert decide(model("2", 0.91, 0.9, 0.92), production, strict) == []


def test_the_production_version_itself_is_not_compared_with_itself():
    same = model("3", 0.85, 0.8, 0.9)
    assert decide(same, same, POLICY) == []


def test_a_drop_exactly_at_the_tolerance_passes():
    """9,000 then 8,950 right of 10,000 is a drop of exactly 0.005 (not 0.00500000001)."""
    policy = GatePolicy(min_accuracy=0.8, max_accuracy_drop=0.005, max_class_drop=0.02)
    production = model("1", 9000 / 10000, 900 / 1000, 0.9)
    assert decide(model("2", 8950 / 10000, 880 / 1000, 0.9), production, policy) == []


def test_a_long_model_card_and_the_gate_verdict_fit_the_registry():
    """PostgreSQL-backed MLflow refuses a version description over 5,000 characters."""
    from pipeline.registry.register import DESCRIPTION_LIMIT, fit_description

    card, verdict = "card line\n" * 700, "\n\n## Promotion gate\n" + "| row |\n" * 150
    described = fit_description(card, verdict, "run123")
    assert len(described) == DESCRIPTION_LIMIT and described.endswith(verdict)
    assert "the whole card is evaluation/model_card.md in run run123" in described
    assert fit_description("short", verdict) == "short" + verdict


def test_a_variant_within_the_accuracy_tolerance_and_the_agreement_passes():
    policy = GatePolicy(variant_max_accuracy_drop=0.003, variant_min_agreement=0.99)
    assert variant_reasons(0.9300, 0.9270, 0.9900, policy) == []  # both exactly at their bar
    [reason] = variant_reasons(0.9300, 0.9260, 0.995, policy)
    assert reason == "test accuracy 0.9260 is 0.0040 below the float model's (0.9300; tolerance 0.0030)"
    [reason] = variant_reasons(0.9300, 0.9310, 0.985, policy)
    assert reason == "top-1 agreement with the float model 0.9850, below the required 0.9900"
