"""Acquisition over the network: an HTTP server and an S3 API on loopback."""

from __future__ import annotations

import json
import logging
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from services import RecordingServer, ScriptedServer, free_port

from pipeline.config import IDX_FILES, AcquireConfig
from pipeline.data.acquire import acquire
from pipeline.errors import (
    ChecksumMismatchError,
    SourceLimitError,
    SourceNotFoundError,
    SourceUnavailableError,
    StorageUnavailableError,
)
from pipeline.storage import open_storage

pytestmark = pytest.mark.integration
TRAIN_IMAGES = IDX_FILES["train_images"]


def test_http_fetches_once_then_only_asks_for_headers(http_server, small_dataset, storage):
    first = acquire(AcquireConfig(source_uri=http_server.url + "/"), storage)
    gets = [path for method, path in http_server.requests if method == "GET"]
    assert sorted(gets) == sorted(f"/{name}" for name in IDX_FILES.values())
    assert (Path(storage.uri(f"raw/{first.dataset_hash}/{TRAIN_IMAGES}"))).read_bytes() == (
        small_dataset / TRAIN_IMAGES
    ).read_bytes()

    http_server.requests.clear()
    second = acquire(AcquireConfig(source_uri=http_server.url + "/"), storage)
    assert second.fetched == [] and second.dataset_hash == first.dataset_hash
    assert {method for method, _ in http_server.requests} == {"HEAD"}


def test_http_server_without_validators_is_fetched_every_time(small_dataset, storage):
    # Without ETag or Last-Modified a same-size change could not be seen: never trust the record.
    with RecordingServer(small_dataset, validators=False) as server:
        acquire(AcquireConfig(source_uri=server.url), storage)
        server.requests.clear()
        again = acquire(AcquireConfig(source_uri=server.url), storage)
    assert sorted(again.fetched) == sorted(IDX_FILES.values())
    assert sum(method == "GET" for method, _ in server.requests) == 4


def test_http_checksum_mismatch(http_server, storage):
    config = AcquireConfig(source_uri=http_server.url, expected_sha256={TRAIN_IMAGES: "ab" * 32})
    with pytest.raises(ChecksumMismatchError, match=f"{http_server.url}/{TRAIN_IMAGES}: expected sha256 {'ab' * 32}"):
        acquire(config, storage)
    assert not storage.exists("raw")


def test_http_unreachable_and_missing(http_server, storage):
    dead = f"http://127.0.0.1:{free_port()}/fashion"
    with pytest.raises(
        SourceUnavailableError, match=f"{dead}/.*: expected a reachable HTTP server, found ConnectionError"
    ):
        acquire(AcquireConfig(source_uri=dead), storage)
    with pytest.raises(SourceNotFoundError, match="expected HTTP 200, found HTTP 404"):
        acquire(AcquireConfig(source_uri=http_server.url + "/missing"), storage)
    assert not storage.exists("raw")


def test_http_connection_dropped_mid_file_is_a_transport_error(small_dataset, storage):
    # The server announces the whole length and hangs up halfway: retryable, nothing stored
    # (unlike a file that is broken as served, which is stored for validate to reject).
    class HalfServer(RecordingServer):
        def __init__(self, folder: Path) -> None:
            super().__init__(folder)
            handler = self.httpd.RequestHandlerClass

            def copyfile(self, source, outputfile):
                data = source.read()
                outputfile.write(data[: len(data) // 2])
                self.close_connection = True

            handler.copyfile = copyfile

    with (
        HalfServer(small_dataset) as server,
        pytest.raises(SourceUnavailableError, match=f"{server.url}/.*: expected a complete download, found "),
    ):
        acquire(AcquireConfig(source_uri=server.url), storage)
    assert not storage.exists("raw")


def record_s3_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, the name of every S3 API call boto3 makes, in order."""
    from botocore.client import BaseClient

    calls: list[str] = []
    original = BaseClient._make_api_call

    def spy(self, operation, params):
        calls.append(operation)
        return original(self, operation, params)

    monkeypatch.setattr(BaseClient, "_make_api_call", spy)
    return calls


@pytest.fixture
def s3_dataset(s3_env, small_dataset) -> str:
    import boto3

    bucket = f"data-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    for name in IDX_FILES.values():
        client.upload_file(str(small_dataset / name), bucket, f"fashion/{name}")
    return f"s3://{bucket}/fashion"


def test_s3_fetches_once(s3_dataset, small_dataset, storage, monkeypatch):
    first = acquire(AcquireConfig(source_uri=s3_dataset), storage)
    assert sorted(first.fetched) == sorted(IDX_FILES.values())
    assert (
        Path(storage.uri(f"raw/{first.dataset_hash}/{TRAIN_IMAGES}")).read_bytes()
        == (small_dataset / TRAIN_IMAGES).read_bytes()
    )

    calls = record_s3_calls(monkeypatch)
    second = acquire(AcquireConfig(source_uri=s3_dataset), storage)
    assert second.fetched == [] and set(calls) == {"HeadObject"}


def test_s3_checksum_mismatch_and_missing_object(s3_dataset, storage):
    with pytest.raises(ChecksumMismatchError, match=f"{s3_dataset}/{TRAIN_IMAGES}: expected sha256"):
        acquire(AcquireConfig(source_uri=s3_dataset, expected_sha256={TRAIN_IMAGES: "cd" * 32}), storage)
    with pytest.raises(SourceNotFoundError, match="expected an existing S3 object, found S3 404"):
        acquire(AcquireConfig(source_uri=s3_dataset + "-missing"), storage)
    assert not storage.exists("raw")


def test_s3_unreachable_endpoint_fails_with_its_name(s3_env, storage, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    with pytest.raises(SourceUnavailableError, match=f"fashion/.*: expected a reachable S3 endpoint at {dead}, found"):
        acquire(AcquireConfig(source_uri="s3://bucket/fashion"), storage)


def test_s3_storage_unreachable_fails_with_the_object_and_endpoint(s3_env, small_dataset, tmp_path, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    storage = open_storage("s3://store/pipeline", cache_dir=tmp_path / "cache")
    with pytest.raises(
        StorageUnavailableError, match=f"s3://store/pipeline/.*: expected a reachable S3 endpoint at {dead}"
    ):
        acquire(AcquireConfig(source_uri=str(small_dataset)), storage)


def test_s3_as_pipeline_storage(s3_env, small_dataset, tmp_path, monkeypatch):
    import boto3

    bucket = f"store-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    storage = open_storage(f"s3://{bucket}/pipeline", cache_dir=tmp_path / "cache")
    ref = acquire(AcquireConfig(source_uri=str(small_dataset)), storage)
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]}
    assert {f"pipeline/raw/{ref.dataset_hash}/{name}" for name in IDX_FILES.values()} <= keys
    assert f"pipeline/raw/{ref.dataset_hash}/MANIFEST.json" in keys
    assert ref.uri == f"s3://{bucket}/pipeline/raw/{ref.dataset_hash}"

    calls = record_s3_calls(monkeypatch)
    again = acquire(AcquireConfig(source_uri=str(small_dataset)), storage)
    assert again.fetched == [] and again.dataset_hash == ref.dataset_hash
    assert not {"PutObject", "CreateMultipartUpload", "UploadPart"} & set(calls), calls


# --- Bounded sources (issue 16) ---------------------------------------------------------------


def endless_body(block: int, pause: float, most_bytes: int, most_seconds: float):
    """A ``respond`` for :class:`ScriptedServer`: 200 and a body without length that goes on
    until the client hangs up, the server closes, or the bounds of the test are reached."""

    def respond(handler, server) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.end_headers()
        if handler.command == "HEAD":
            return
        sent, stop = 0, time.monotonic() + most_seconds
        try:
            while sent < most_bytes and time.monotonic() < stop and not server.closing.is_set():
                handler.wfile.write(bytes(block))
                sent += block
                time.sleep(pause)
        except OSError:
            pass  # the client hung up: what a bounded download does

    return respond


@pytest.fixture
def staging_root(tmp_path, monkeypatch) -> Path:
    """The temporary folder acquire stages downloads in, watched by the test."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def test_finding_endless_http_body_stops_at_the_download_size_limit(storage, staging_root, monkeypatch):
    monkeypatch.setenv("PIPELINE_MAX_DOWNLOAD_BYTES", str(4 << 20))
    with (
        ScriptedServer(endless_body(64 << 10, 0, most_bytes=256 << 20, most_seconds=30)) as server,
        pytest.raises(
            SourceLimitError, match=r"expected at most 4194304 bytes \(PIPELINE_MAX_DOWNLOAD_BYTES\), found more than"
        ) as info,
    ):
        acquire(AcquireConfig(source_uri=server.url), storage)
    assert "\n" not in str(info.value) and str(info.value).startswith(f"{server.url}/")
    assert list(staging_root.iterdir()) == []
    assert not storage.exists("raw") and not storage.exists("sources")


def test_finding_endless_http_body_stops_at_the_download_deadline(storage, staging_root, monkeypatch):
    # A trickle: each read returns within the per-read timeout, the whole never ends.
    monkeypatch.setenv("PIPELINE_DOWNLOAD_DEADLINE_S", "1")
    with (
        ScriptedServer(endless_body(1024, 0.02, most_bytes=64 << 20, most_seconds=5)) as server,
        pytest.raises(
            SourceLimitError, match=r"expected a download within 1 s \(PIPELINE_DOWNLOAD_DEADLINE_S\), found \d+ bytes"
        ),
    ):
        acquire(AcquireConfig(source_uri=server.url), storage)
    assert list(staging_root.iterdir()) == []
    assert not storage.exists("raw") and not storage.exists("sources")


def redirect_to(target: str):
    def respond(handler, server) -> None:
        handler.send_response(302)
        handler.send_header("Location", f"{target}{handler.path.removeprefix('/moved')}")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return respond


def test_finding_redirect_to_another_host_is_refused(small_dataset, storage, monkeypatch):
    monkeypatch.delenv("PIPELINE_REDIRECT_HOSTS", raising=False)
    with RecordingServer(small_dataset) as other, ScriptedServer(redirect_to(other.url)) as server:
        with pytest.raises(SourceLimitError) as info:
            acquire(AcquireConfig(source_uri=server.url), storage)
        assert str(info.value) == (
            f"{server.url}/{TRAIN_IMAGES}: expected redirects to the same scheme, host and port, or to a host in "
            f"PIPELINE_REDIRECT_HOSTS, found a redirect to {other.url}/{TRAIN_IMAGES}"
        )
        assert other.requests == []
        assert not storage.exists("raw") and not storage.exists("sources")

        # The host named in the setting is followed (by name: localhost is not 127.0.0.1).
        monkeypatch.setenv("PIPELINE_REDIRECT_HOSTS", "example.invalid, localhost")
        elsewhere = other.url.replace("127.0.0.1", "localhost")
        with ScriptedServer(redirect_to(elsewhere)) as allowed:
            ref = acquire(AcquireConfig(source_uri=allowed.url), storage)
    assert sorted(ref.fetched) == sorted(IDX_FILES.values())


def test_a_redirect_on_the_same_host_is_followed(small_dataset, storage):
    class Moved(RecordingServer):
        def __init__(self, folder: Path) -> None:
            super().__init__(folder)
            handler, url = self.httpd.RequestHandlerClass, self.url

            def send_head(self):
                if self.path.startswith("/moved/"):
                    self.send_response(301)
                    self.send_header("Location", f"{url}{self.path.removeprefix('/moved')}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return http_send_head(self)

            http_send_head = handler.send_head
            handler.send_head = send_head

    with Moved(small_dataset) as server:
        ref = acquire(AcquireConfig(source_uri=f"{server.url}/moved/"), storage)
    assert sorted(ref.fetched) == sorted(IDX_FILES.values())


SECRET = "s3cr3t-only-in-this-test"


def secret_anywhere(storage_root: Path, texts: list[str]) -> list[str]:
    found = [f"text {i}" for i, text in enumerate(texts) if SECRET in text]
    return found + [str(p) for p in storage_root.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def test_finding_credentials_in_the_source_uri_are_redacted(http_server, storage, caplog):
    # A password in the URL and a token in its query: used for the requests, shown nowhere.
    caplog.set_level(logging.DEBUG)
    host = http_server.url.removeprefix("http://")
    uri = f"http://reader:{SECRET}@{host}/?token={SECRET}&X-Amz-Signature={SECRET}"
    ref = acquire(AcquireConfig(source_uri=uri), storage)
    assert sorted(ref.fetched) == sorted(IDX_FILES.values())
    assert ref.source_uri == f"http://***@{host}/?token=***&X-Amz-Signature=***"
    assert ("GET", f"/{TRAIN_IMAGES}?token={SECRET}&X-Amz-Signature={SECRET}") in http_server.requests
    again = acquire(AcquireConfig(source_uri=uri), storage)  # the record is found by the full URI
    assert again.fetched == []

    with pytest.raises(SourceNotFoundError) as info:
        acquire(AcquireConfig(source_uri=uri.replace("/?", "/missing/?")), storage)
    assert str(info.value).startswith(f"http://***@{host}/missing/{TRAIN_IMAGES}?token=***&X-Amz-Signature=***: ")
    texts = [
        str(info.value),
        json.dumps(ref.to_dict()),
        json.dumps(again.to_dict()),
        caplog.text,
        *(str(r.args) for r in caplog.records),
    ]
    assert secret_anywhere(storage.root, texts) == []
