"""Validate: the data gate. The raw dataset is read in its layout and decoded once
(:mod:`pipeline.data.dataset`: an unreadable image stops here, or is quarantined when the
settings allow), its spec found, and Great Expectations suites from ``expectations/`` (the
dataset's own in ``expectations/<name>/`` when committed; the generic ones, their bounds fitted
to the spec, otherwise) check the profile tables of :mod:`pipeline.data.profile`; a failure
stops the run (the runner: :mod:`pipeline.data.expectations`).

The suites are reviewed JSON files loaded at run time, one per checked table. Reports are kept
with the data under ``reports/<dataset_hash>/``: GX Data Docs pages (HTML, one per suite),
GX's validation results (JSON) and the profile table (Parquet, the drift reference). They are
written before the verdict, so a failed gate still leaves its evidence; then
:class:`~pipeline.errors.DataValidationError` names the suite, the expectation and the offending
values.

Returns a :class:`~pipeline.refs.ValidationRef`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import IDX_FILES
from pipeline.data.dataset import load_dataset, reading_of
from pipeline.data.expectations import (
    data_docs_html,
    ephemeral_context,
    failure_error,
    load_suite,
    run_suite,
    suite_path,
)
from pipeline.data.profile import dataset_facts, near_duplicate_fraction, near_duplicates, profile_table
from pipeline.errors import ReferenceNotFoundError
from pipeline.refs import RawDatasetRef, ValidationRef
from pipeline.storage import Storage

log = logging.getLogger(__name__)

#: suite name -> the table it checks; the suite file is ``expectations/<name>.json``.
RAW_SUITES = ("raw_profile", "raw_dataset")
#: Written only when every suite passed.
PASSED = "passed.json"
SPLITS = ("train", "test")
KINDS = ("images", "labels")


def _index_html(
    dataset_hash: str,
    outcomes: dict[str, bool],
    statistics: dict[str, Any],
    spec: dict[str, Any],
    quarantined: list[dict[str, Any]],
) -> str:
    from html import escape

    rows = "".join(
        f"<tr><td><a href='{name}.html'>{name}</a></td><td>{'passed' if ok else 'FAILED'}</td></tr>"
        for name, ok in outcomes.items()
    )
    stats = "".join(f"<tr><td>{escape(str(k))}</td><td>{escape(str(v))}</td></tr>" for k, v in statistics.items())
    facts = {k: v for k, v in spec.items() if k != "counts"}
    about = "".join(f"<tr><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>" for k, v in facts.items())
    counts = "".join(
        f"<tr><td>{escape(name)}</td>"
        + "".join(f"<td>{spec['counts'][s][name]}</td>" for s in spec["counts"])
        + "</tr>"
        for name in spec.get("classes", [])
    )
    quarantine = "".join(
        f"<tr><td>{escape(q['path'])}</td><td>{escape(q['split'])}</td><td>{escape(q['class'])}</td>"
        f"<td>{escape(q['problem'])}</td></tr>"
        for q in quarantined
    )
    return (
        f"<html><head><title>Data report {dataset_hash}</title></head><body>"
        f"<h1>Data report for dataset {dataset_hash}</h1><h2>Suites</h2><table border=1>{rows}</table>"
        f"<h2>Dataset</h2><table border=1>{about}</table>"
        f"<h2>Images per class</h2><table border=1><tr><th>class</th>"
        + "".join(f"<th>{escape(s)}</th>" for s in spec.get("counts", {}))
        + f"</tr>{counts}</table>"
        f"<h2>Quarantined images ({len(quarantined)})</h2>"
        + (
            f"<table border=1><tr><th>file</th><th>split</th><th>class</th><th>problem</th></tr>{quarantine}</table>"
            if quarantined
            else "<p>None: every image was read.</p>"
        )
        + f"<h2>Facts</h2><table border=1>{stats}</table>"
        "<p>Validation results: <a href='validation.json'>validation.json</a>; "
        "per-image profile: profile.parquet.</p></body></html>"
    )


def suites_fingerprint(
    names: tuple[str, ...] = RAW_SUITES, directory: Path | None = None, reading: dict[str, Any] | None = None
) -> str:
    """Hash of the suite files that apply and of the reading settings: a report is only valid
    for the suites (and the decoded data) that produced it."""
    reading = reading or {}
    digest = hashlib.sha256(json.dumps(reading, sort_keys=True).encode() if reading else b"")
    for name in sorted(names):
        path = suite_path(name, directory, reading.get("dataset_name", ""))
        digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def report_prefix(dataset_hash: str, directory: Path | None = None, reading: dict[str, Any] | None = None) -> str:
    return f"reports/{dataset_hash}/suites-{suites_fingerprint(directory=directory, reading=reading)}"


def validate_raw(raw: RawDatasetRef, storage: Storage, directory: Path | None = None) -> ValidationRef:
    """Check the raw dataset against the raw suites; raise on the first failed suite.

    Reports live under ``reports/<dataset_hash>/suites-<hash of the suite files>/``, so a report
    never outlives the suites it was made with, and the same data checked by the same suites is
    not checked again."""
    prefix = report_prefix(raw.dataset_hash, directory, reading_of(raw))
    if storage.exists(f"{prefix}/{PASSED}"):
        log.info("data already validated by these suites: %s", storage.uri(f"{prefix}/index.html"))
        return ValidationRef.from_dict(storage.get_json(f"{prefix}/{PASSED}"))

    dataset = load_dataset(raw, storage)
    splits, spec = dataset.splits, dataset.spec
    suites = {name: load_suite(name, directory, spec) for name in RAW_SUITES}
    profile = profile_table(splits)
    near = dict(zip(("train", "test"), near_duplicates(splits["train"][0], splits["test"][0]), strict=True))
    facts = dataset_facts(
        profile,
        extra={
            split: {
                "near_overlap_fraction": float(near[split].mean()),
                "near_duplicate_fraction": near_duplicate_fraction(splits[split][0]),
            }
            for split in ("train", "test")
        },
    )
    tables = {"raw_profile": profile, "raw_dataset": facts}
    context = ephemeral_context()
    validations = {name: run_suite(context, suites[name], tables[name], name) for name in RAW_SUITES}
    outcomes = {name: bool(v.success) for name, v in validations.items()}
    statistics: dict[str, Any] = {
        f"{row['split']}_{key}": value
        for row in facts.to_dict("records")
        for key, value in row.items()
        if key != "split"
    }

    profile_key = f"reports/{raw.dataset_hash}/profile.parquet"  # depends on the data only
    if storage.exists(profile_key):
        profile_uri = storage.uri(profile_key)
    else:
        with tempfile.TemporaryDirectory(prefix="validate-") as tmp:
            profile.to_parquet(Path(tmp) / "profile.parquet", index=False)
            profile_uri = storage.put_file(Path(tmp) / "profile.parquet", profile_key)
    for name, validation in validations.items():
        storage.put_bytes(data_docs_html(validation).encode(), f"{prefix}/{name}.html")
    results_uri = storage.put_json({n: v.to_json_dict() for n, v in validations.items()}, f"{prefix}/validation.json")
    page = _index_html(raw.dataset_hash, outcomes, statistics, spec.to_dict(), dataset.quarantined)
    report_uri = storage.put_bytes(page.encode(), f"{prefix}/index.html")
    if dataset.quarantined:
        storage.put_json(dataset.quarantined, f"{prefix}/quarantine.json")
    log.info("data report: %s", report_uri)

    files = IDX_FILES if raw.layout == "idx" else {f"{s}_{k}": f"the {s} split's {k}" for s in SPLITS for k in KINDS}
    for name in RAW_SUITES:
        if not outcomes[name]:
            raise failure_error(name, validations[name], tables[name], files)
    ref = ValidationRef(
        dataset_hash=raw.dataset_hash,
        report_uri=report_uri,
        results_uri=results_uri,
        profile_uri=profile_uri,
        suites=outcomes,
        statistics=statistics,
        report_prefix=prefix,
        spec=spec.to_dict(),
    )
    storage.put_json(ref.to_dict(), f"{prefix}/{PASSED}")
    return ref


def load_validation_ref(storage: Storage, dataset_hash: str) -> ValidationRef:
    """The passing validation of a dataset by the current suites, read with the default reading
    settings (for CLI subcommands, as :func:`~pipeline.data.acquire.load_raw_ref` reads it)."""
    from pipeline.data.acquire import load_raw_ref

    try:
        reading = reading_of(load_raw_ref(storage, dataset_hash))
    except ReferenceNotFoundError:
        reading = None
    key = f"{report_prefix(dataset_hash, reading=reading)}/{PASSED}"
    if not storage.exists(key):
        raise ReferenceNotFoundError(
            f"dataset {dataset_hash}", "a validation passed with the current suites", "none; run 'pipeline validate'"
        )
    return ValidationRef.from_dict(storage.get_json(key))
