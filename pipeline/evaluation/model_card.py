"""The model card: what the model is for, what it was trained and tested on, how well it does
overall and per class, where it fails, and how it was trained; one page to read before using it.

Built from the evaluation report (``evaluation/report.json``, see :mod:`pipeline.evaluation.evaluate`) and
the training run's parameters; :func:`model_card_sections` holds the content once, and
:func:`model_card_markdown` (the registered version's description) and :func:`model_card_html`
(a standalone page) render it. Pure functions: data in, text out. Every value from the data is
escaped, so a class name or a parameter cannot inject markup into either form.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

from pipeline.config import FASHION_MNIST_SHAPE


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    """Cells are written with ``str``."""


Block = str | list[str] | Table
"""A paragraph, a bulleted list or a table."""


@dataclass(frozen=True)
class Section:
    title: str
    blocks: list[Block]


def _f(value: float) -> str:
    return f"{value:.4f}"


def _intended_use(data: dict[str, Any]) -> Section:
    classes = data["classes"]
    channels, height, width = data.get("image_shape") or FASHION_MNIST_SHAPE  # reports from before the spec
    kind = {1: "grayscale", 3: "RGB"}.get(channels, f"{channels}-channel")
    name = data.get("dataset_name") or "its training"
    return Section(
        "Intended use",
        [
            f"Classifies {width}x{height} {kind} images like those of the {name} dataset it was trained on into one "
            f"of {len(classes)} classes: {', '.join(classes)}.",
            "Out of scope:",
            [
                f"Other image domains: images unlike the {name} data (another kind of picture, other objects, other "
                "classes). Images of another size or colour are refused by the endpoint; others get an answer with "
                "a class and a probability, which then mean nothing.",
                "Decisions about people.",
                "Decisions where a wrong class is costly and no person checks it: see the limitations below.",
            ],
        ],
    )


def _data(data: dict[str, Any]) -> Section:
    counts, removed = data["counts"], data["removed"]
    return Section(
        "Data",
        [
            Table(
                ("Item", "Value"),
                [
                    ("Dataset hash (raw files)", data["dataset_hash"]),
                    ("Processed-data hash", data["processed_hash"]),
                    *((f"{split.capitalize()} images", str(n)) for split, n in counts.items()),
                    ("Duplicate training images removed", str(removed.get("duplicates", 0))),
                    ("Training images removed because they are also in the test split", str(removed.get("leaked", 0))),
                ],
            ),
        ],
    )


def _metrics(report: dict[str, Any]) -> Section:
    overall, worst = report["overall"], report["worst_class"]
    return Section(
        "Metrics (test split)",
        [
            Table(
                ("Metric", "Value", "Meaning"),
                [
                    (
                        "Accuracy",
                        _f(overall["accuracy"]),
                        f"share of the {overall['test_images']} test images classified correctly "
                        f"(±{_f(overall['accuracy_margin_95'])} at 95% on another sample of this size)",
                    ),
                    (
                        "Macro F1",
                        _f(overall["macro_f1"]),
                        "mean of the per-class F1 scores: every class counts the same",
                    ),
                    (
                        "Expected calibration error",
                        _f(overall["ece"]),
                        f"mean gap between confidence and accuracy over {report['calibration']['bins']} confidence bins, "
                        "weighted by the images in each; 0 is perfectly calibrated"
                        + (
                            f" (logits divided by a temperature of {report['calibration']['temperature']:.3f}, fitted on the "
                            "validation split)"
                            if report["calibration"].get("temperature", 1.0) != 1.0
                            else ""
                        ),
                    ),
                    ("Worst-class recall gap", _f(worst["gap"]), "best per-class recall minus the worst"),
                ],
            ),
        ],
    )


def _per_class(report: dict[str, Any]) -> Section:
    worst = report["worst_class"]
    notes = {worst["class"]: "worst recall", worst["best_class"]: "best recall"}
    rows = [
        (name, _f(v["precision"]), _f(v["recall"]), _f(v["f1"]), str(v["support"]), notes.get(name, ""))
        for name, v in report["per_class"].items()
    ]
    disparity = (
        f"Disparity: {worst['class']} is the worst-served class (recall {_f(worst['recall'])}), "
        f"{worst['best_class']} the best (recall {_f(worst['best_recall'])}): a gap of {_f(worst['gap'])}."
    )
    if worst["best_recall"] < 1:
        ratio = (1 - worst["recall"]) / (1 - worst["best_recall"])
        disparity += (
            f" An image of {worst['class']} is missed {ratio:.1f} times as often as one of {worst['best_class']}."
        )
    return Section("Per class", [Table(("Class", "Precision", "Recall", "F1", "Support", "Note"), rows), disparity])


def _limitations(report: dict[str, Any]) -> Section:
    overall, mistakes = report["overall"], report["mistakes"]
    items = [
        f"{a} and {b} are confused {p['count']} times ({a} taken for {b} {p['first_as_second']}, {b} for {a} "
        f"{p['second_as_first']}): {p['share_of_mistakes']:.0%} of all {mistakes['count']} mistakes."
        for p in report["most_confused_pairs"][:3]
        for a, b in [p["classes"]]
    ]
    drift = overall["mean_confidence"] - overall["accuracy"]
    attitude = "over-confident" if drift > 0 else "under-confident"
    items.append(
        f"Calibration: mean confidence {_f(overall['mean_confidence'])} against accuracy {_f(overall['accuracy'])} "
        f"({attitude} by {_f(abs(drift))} on average; expected calibration error {_f(overall['ece'])}). "
        f"{mistakes['confident_count']} mistakes were made with a confidence of {mistakes['confident_threshold']} "
        "or more: a high probability is no guarantee."
    )
    items.append(
        f"Measured only on the distribution of the test split: {overall['test_images']} images from the same source "
        "and preprocessing as the training data. Accuracy on images from elsewhere (other cameras, backgrounds, "
        "framing, products) is unknown."
    )
    return Section("Limitations", [items])


def _figures() -> Section:
    return Section(
        "Figures (in the run's evaluation/ folder)",
        [
            [
                "confusion_matrix.png: true against predicted class.",
                "reliability_diagram.png: accuracy per confidence bin against the diagonal, with the images per bin.",
                "confident_mistakes.png: the wrong predictions made with the highest confidence.",
                "attributions.png: integrated-gradients maps of the pixels behind a few predictions.",
            ]
        ],
    )


def _configuration(params: dict[str, str]) -> Section:
    return Section("Training configuration", [Table(("Parameter", "Value"), sorted(params.items()))])


def model_card_sections(report: dict[str, Any], params: dict[str, str]) -> tuple[str, list[Section]]:
    """The card's title and sections from the evaluation report and the run's parameters."""
    architecture = params.get("architecture", "unknown architecture")
    overall = report["overall"]
    dataset = report["data"].get("dataset_name") or "image"
    title = f"Model card: {dataset} classifier ({architecture}), run {report['run_id']}"
    summary = (
        f"A {architecture} network trained by MLflow run {report['run_id']} on dataset "
        f"{report['data']['dataset_hash']}. On {overall['test_images']} test images: accuracy "
        f"{_f(overall['accuracy'])}, macro F1 {_f(overall['macro_f1'])}, expected calibration error {_f(overall['ece'])}."
    )
    return title, [
        Section("Summary", [summary]),
        _intended_use(report["data"]),
        _data(report["data"]),
        _metrics(report),
        _per_class(report),
        _limitations(report),
        _figures(),
        _configuration(params),
    ]


def _md(text: str) -> str:
    return html.escape(text, quote=False)


def _md_cell(text: str) -> str:
    return _md(text).replace("|", "\\|").replace("\n", " ")


def model_card_markdown(report: dict[str, Any], params: dict[str, str]) -> str:
    title, sections = model_card_sections(report, params)
    lines = [f"# {_md(title)}", ""]
    for section in sections:
        lines += [f"## {_md(section.title)}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
                lines.append("|" + " --- |" * len(block.header))
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            elif isinstance(block, list):
                lines += [f"- {_md(item)}" for item in block]
            else:
                lines.append(_md(block))
            lines.append("")
    return "\n".join(lines)


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }
th { background: #f3f3f3; }
td:not(:first-child) { font-variant-numeric: tabular-nums; }
"""


def model_card_html(report: dict[str, Any], params: dict[str, str]) -> str:
    title, sections = model_card_sections(report, params)
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{e(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<h2>{e(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Table):
                parts.append("<table>")
                parts.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in block.header) + "</tr>")
                parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block.rows]
                parts.append("</table>")
            elif isinstance(block, list):
                parts.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in block) + "</ul>")
            else:
                parts.append(f"<p>{e(block)}</p>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)
