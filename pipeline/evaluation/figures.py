"""The evaluation report's figures, each drawn to a PNG file that a person opens from the MLflow run.

* :func:`confusion_figure`: the confusion matrix with counts.
* :func:`reliability_figure`: accuracy per confidence bin against the diagonal, with bin counts.
* :func:`mistakes_figure`: a grid of test images, each titled with what went wrong.
* :func:`attribution_figure`: each image beside its attribution heat map.

Drawing only: arrays and labels in, a file out; the numbers are computed in
:mod:`pipeline.evaluation.report` and :mod:`pipeline.evaluation.attributions`. Matplotlib is
imported inside the functions, with the Agg backend (no display needed, as in an Airflow worker).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_figure(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j,
                i,
                int(matrix[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if matrix[i, j] > matrix.max() / 2 else "black",
            )
    ax.set_title("Confusion matrix (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reliability_figure(bins: list[dict[str, float]], ece: float, path: Path) -> None:
    """``bins`` as :func:`pipeline.evaluation.report.calibration_bins` returns them."""
    plt = _pyplot()
    lower = np.array([b["lower"] for b in bins])
    width = np.array([b["upper"] - b["lower"] for b in bins])
    counts = np.array([b["count"] for b in bins])
    accuracy = np.array([b["accuracy"] for b in bins])
    confidence = np.array([b["confidence"] for b in bins])
    filled = counts > 0

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(
        lower[filled],
        accuracy[filled],
        width=width[filled],
        align="edge",
        color="tab:blue",
        edgecolor="black",
        label="accuracy in the bin",
    )
    top.bar(
        lower[filled],
        (confidence - accuracy)[filled],
        bottom=accuracy[filled],
        width=width[filled],
        align="edge",
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        hatch="//",
        label="gap to the bin's mean confidence",
    )
    top.plot([0, 1], [0, 1], "k--", label="perfectly calibrated")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.05)
    top.set_ylabel("accuracy")
    top.set_title(f"Reliability diagram (test split): ECE {ece:.4f}, {len(bins)} bins")
    top.legend(loc="upper left", fontsize=8)

    bottom.bar(lower[filled], counts[filled], width=width[filled], align="edge", color="gray", edgecolor="black")
    for x, w, n in zip(lower[filled], width[filled], counts[filled], strict=True):
        bottom.text(x + w / 2, n, str(int(n)), ha="center", va="bottom", fontsize=7)
    bottom.set_yscale("log")
    bottom.set_ylim(0.8, max(int(counts.max()), 1) * 4)
    bottom.set_ylabel("images")
    bottom.set_xlabel("confidence (highest predicted probability)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def mistakes_figure(images: np.ndarray, titles: list[str], path: Path, columns: int = 4) -> None:
    """uint8 images ``(n, h, w)`` (or ``(n, h, w, 3)``) in a grid, each above its title; a note when there are none."""
    plt = _pyplot()
    rows = max(1, math.ceil(len(images) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles, strict=False):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=8)
    if not len(images):
        axes[0, 0].text(0, 0.5, "no mistakes on the test split", fontsize=12)
    fig.suptitle("Most confident mistakes (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def attribution_figure(
    images: np.ndarray, attributions: np.ndarray, titles: list[str], method: str, path: Path
) -> None:
    """Each uint8 image ``(h, w)`` (or ``(h, w, 3)``) beside its attribution map, two pairs a row. Red pixels raise
    the explained class's probability, blue ones lower it; each map has its own symmetric scale."""
    plt = _pyplot()
    pairs_per_row = 2
    rows = max(1, math.ceil(len(images) / pairs_per_row))
    fig, axes = plt.subplots(rows, 2 * pairs_per_row, figsize=(11, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (image, attribution, title) in enumerate(zip(images, attributions, titles, strict=True)):
        left, right = (
            axes[k // pairs_per_row, 2 * (k % pairs_per_row)],
            axes[k // pairs_per_row, 2 * (k % pairs_per_row) + 1],
        )
        left.imshow(image, cmap="gray", vmin=0, vmax=255)
        left.set_title(title, fontsize=8)
        scale = float(np.abs(attribution).max()) or 1.0
        right.imshow(attribution, cmap="RdBu_r", vmin=-scale, vmax=scale)
        right.set_title("attribution to the prediction", fontsize=8)
    fig.suptitle(method, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
