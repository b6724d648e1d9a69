"""Image datasets from remote sources: PNG class folders in a bucket of the moto S3 server, and
a CSV manifest served over HTTP with paths relative to it. Each gives the same dataset (hash,
spec) as the same files on a local disk, and an unchanged bucket is listed, not fetched."""

from __future__ import annotations

import uuid

import pytest
from image_datasets import cut, digits_manifest, fashion_folders
from services import RecordingServer

from pipeline.config import AcquireConfig
from pipeline.data.acquire import acquire
from pipeline.data.validate import validate_raw

pytestmark = pytest.mark.integration


def test_class_folders_in_s3_are_the_dataset_the_same_folders_on_disk_are(
    s3_env, tmp_path, storage, small_splits, monkeypatch
):
    import boto3
    from botocore.client import BaseClient

    local = fashion_folders(tmp_path / "fashion-s3", cut(small_splits, 400, 110))
    bucket = f"images-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"fashion-s3/{path.relative_to(local).as_posix()}")
    remote = acquire(AcquireConfig(source_uri=f"s3://{bucket}/fashion-s3"), storage)
    on_disk = acquire(AcquireConfig(source_uri=str(local)), storage)
    assert remote.layout == "folders" and remote.dataset_hash == on_disk.dataset_hash
    spec = validate_raw(remote, storage).spec
    assert (spec["channels"], spec["height"], spec["width"]) == (1, 28, 28)
    assert sum(spec["counts"]["train"].values()) == 400 and sum(spec["counts"]["test"].values()) == 110

    calls: list[str] = []
    original = BaseClient._make_api_call
    monkeypatch.setattr(
        BaseClient, "_make_api_call", lambda self, op, params: calls.append(op) or original(self, op, params)
    )
    again = acquire(AcquireConfig(source_uri=f"s3://{bucket}/fashion-s3"), storage)
    # One listing, and one HEAD for the IDX files' absence: no request per image.
    assert again.fetched == [] and sorted(calls) == ["HeadObject", "ListObjectsV2"]


def test_a_manifest_over_http_brings_the_files_it_names(tmp_path, storage):
    folder = digits_manifest(tmp_path / "digits")
    (folder / "unlisted.txt").write_text("not part of the dataset")
    with RecordingServer(tmp_path) as server:
        raw = acquire(AcquireConfig(source_uri=f"{server.url}/digits/labels.csv"), storage)
        fetched = {path for method, path in server.requests if method == "GET"}
    assert raw.layout == "manifest" and raw.read["dataset_name"] == "digits"
    assert len(fetched) == 1 + 1797 and "/digits/unlisted.txt" not in fetched
    spec = validate_raw(raw, storage).spec
    assert spec["classes"] == [str(d) for d in range(10)] and (spec["height"], spec["width"]) == (8, 8)
