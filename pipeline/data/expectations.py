"""The Great Expectations runner every data check uses (the raw data gate, the processed splits,
a drift batch): suites loaded from the reviewed JSON files shipped as ``pipeline.suites``, run
on pandas tables in an in-memory context, and a failure turned into one line naming the suite,
the expectation and the offending values."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import IDX_FILES
from pipeline.errors import ConfigError, DataValidationError
from pipeline.refs import DatasetSpec


def suites_dir() -> Path:
    """The Great Expectations suites: ``expectations/`` of the checkout, shipped in the package
    as ``pipeline.suites`` (found the same way installed or editable)."""
    from importlib.resources import files

    return Path(str(files("pipeline.suites")))


def suite_path(name: str, directory: Path | None = None, dataset: str = "") -> Path:
    """``<directory>/<dataset>/<name>.json`` when the team committed a suite for its dataset,
    else the generic ``<directory>/<name>.json``."""
    base = directory or suites_dir()
    own = base / dataset / f"{name}.json"
    return own if dataset and own.is_file() else base / f"{name}.json"


def fit_to_spec(expectations: list[dict[str, Any]], dataset: DatasetSpec) -> list[dict[str, Any]]:
    """The expectations with the bounds their ``meta.from_spec`` names taken from the dataset's
    spec: ``classes`` (label ids 0..n-1), ``n_classes``, ``height``, ``width``, and
    ``class_share`` (each class between half and twice an even share, 1/n)."""
    n = len(dataset.classes)
    fitted = []
    for expectation in expectations:
        kwargs = dict(expectation.get("kwargs", {}))
        source = expectation.get("meta", {}).get("from_spec")
        if source == "classes":
            kwargs["value_set"] = list(range(n))
        elif source in ("height", "width"):
            kwargs["min_value"] = kwargs["max_value"] = getattr(dataset, source)
        elif source == "n_classes":
            kwargs["min_value"] = kwargs["max_value"] = n
        elif source == "class_share":
            kwargs.update(
                {"min_value": round(0.5 / n, 6)}
                if "min_value" in kwargs
                else {"max_value": round(min(1.0, 2.0 / n), 6)}
            )
        elif source is not None:
            raise ConfigError(
                f"expectation {expectation.get('type')}",
                "meta.from_spec among classes, n_classes, height, width, class_share",
                repr(source),
            )
        fitted.append({**expectation, "kwargs": kwargs})
    return fitted


def load_suite(name: str, directory: Path | None = None, dataset: DatasetSpec | None = None) -> Any:
    """Load ``<directory>/<name>.json`` (or the dataset's own, :func:`suite_path`) as a GX
    ``ExpectationSuite``, its spec-bound expectations fitted to ``dataset``; refuse a partial load."""
    import great_expectations as gx

    path = suite_path(name, directory, dataset.name if dataset else "")
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(str(path), "a readable JSON expectation suite", str(exc)) from exc
    if dataset is not None:
        spec["expectations"] = fit_to_spec(spec["expectations"], dataset)
    try:
        suite = gx.ExpectationSuite(name=spec["name"], expectations=spec["expectations"], meta=spec.get("meta"))
    except Exception as exc:  # GX raises pydantic and its own errors alike; all mean a bad file
        first = str(exc).strip().splitlines()
        raise ConfigError(
            str(path), "a valid expectation suite", f"{type(exc).__name__}: {' '.join(first[:3])}"
        ) from exc
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
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
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
            found = ", ".join(
                f"split {s}: {column}={float(v):.4g}" for s, v in zip(bad["split"], bad[column], strict=True)
            )
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
