"""The whole chain with S3 as both the source and the pipeline's storage (moto server)."""

from __future__ import annotations

import uuid

import boto3
import pytest
from recipes import SMALL_RECIPE

from pipeline.config import IDX_FILES, Settings, run_config_from_params
from pipeline.entrypoints.run import run_pipeline
from pipeline.tracking import tracking_client

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_run_with_s3_source_and_s3_storage(s3_env, small_dataset, pipeline_home, monkeypatch):
    bucket = f"pipeline-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    for name in IDX_FILES.values():
        s3.upload_file(str(small_dataset / name), bucket, f"incoming/{name}")
    monkeypatch.setenv("PIPELINE_STORAGE_URI", f"s3://{bucket}/store")
    settings = Settings.from_env()
    # One epoch of 14 steps reaches about 0.3 (chance is 0.1): the gate's floor is lowered to match.
    config = run_config_from_params(
        {"source_uri": f"s3://{bucket}/incoming", **SMALL_RECIPE, "epochs": 1, "gate_min_accuracy": 0.2}, settings
    )

    result = run_pipeline(config, settings)

    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="store/")["Contents"]}
    digest, processed = result["acquire"]["dataset_hash"], result["preprocess"]["processed_hash"]
    run_id = result["train"]["run_id"]
    assert f"store/raw/{digest}/MANIFEST.json" in keys
    report = result["validate"]["report_prefix"]
    assert f"store/{report}/index.html" in keys and f"store/reports/{digest}/profile.parquet" in keys
    assert f"store/processed/{processed}/train.npz" in keys
    assert f"store/checkpoints/{run_id}/best.ckpt" in keys
    version = tracking_client(settings).get_model_version_by_alias(
        settings.model_for("incoming"), "candidate"
    )  # the source's name
    assert version.run_id == run_id and version.tags["data_report"] == f"s3://{bucket}/store/{report}/index.html"
    # The checkpoint in S3 gave the offline predictions the served ones were checked against.
    assert version.tags["infra_validation"] == "passed" and "staging" in version.aliases

    again = run_pipeline(config, settings)
    assert again["acquire"]["fetched"] == [] and again["train"]["reused"] and not again["register"]["created"]
