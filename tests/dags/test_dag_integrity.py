"""Every DAG file: imports cleanly, costs nothing to parse, follows the house rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAG_FILES = sorted(p for p in (ROOT / "dags").glob("*.py") if not p.name.startswith("_"))  # _common.py: shared, no DAG
HEAVY = ("torch", "mlflow", "great_expectations", "pytorch_lightning", "lightning", "pandas", "boto3", "sklearn")
# Retry rules name pipeline exceptions (Airflow checks those names at parse time) and the Params
# are generated from the config fields: pipeline.errors and pipeline.config import nothing else;
# the approval step is an operator class, whose module imports the rest when the task runs.
ALLOWED_PIPELINE_MODULES = (
    "pipeline",
    "pipeline.errors",
    "pipeline.config",
    "pipeline.entrypoints",
    "pipeline.entrypoints.approval",
)

# Parse one DAG file with every socket and SQLite connection refused, then report what was attempted and which heavy modules got imported.
PARSE_PROBE = r"""
import json, socket, sqlite3, sys, runpy
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args[1:] if args else kwargs)[:80])
    raise OSError("network and database access is not allowed while parsing a DAG")
import airflow.sdk  # the SDK itself is allowed to load
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
sqlite3.connect = refuse
before = set(sys.modules)
runpy.run_path(sys.argv[1])
print(json.dumps({"attempts": attempts, "new_modules": sorted(set(sys.modules) - before)}))
"""


def test_there_are_dag_files():
    assert DAG_FILES, "no DAG files under dags/"


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_parsing_touches_no_db_network_or_heavy_module(path):
    out = subprocess.run([sys.executable, "-c", PARSE_PROBE, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["attempts"] == []
    new = set(report["new_modules"])
    assert not {m.split(".")[0] for m in new} & set(HEAVY), sorted(new)
    loaded = {m for m in new if m.split(".")[0] == "pipeline"}
    assert {m for m in loaded if m not in ALLOWED_PIPELINE_MODULES and not m.startswith("pipeline.config.")} == set()


@pytest.fixture(scope="module")
def dagbag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def test_every_dag_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert {Path(dag.fileloc).name for dag in dagbag.dags.values()} == {p.name for p in DAG_FILES}


def test_house_rules(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert dag.doc_md, f"{dag_id} has no doc_md"
        for task in dag.tasks:
            assert task.retries >= 1, f"{dag_id}.{task.task_id} has no retries"
            assert task.retry_exponential_backoff, f"{dag_id}.{task.task_id} retries without backoff"


def test_training_pipeline_graph_schedule_and_params(dagbag):
    dag = dagbag.get_dag("training_pipeline")
    order = ["acquire", "validate", "preprocess", "train", "evaluate", "register"]
    for upstream, downstream in zip(order, order[1:], strict=False):
        assert downstream in dag.get_task(upstream).downstream_task_ids
    # The optional search: after the data gate, one mapped trial per candidate, before train.
    assert dag.get_task("tune_setup").upstream_task_ids == {"acquire", "validate"}
    assert dag.get_task("tune_trial").upstream_task_ids == {"tune_setup"}
    assert dag.get_task("tune_choose").upstream_task_ids == {"tune_trial"}
    assert dag.get_task("train").upstream_task_ids == {"preprocess", "tune_choose"}
    assert dag.get_task("tune_choose").trigger_rule == "none_failed"
    assert dag.get_task("register").upstream_task_ids == {"validate", "preprocess", "train", "evaluate"}
    # Deployment: the ONNX and INT8 variants, the gate (which may require them), then the
    # served check that sets staging, then the approval step, which branches to promote
    # (approved, or promotion auto) or reject; alias moves and decisions in the one-slot pool.
    assert dag.get_task("export").upstream_task_ids == {"register", "preprocess"}
    assert dag.get_task("gate").upstream_task_ids == {"register", "preprocess", "export"}
    assert dag.get_task("infra_validate").upstream_task_ids == {"register", "preprocess", "gate"}
    approve = dag.get_task("approve")
    assert approve.upstream_task_ids == {"infra_validate"} and approve.downstream_task_ids == {"promote", "reject"}
    assert approve.options == ["Approve", "Reject"] and approve.options_mapping == {
        "Approve": "promote",
        "Reject": "reject",
    }
    assert list(approve.params) == ["comment"] or "comment" in approve.params
    for name in ("promote", "reject"):
        assert dag.get_task(name).upstream_task_ids == {"register", "approve"}
        assert dag.get_task(name).pool == "promotions"
    assert dag.params.dump()["promotion"] == "manual"
    assert dag.timetable.timetable.expression == "0 0 * * 0"  # weekly, and on the drift asset:
    assert [a.name for a in dag.timetable.asset_condition.objects] == ["training-data-drift-detected"]
    assert dag.catchup is False
    params = dag.params.dump()
    assert {"source_uri", "epochs", "batch_size", "learning_rate", "sample_cap", "force"} <= set(params)
    assert params["sample_cap"] is None and params["force"] is False and params["expected_sha256"] == {}


def test_unpausing_training_pipeline_starts_no_retrain_of_the_week_just_past(dagbag):
    """Unpausing the DAG (the trigger form does it) must not start a full retrain for the Sunday
    just past before the run a person asked for (``max_active_runs=1`` would queue theirs behind
    it): the first scheduled run is the next Sunday."""
    import pendulum
    from airflow.serialization.decoders import decode_timetable
    from airflow.serialization.encoders import encode_timetable
    from airflow.timetables.base import TimeRestriction

    dag = dagbag.get_dag("training_pipeline")
    timetable = decode_timetable(encode_timetable(dag.timetable))  # what the scheduler runs
    first = timetable.next_dagrun_info(
        last_automated_data_interval=None, restriction=TimeRestriction(dag.start_date, dag.end_date, dag.catchup)
    )
    now = pendulum.now("UTC")
    assert now < first.run_after <= now.add(days=7) and first.run_after.day_of_week == pendulum.SUNDAY


def test_param_defaults_are_the_config_defaults(dagbag):
    """The trigger form shows the same defaults a CLI run or a scheduled run uses."""
    from pipeline.config import GatePolicy, PreprocessConfig, TrainConfig, TuneConfig, run_config_from_params

    params = dagbag.get_dag("training_pipeline").params.dump()
    config = run_config_from_params(params)
    assert config.train == TrainConfig() and config.preprocess == PreprocessConfig() and not config.force
    assert config.tune == TuneConfig() and config.gate == GatePolicy() and config.promotion == "manual"


def test_the_trigger_forms_recipe_sets_the_fields_left_at_their_defaults(dagbag):
    """A run triggered with recipe quick and the form otherwise as it stands trains the quick
    recipe; a field the person changed keeps their value. Through the tasks' own reading of a
    run's Params (``pipeline.entrypoints.tasks``)."""
    from pipeline.config import TrainConfig
    from pipeline.config.recipes import RECIPES
    from pipeline.entrypoints import tasks

    params = dagbag.get_dag("training_pipeline").params.dump()
    assert params["recipe"] == "default"
    _, _, config = tasks._context({**params, "recipe": "quick"})
    assert config.recipe == "quick" and config.train == TrainConfig(**RECIPES["quick"])
    assert config.train_tags({"airflow.dag_id": "training_pipeline"})["recipe"] == "quick"
    _, _, config = tasks._context({**params, "recipe": "quick", "epochs": 5})
    assert config.train == TrainConfig(**{**RECIPES["quick"], "epochs": 5})
    _, _, config = tasks._context(params)
    assert config.train == TrainConfig() and config.train_tags()["recipe"] == "default"


def test_the_trigger_form_shows_the_params_in_sections(dagbag):
    """Read from the serialized DAG, as the API server and the UI get it."""
    from airflow.serialization.serialized_objects import DagSerialization

    from pipeline.config import SECTIONS, run_params

    serialized = DagSerialization.to_dict(dagbag.get_dag("training_pipeline"))["dag"]["params"]
    sections = {name: param["schema"]["__var"]["section"] for name, param in serialized}
    assert list(dict.fromkeys(sections.values())) == list(SECTIONS.values())  # each section once, in order
    assert sections == {p.name: SECTIONS[p.setting.section] for p in run_params()}
    assert sections["epochs"] == "Training" and sections["gate_min_accuracy"] == "Quality gate"
    assert sections["precision"] == "Hardware" and sections["tune_space"] == "Tuning"
    assert sections["source_uri"] == "Data" and sections["promotion"] == "Promotion"


def test_no_dag_file_repeats_a_choice_list_or_a_config_default():
    for path in DAG_FILES:
        text = path.read_text()
        assert "enum=[" not in text and "enum=(" not in text, path.name
    # The run's Params are generated (dags/_common.py), none written by hand:
    assert "Param(" not in (ROOT / "dags" / "training_pipeline.py").read_text()


def test_promotions_and_rollbacks_are_manual_one_at_a_time_and_not_retried_when_refused(dagbag):
    from airflow.sdk import RetryAction

    from pipeline.errors import GateFailedError, PromotionRefusedError, RegistryBusyError

    for dag_id, task_id in (("promote_model", "promote"), ("rollback_model", "rollback")):
        dag = dagbag.get_dag(dag_id)
        assert type(dag.timetable).__name__ == "NullTimetable" and dag.tags and "reason" in dag.params
        task = dag.get_task(task_id)
        assert task.pool == "promotions"
        assert task.retry_policy.evaluate(RegistryBusyError("busy"), 1, 3).action == RetryAction.RETRY
        assert task.retry_policy.evaluate(PromotionRefusedError("v", "a", "b"), 1, 3).action == RetryAction.FAIL
    # promote_model's optional approval: approve branches to promote or reject; off by default.
    promote_model = dagbag.get_dag("promote_model")
    approve = promote_model.get_task("approve")
    assert approve.downstream_task_ids == {"promote", "reject"} and promote_model.params.dump()["approval"] is False
    assert approve.options_mapping == {"Approve": "promote", "Reject": "reject"}
    assert promote_model.get_task("reject").pool == "promotions"
    gate = dagbag.get_dag("training_pipeline").get_task("gate")
    assert gate.retry_policy.evaluate(GateFailedError("v", "a", "b"), 1, 3).action == RetryAction.FAIL


def test_train_task_queue_follows_the_environment(dagbag):
    """On a fleet with GPU workers, PIPELINE_TRAIN_QUEUE=gpu sends training and trials (only) there."""
    assert dagbag.get_dag("training_pipeline").get_task("train").queue == "default"
    probe = (
        "import json, runpy, sys; ns = runpy.run_path(sys.argv[1]); dag = ns['training_pipeline'](); "
        "print(json.dumps({t.task_id: t.queue for t in dag.tasks}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(ROOT / "dags" / "training_pipeline.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PIPELINE_TRAIN_QUEUE": "gpu"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    queues = json.loads(out.stdout.strip().splitlines()[-1])
    assert queues.pop("train") == "gpu" and queues.pop("tune_trial") == "gpu"
    assert set(queues.values()) == {"default"}


def test_retry_policy_fails_bad_input_at_once_and_retries_an_unreachable_source(dagbag):
    """Bad data is not retried (it cannot get better); an unreachable source is."""
    from airflow.sdk import RetryAction

    from pipeline.errors import DataValidationError, SourceNotFoundError, SourceUnavailableError

    policy = dagbag.get_dag("training_pipeline").get_task("acquire").retry_policy
    assert policy.evaluate(SourceUnavailableError("u", "a", "b"), 1, 3).action == RetryAction.RETRY
    assert policy.evaluate(SourceNotFoundError("u", "a", "b"), 1, 3).action == RetryAction.FAIL
    assert policy.evaluate(DataValidationError("s", "e", "a", "b"), 1, 3).action == RetryAction.FAIL
    assert policy.evaluate(RuntimeError("bug"), 1, 3).action == RetryAction.DEFAULT


def test_every_task_retries_exactly_the_errors_that_declare_it(dagbag):
    """One policy, built from ``retryable``: each pipeline error class, whatever its parents, is
    retried or failed at once as it declares, in every task of every DAG (before, an outage was
    retried only where a DAG's rules named it before ``BadInputError``)."""
    import inspect

    from airflow.sdk import RetryAction

    from pipeline.errors import error_classes

    def instance(cls):  # "x" for each named argument of the constructor (none for a plain one)
        named = [p for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
        return cls(*["x"] * len(named[1:]))

    classes = error_classes()
    # The DAGs' policy is built from the classes defined when they are parsed: a pipeline error
    # defined elsewhere (and imported later, by a plugin say) would escape it.
    assert {c.__module__ for c in classes} == {"pipeline.errors"}, [
        c for c in classes if c.__module__ != "pipeline.errors"
    ]
    assert {c.__name__ for c in classes if c.retryable} >= {
        "SourceUnavailableError",
        "StorageUnavailableError",
        "StorageFullError",
        "RegistryBusyError",
        "RegistryUnavailableError",
        "ServingTimeoutError",
        "TrainingInterruptedError",
    }
    for dag_id, dag in dagbag.dags.items():
        for task in dag.tasks:
            for cls in classes:
                expected = RetryAction.RETRY if cls.retryable else RetryAction.FAIL
                assert task.retry_policy.evaluate(instance(cls), 1, 3).action == expected, (dag_id, task.task_id, cls)
            assert task.max_retry_delay is not None, (dag_id, task.task_id)


def test_the_retry_policy_and_shared_names_are_defined_once():
    sources = {p: p.read_text() for p in [*ROOT.glob("dags/*.py"), *ROOT.glob("pipeline/**/*.py")]}
    assert [p.name for p, text in sources.items() if "ExceptionRetryPolicy(" in text] == ["_common.py"]
    for literal in ('"promotions"', 'Asset("'):
        assert [p.name for p, text in sources.items() if p.parent.name == "dags" and literal in text] == ["_common.py"]
    assert (ROOT / "dags" / ".airflowignore").read_text().splitlines()[-1] == "_common.py"


def test_airflow_lint_rules_pass_on_dags():
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "AIR", str(ROOT / "dags")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout


def test_drift_monitor_updates_the_asset_training_waits_for(dagbag):
    monitor, training = dagbag.get_dag("drift_monitor"), dagbag.get_dag("training_pipeline")
    assert [t.task_id for t in monitor.topological_sort()] == ["check_drift", "drift_found", "request_retraining"]
    outlets = monitor.get_task("request_retraining").outlets
    assert [a.name for a in outlets] == [a.name for a in training.timetable.asset_condition.objects]
    assert monitor.timetable.expression == "0 0 * * *"  # daily


def test_the_trigger_forms_defaults_can_be_submitted_as_they_are(dagbag):
    """Airflow's trigger form marks a Param whose type excludes null as required and refuses it
    empty (its Trigger button stays disabled): every Param a person may leave alone is nullable
    or has a value, so the form's defaults run the full recipe. Only a promotion's reason must be
    typed, on purpose (the history keeps it)."""
    must_type = {("promote_model", "reason"), ("rollback_model", "reason")}
    blocked = []
    for dag_id, dag in dagbag.dags.items():
        for name, param in dag.params.items():
            types = param.schema.get("type", [])
            types = [types] if isinstance(types, str) else types
            if "null" not in types and param.value in (None, "") and (dag_id, name) not in must_type:
                blocked.append(f"{dag_id}.{name}")
    assert blocked == [], f"empty by default but required in the trigger form: {blocked}"
