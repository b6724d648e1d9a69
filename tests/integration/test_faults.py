"""Faults survived, nothing lost: the stores fail under a running stage, for real.

- PostgreSQL (a private cluster, never the machine's shared server) is restarted, crashed and
  stopped while two callers promote and roll back, one through the functions and one through
  the CLI, with the registry behind an MLflow server (production) or used directly: every call
  succeeds or fails with a typed one-line error, and afterwards the ``production`` alias, the
  promotion history and the lock agree, with nothing lost, duplicated or half-written.
- The storage fills up while preprocessing writes its splits, for real (a small tmpfs mounted by
  the test: ENOSPC) and on S3 (an endpoint that answers 507 as a full MinIO does): one typed
  line, no half-written ``processed/<hash>/``, and a rerun after space is freed succeeds.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import random
import subprocess
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from services import MlflowServer, PostgresCluster, run_cli

from pipeline.config import Settings

pytestmark = [pytest.mark.slow, pytest.mark.integration]

VERSIONS = ("1", "2", "3")
SMALL_TRAIN, SMALL_TEST = 2000, 500  # tests/conftest.py's small_dataset
FAULT_LOOP_S = 24.0


# --- PostgreSQL restarted during a promotion ---------------------------------------------------


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    """A private PostgreSQL cluster that the test may restart and stop."""
    with PostgresCluster() as cluster:
        yield cluster


def _admin_sql(postgres: PostgresCluster, statement: str) -> None:
    import psycopg2

    admin = psycopg2.connect(f"{postgres.url}/postgres")
    try:
        admin.autocommit = True
        admin.cursor().execute(statement)
    finally:
        admin.close()


@pytest.fixture(params=["mlflow server", "postgresql store"])
def registry(request, postgres: PostgresCluster, tmp_path: Path) -> Iterator[tuple[Settings, str]]:
    """A fresh database on the private cluster with three promotable versions of one model; the
    settings reach it through an MLflow server on it or directly. Yields (settings, direct URI)."""
    from mlflow import MlflowClient

    database = f"faults_{uuid.uuid4().hex[:8]}"
    _admin_sql(postgres, f"CREATE DATABASE {database}")
    direct = f"{postgres.url.replace('postgresql', 'postgresql+psycopg2')}/{database}"
    settings = dataclasses.replace(
        Settings.from_env({"PIPELINE_HOME": str(tmp_path / "home")}),
        tracking_uri=direct,
        artifact_root=str(tmp_path / "artifacts"),
        model_name=f"faults-{uuid.uuid4().hex[:6]}",
    )
    client = MlflowClient(tracking_uri=direct)  # creates the schema
    client.create_registered_model(settings.model_for())
    for version in VERSIONS:  # cheap versions: promotion reads tags, never the model's files
        created = client.create_model_version(settings.model_for(), f"{settings.artifact_root}/v{version}")
        assert str(created.version) == version
        for tag in ("gate.decision", "infra_validation"):
            client.set_model_version_tag(settings.model_for(), version, tag, "passed")
    try:
        if request.param == "mlflow server":
            with MlflowServer(direct, settings.artifact_root) as server:
                yield dataclasses.replace(settings, tracking_uri=server.url), direct
        else:
            yield settings, direct
    finally:
        if postgres.running():
            _admin_sql(postgres, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def _warm_up(settings: Settings) -> int:
    """Import the pipeline and reach the registry once, so that the loop starts at full speed."""
    from pipeline.registry.promote import history

    return len(history(settings))


def _promotion_loop(settings: Settings, until: float, seed: int) -> list[dict]:
    """Promote and roll back at random until ``until`` (wall clock); one record per call."""
    from pipeline.errors import PipelineError
    from pipeline.registry.promote import promote, rollback

    rng, calls = random.Random(seed), []
    while time.time() < until:
        call: dict = {"op": rng.choice(["promote", "promote", "rollback"]), "start": time.time()}
        try:
            if call["op"] == "promote":
                move = promote(settings, rng.choice(VERSIONS), f"faults-{seed}", "fault test")
            else:
                move = rollback(settings, actor=f"faults-{seed}")
            call["move"] = move.to_dict() if move else None
        except PipelineError as exc:  # typed: what a user or Airflow sees
            call["error"], call["message"] = type(exc).__name__, str(exc)
        except Exception:  # noqa: BLE001 - the test reports any untyped failure
            call["error"], call["traceback"] = None, traceback.format_exc()
        call["end"] = time.time()
        calls.append(call)
    return calls


def _cli_loop(settings: Settings, until: float, results: list[dict]) -> None:
    env = {
        "PIPELINE_HOME": str(settings.home),
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "PIPELINE_MODEL_NAME": settings.model_for(),
    }
    rng = random.Random(7)
    while time.time() < until:
        args = ["promote", "--version", rng.choice(VERSIONS)] if rng.random() < 0.6 else ["rollback"]
        start = time.time()
        out = run_cli(*args, env=env)
        results.append({"args": args, "rc": out.returncode, "stderr": out.stderr, "start": start, "end": time.time()})


def _faults(postgres: PostgresCluster, outages: list[tuple[float, float]]) -> None:
    """Restart cleanly, crash and restart, stop for 5 s: each while the callers are busy."""
    for pause, action in ((3, "fast"), (4, "immediate"), (4, "stop")):
        time.sleep(pause)
        begin = time.time()
        if action == "stop":
            postgres.stop("fast")
            time.sleep(5)
            postgres.start()
        else:
            postgres.restart(action)
        outages.append((begin, time.time()))


def _production_entries(history) -> list:
    return [e for e in history if e.alias == "production"]


def test_fault_postgres_restarted_during_promotion_alias_and_history_agree(registry, postgres):
    from mlflow import MlflowClient

    from pipeline.registry.history import PENDING_TAG, alias_version, read_history
    from pipeline.registry.lock import LOCK_STALE_S
    from pipeline.registry.promote import promote, rollback

    settings, direct = registry
    name = settings.model_for()
    promote(settings, "1", "setup", "first production")
    outages: list[tuple[float, float]] = []
    cli_calls: list[dict] = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        assert pool.submit(_warm_up, settings).result(timeout=120) == 1
        until = time.time() + FAULT_LOOP_S
        worker = pool.submit(_promotion_loop, settings, until, 1)
        cli = threading.Thread(target=_cli_loop, args=(settings, until, cli_calls))
        cli.start()
        try:
            _faults(postgres, outages)
        finally:
            if not postgres.running():
                postgres.start()
            cli.join()
        calls = worker.result()
    assert postgres.running()

    # Every call succeeded or failed with a typed error, in one line through the CLI.
    untyped = [c["traceback"] for c in calls if c.get("error", "") is None]
    assert not untyped, f"{len(untyped)} calls failed untyped; the last lines of the first:\n{untyped[0][-3000:]}"
    for c in cli_calls:  # (MLflow's own log lines may come before: the CLI's logging set-up decides)
        errors = [line for line in c["stderr"].splitlines() if line.startswith(("error: ", "internal error: "))]
        assert c["rc"] == 0 or (
            c["rc"] in (1, 2)
            and len(errors) == 1
            and errors[0].startswith("error: ")
            and c["stderr"].rstrip().endswith(errors[0])
        ), c
    # The faults hit calls in flight.
    hit = [c for c in calls + cli_calls if any(c["start"] < end and c["end"] > begin for begin, end in outages)]
    assert hit, f"no call overlapped an outage: {outages}"

    client = MlflowClient(tracking_uri=direct)
    # Right after the faults: the alias is where the history says, or a pending move (cut short
    # by a fault) names exactly the difference, and the next move under the lock records it.
    history = read_history(client, name)
    current = alias_version(client, name, "production")
    pending = client.get_registered_model(name).tags.get(PENDING_TAG)
    if current != _production_entries(history)[-1].to_version:
        assert pending and json.loads(pending)["to_version"] == current, (current, history[-1], pending)

    # A later promotion works (breaking a lock a fault left behind, as LOCK_STALE_S allows),
    # and so does a rollback after it.
    started = time.monotonic()
    target = next(v for v in VERSIONS if v != current)
    move = promote(settings, target, "after", "after the faults")
    assert move is not None and move.to_version == target
    assert time.monotonic() - started < LOCK_STALE_S + 30
    back = rollback(settings, actor="after")
    assert back.from_version == target

    history = read_history(client, name)
    production = _production_entries(history)
    assert alias_version(client, name, "production") == production[-1].to_version == back.to_version
    # No entry lost, duplicated or half-written: numbered 1..n without a gap, each move starting
    # where the one before it ended, every move a caller was told about recorded once.
    assert [e.seq for e in history] == list(range(1, len(history) + 1))
    for before, after in zip(production, production[1:], strict=False):
        assert after.from_version == before.to_version, (before, after)
    recorded = {(e.seq, e.at, e.to_version) for e in history}
    reported = [c["move"] for c in calls if c.get("move")]
    for m in reported:
        assert (m["seq"], m["at"], m["to_version"]) in recorded, m
    assert len({(e.at, e.actor) for e in history}) == len(history)
    tags = client.get_registered_model(name).tags
    assert PENDING_TAG not in tags
    assert not client.search_registered_models(f"name = '{name}.lock'")  # released
    print(
        f"\n{len(calls)} function calls, {len(cli_calls)} CLI calls, {len(hit)} during an outage; "
        f"errors: {sorted({c.get('error') for c in calls + cli_calls if c.get('error')})}; "
        f"{len(history)} history entries, {sum('interrupted move' in e.reason for e in history)} recorded by a "
        f"reconciliation; calls (s): "
        f"{[round(c['end'] - c['start'], 1) for c in calls]}, "
        f"CLI {[round(c['end'] - c['start'], 1) for c in cli_calls]}; "
        f"outages {[(round(b - until + FAULT_LOOP_S, 1), round(e - b, 1)) for b, e in outages]}; "
        f"after the faults: {time.monotonic() - started:.0f} s"
    )


@pytest.mark.parametrize("action", ["promote", "rollback"])
def test_fault_postgres_stopped_between_alias_move_and_history_entry_is_reconciled(
    action, postgres, tmp_path, monkeypatch
):
    """The window the loop above hits only by chance, hit on purpose: PostgreSQL stops right
    after the alias moved, before the history entry is written. The call fails with one typed
    line; the next move records the interrupted one (as what it was) before its own."""
    from mlflow import MlflowClient

    from pipeline.errors import RegistryUnavailableError
    from pipeline.registry.history import PENDING_TAG, TAG_ROLLED_BACK, alias_version, read_history
    from pipeline.registry.promote import promote, rollback

    database = f"faults_{uuid.uuid4().hex[:8]}"
    _admin_sql(postgres, f"CREATE DATABASE {database}")
    direct = f"{postgres.url.replace('postgresql', 'postgresql+psycopg2')}/{database}"
    settings = dataclasses.replace(
        Settings.from_env({"PIPELINE_HOME": str(tmp_path / "home")}),
        tracking_uri=direct,
        artifact_root=str(tmp_path / "artifacts"),
        model_name="faults-window",
    )
    client = MlflowClient(tracking_uri=direct)
    client.create_registered_model(settings.model_for())
    for version in VERSIONS:
        client.create_model_version(settings.model_for(), f"{settings.artifact_root}/v{version}")
        for tag in ("gate.decision", "infra_validation"):
            client.set_model_version_tag(settings.model_for(), version, tag, "passed")
    promote(settings, "1", "setup")
    promote(settings, "2", "setup")

    original = MlflowClient.set_registered_model_alias

    def alias_then_outage(self, name, alias, version):
        original(self, name, alias, version)
        postgres.stop("immediate")  # the alias moved; the history entry is next
        threading.Timer(1.0, postgres.start).start()  # back while the holder releases its lock

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", alias_then_outage)
    try:
        expected = f"127.0.0.1:{postgres.port}/{database}: expected a reachable MLflow registry"
        with pytest.raises(RegistryUnavailableError, match=expected):
            promote(settings, "3", "faulty") if action == "promote" else rollback(settings, actor="faulty")
    finally:
        monkeypatch.undo()
        deadline = time.monotonic() + 30
        while not postgres.running() and time.monotonic() < deadline:
            time.sleep(0.2)
    moved_to = "3" if action == "promote" else "1"
    assert alias_version(client, settings.model_for(), "production") == moved_to  # moved, not yet recorded
    assert not client.search_registered_models(f"name = '{settings.model_for()}.lock'")  # released after all

    promote(settings, "2", "after", "after the fault")
    history = [e for e in read_history(client, settings.model_for()) if e.alias == "production"]
    assert [(e.action, e.from_version, e.to_version) for e in history] == [
        ("promote", None, "1"),
        ("promote", "1", "2"),
        (action, "2", moved_to),
        ("promote", moved_to, "2"),
    ]
    assert history[2].actor == "faulty" and "recorded after an interrupted move" in history[2].reason
    assert PENDING_TAG not in client.get_registered_model(settings.model_for()).tags
    if action == "rollback":  # the version it left is tagged, as an uninterrupted rollback does
        assert TAG_ROLLED_BACK in client.get_model_version(settings.model_for(), "2").tags
    _admin_sql(postgres, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


# --- The storage full during preprocessing -----------------------------------------------------


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 16 MiB tmpfs mounted for the test (needs root, or CAP_SYS_ADMIN)."""
    mountpoint = Path(tempfile.mkdtemp(prefix="pytest-tmpfs-"))
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mountpoint)], capture_output=True, text=True
    )
    if out.returncode != 0:
        mountpoint.rmdir()
        pytest.fail(f"this test mounts a tmpfs (root or CAP_SYS_ADMIN), and could not: {out.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
        mountpoint.rmdir()


def test_fault_storage_full_during_preprocess_leaves_nothing_half_written_and_rerun_succeeds(
    small_dataset, tmp_path, monkeypatch, small_disk
):
    from pipeline.config import AcquireConfig, PreprocessConfig
    from pipeline.data.acquire import acquire
    from pipeline.data.preprocess import preprocess, processed_hash
    from pipeline.data.processed import load_processed_ref, load_split
    from pipeline.errors import ReferenceNotFoundError
    from pipeline.storage import open_storage

    store = small_disk / "storage"
    storage = open_storage(str(store))
    raw = acquire(AcquireConfig(source_uri=str(small_dataset)), storage)
    digest = processed_hash(raw, PreprocessConfig())
    # Leave room for the training split (about 0.9 * 2,000 images of 784 bytes) and not for
    # the rest: the disk fills up half-way through the processed data.
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (free - int(0.95 * SMALL_TRAIN * 784)))

    env = {"PIPELINE_HOME": str(tmp_path / "home"), "PIPELINE_STORAGE_URI": str(store)}
    out = run_cli("preprocess", "--dataset", raw.dataset_hash, env=env)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr  # exit 1: Airflow retries it
    assert out.stderr.strip().splitlines() == errors and len(errors) == 1, out.stderr  # one line, nothing else
    assert "no space left" in errors[0].lower() and f"{store / 'processed' / digest}/" in errors[0], errors[0]
    # Nothing half-written: no processed/<hash>/, no temporary file or folder anywhere in storage.
    assert not (store / "processed" / digest).exists(), sorted((store / "processed" / digest).iterdir())
    leftovers = [p for p in store.rglob("*") if p.name.startswith(".") or (p.is_file() and "processed" in p.parts)]
    assert not leftovers, leftovers
    with pytest.raises(ReferenceNotFoundError):
        load_processed_ref(storage, digest)  # a later run does not take it for complete

    filler.unlink()  # space freed: the rerun succeeds, with every split whole
    ref = preprocess(raw, storage, PreprocessConfig())
    assert ref.processed_hash == digest and load_processed_ref(storage, digest) == ref
    assert sum(ref.counts.values()) + sum(ref.removed.values()) == SMALL_TRAIN + SMALL_TEST
    for split in ("train", "val", "test"):
        images, labels = load_split(ref, storage, split)
        assert images.shape == (ref.counts[split], 28, 28) and len(labels) == ref.counts[split]
        assert images.dtype == np.uint8


def test_fault_s3_storage_full_during_preprocess_leaves_no_partial_prefix_and_rerun_succeeds(
    s3_env, small_dataset, tmp_path, monkeypatch
):
    """The same on S3 storage: the endpoint answers 507 (as a full MinIO does) after the first
    processed object; the objects put before are removed, and nothing marks the prefix complete."""
    import boto3
    from services import FullS3Proxy

    from pipeline.config import AcquireConfig, PreprocessConfig
    from pipeline.data.acquire import acquire
    from pipeline.data.preprocess import preprocess, processed_hash
    from pipeline.data.processed import load_processed_ref, load_split
    from pipeline.errors import ReferenceNotFoundError, StorageFullError
    from pipeline.storage import open_storage

    bucket = f"store-{uuid.uuid4().hex[:8]}"
    moto = boto3.client("s3")  # straight to moto, past the proxy
    moto.create_bucket(Bucket=bucket)
    with FullS3Proxy(s3_env) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        storage = open_storage(f"s3://{bucket}/pipeline", cache_dir=tmp_path / "cache")
        raw = acquire(AcquireConfig(source_uri=str(small_dataset)), storage)
        digest = processed_hash(raw, PreprocessConfig())
        prefix = f"pipeline/processed/{digest}/"

        proxy.allow_puts = 1  # one split goes in, the next upload finds the storage full
        full = rf"s3://{bucket}/{prefix}\w+\.npz: expected space .*XMinioStorageFull"
        with pytest.raises(StorageFullError, match=full):
            preprocess(raw, storage, PreprocessConfig())
        assert proxy.refused == 1  # refused once, not retried in a loop
        assert moto.list_objects_v2(Bucket=bucket, Prefix=prefix).get("KeyCount") == 0
        with pytest.raises(ReferenceNotFoundError):
            load_processed_ref(storage, digest)

        proxy.allow_puts = None  # space freed
        ref = preprocess(raw, storage, PreprocessConfig())
        keys = {o["Key"] for o in moto.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
        assert keys == {f"{prefix}{name}" for name in ("train.npz", "val.npz", "test.npz", "MANIFEST.json")}
        for split in ("train", "val", "test"):
            assert len(load_split(ref, storage, split)[1]) == ref.counts[split]
