"""Validate: the data gate. Great Expectations suites from ``expectations/`` check the profile
tables of :mod:`pipeline.profile`; a failure stops the run.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.acquire import load_raw_splits
from pipeline.config import IDX_FILES
from pipeline.errors import ConfigError, DataValidationError, ReferenceNotFoundError
from pipeline.profile import dataset_facts, near_duplicate_fraction, near_duplicates, profile_table
from pipeline.refs import RawDatasetRef, ValidationRef
from pipeline.storage import Storage

log = logging.getLogger(__name__)

#: suite name -> the table it checks; the suite file is ``expectations/<name>.json``.
RAW_SUITES = ("raw_profile", "raw_dataset")
#: Written only when every suite passed.
PASSED = "passed.json"


def suites_dir() -> Path:
    """The Great Expectations suites: ``expectations/`` of the checkout, shipped in the package
    as ``pipeline.suites`` (found the same way installed or editable)."""
    from importlib.resources import files

    return Path(str(files("pipeline.suites")))


def load_suite(name: str, directory: Path | None = None) -> Any:
    """Load ``<directory>/<name>.json`` as a GX ``ExpectationSuite``; refuse a partial load."""
    import great_expectations as gx

    path = (directory or suites_dir()) / f"{name}.json"
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(str(path), "a readable JSON expectation suite", str(exc)) from exc
    try:
        suite = gx.ExpectationSuite(name=spec["name"], expectations=spec["expectations"], meta=spec.get("meta"))
    except Exception as exc:  # GX raises pydantic and its own errors alike; all mean a bad file
        first = str(exc).strip().splitlines()
        raise ConfigError(str(path), "a valid expectation suite", f"{type(exc).__name__}: {' '.join(first[:3])}") from exc
    # GX logs and drops an invalid expectation instead of raising: a typo would silently weaken
    # the gate, so count what was loaded.
    if len(suite.expectations) != len(spec["expectations"]):
        raise ConfigError(
            str(path), f"{len(spec['expectations'])} valid expectations", f"{len(suite.expectations)} loadable"
        )
    return suite


def ephemeral_context() -> Any:
    """An in-memory GX context: suites come from the repo, results go to our storage."""
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    return context


def run_suite(context: Any, suite: Any, table: pd.DataFrame, table_name: str) -> Any:
    """Validate a DataFrame against a suite."""
    asset = context.data_sources.add_pandas(f"pipeline-{table_name}").add_dataframe_asset(table_name)
    batch = asset.add_batch_definition_whole_dataframe("whole").get_batch(batch_parameters={"dataframe": table})
    return batch.validate(suite, result_format={"result_format": "SUMMARY", "partial_unexpected_count": 5})


def _expected_text(kwargs: dict[str, Any]) -> str:
    column = kwargs.get("column")
    if "value_set" in kwargs:
        return f"{column} in {kwargs['value_set']}"
    if "min_value" in kwargs or "max_value" in kwargs:
        low, high = kwargs.get("min_value"), kwargs.get("max_value")
        return f"{column} in [{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}]"
    shown = {k: v for k, v in kwargs.items() if k not in ("batch_id", "column")}
    return f"{column or 'table'} {shown}"


def _found_text(result: dict[str, Any], table: pd.DataFrame) -> str:
    if "unexpected_count" in result:
        values = result.get("partial_unexpected_list", [])
        return f"{result['unexpected_count']} of {result.get('element_count', len(table))} rows outside, e.g. {values}"
    return f"observed {result.get('observed_value')}"


def failure_error(
    suite_name: str, validation: Any, table: pd.DataFrame, files: Mapping[str, str] = IDX_FILES
) -> DataValidationError:
    """The typed error for the first failed expectation of a validation result; ``files`` maps
    ``<split>_images`` and ``<split>_labels`` to the file names the message names."""
    failed = next(r for r in validation.results if not r.success)
    kwargs = dict(failed.expectation_config.kwargs)
    column = kwargs.get("column")
    found = _found_text(failed.result, table)
    has_bounds = any(k in kwargs for k in ("value_set", "min_value", "max_value"))
    if column in table.columns and "split" in table.columns and has_bounds:
        bad = table.loc[~_row_passes(table[column], kwargs)]
        if "index" in table.columns:  # one row per image: name the files that hold them
            kind = "labels" if column == "label" else "images"
            found += " in " + ", ".join(files[f"{s}_{kind}"] for s in sorted(set(bad["split"])))
        else:  # one row per split: show each offending split's value
            found = ", ".join(f"split {s}: {column}={float(v):.4g}" for s, v in zip(bad["split"], bad[column], strict=True))
    others = sum(1 for r in validation.results if not r.success) - 1
    if others:
        found += f" (and {others} more failed expectation{'s' if others > 1 else ''} in the report)"
    return DataValidationError(
        suite_name, f"{failed.expectation_config.type}({column or ''})", _expected_text(kwargs), found
    )


def _row_passes(values: pd.Series, kwargs: dict[str, Any]) -> pd.Series:
    if "value_set" in kwargs:
        return values.isin(kwargs["value_set"])
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    ok = values.notna()
    if low is not None:
        ok &= values >= low
    if high is not None:
        ok &= values <= high
    return ok


def data_docs_html(validation: Any) -> str:
    """GX's own Data Docs page for one validation result."""
    from great_expectations.render.renderer import ValidationResultsPageRenderer
    from great_expectations.render.view import DefaultJinjaPageView

    return DefaultJinjaPageView().render(ValidationResultsPageRenderer().render(validation))


def _index_html(dataset_hash: str, outcomes: dict[str, bool], statistics: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td><a href='{name}.html'>{name}</a></td><td>{'passed' if ok else 'FAILED'}</td></tr>"
        for name, ok in outcomes.items()
    )
    stats = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in statistics.items())
    return (
        f"<html><head><title>Data report {dataset_hash}</title></head><body>"
        f"<h1>Data report for dataset {dataset_hash}</h1><h2>Suites</h2><table border=1>{rows}</table>"
        f"<h2>Facts</h2><table border=1>{stats}</table>"
        "<p>Validation results: <a href='validation.json'>validation.json</a>; "
        "per-image profile: profile.parquet.</p></body></html>"
    )


def suites_fingerprint(names: tuple[str, ...] = RAW_SUITES, directory: Path | None = None) -> str:
    """Hash of the suite files: a report is only valid for the suites that produced it."""
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode() + b"\0" + ((directory or suites_dir()) / f"{name}.json").read_bytes())
    return digest.hexdigest()[:12]


def report_prefix(dataset_hash: str, directory: Path | None = None) -> str:
    return f"reports/{dataset_hash}/suites-{suites_fingerprint(directory=directory)}"


def validate_raw(raw: RawDatasetRef, storage: Storage, directory: Path | None = None) -> ValidationRef:
    """Check the raw dataset against the raw suites; raise on the first failed suite.

    Reports live under ``reports/<dataset_hash>/suites-<hash of the suite files>/``, so a report
    never outlives the suites it was made with, and the same data checked by the same suites is
    not checked again."""
    prefix = report_prefix(raw.dataset_hash, directory)
    if storage.exists(f"{prefix}/{PASSED}"):
        log.info("data already validated by these suites: %s", storage.uri(f"{prefix}/index.html"))
        return ValidationRef.from_dict(storage.get_json(f"{prefix}/{PASSED}"))

    suites = {name: load_suite(name, directory) for name in RAW_SUITES}
    splits = load_raw_splits(raw, storage)
    profile = profile_table(splits)
    near = dict(zip(("train", "test"), near_duplicates(splits["train"][0], splits["test"][0]), strict=True))
    facts = dataset_facts(profile, extra={
        split: {"near_overlap_fraction": float(near[split].mean()),
                "near_duplicate_fraction": near_duplicate_fraction(splits[split][0])}
        for split in ("train", "test")
    })
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
    report_uri = storage.put_bytes(_index_html(raw.dataset_hash, outcomes, statistics).encode(), f"{prefix}/index.html")
    log.info("data report: %s", report_uri)

    for name in RAW_SUITES:
        if not outcomes[name]:
            raise failure_error(name, validations[name], tables[name])
    ref = ValidationRef(
        dataset_hash=raw.dataset_hash,
        report_uri=report_uri,
        results_uri=results_uri,
        profile_uri=profile_uri,
        suites=outcomes,
        statistics=statistics,
        report_prefix=prefix,
    )
    storage.put_json(ref.to_dict(), f"{prefix}/{PASSED}")
    return ref


def load_validation_ref(storage: Storage, dataset_hash: str) -> ValidationRef:
    """The passing validation of a dataset by the current suites (for CLI subcommands)."""
    key = f"{report_prefix(dataset_hash)}/{PASSED}"
    if not storage.exists(key):
        raise ReferenceNotFoundError(
            f"dataset {dataset_hash}", "a validation passed with the current suites", "none; run 'pipeline validate'"
        )
    return ValidationRef.from_dict(storage.get_json(key))
