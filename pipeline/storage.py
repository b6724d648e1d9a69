"""Content storage for the pipeline: a local folder or an S3 prefix, behind one small interface.

Keys are ``/``-separated relative paths (``raw/<hash>/train-images-idx3-ubyte.gz``). Every write
is atomic: a local file is written under a temporary name and renamed; an S3 object only
appears once its upload has completed. So a reader never sees half a file, and a failed stage
leaves nothing half-written behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.config import Settings
from pipeline.errors import ConfigError, StorageUnavailableError


class Storage:
    """Interface of the pipeline's storage; see :func:`open_storage`."""

    root_uri: str

    def uri(self, key: str) -> str:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def put_file(self, local_path: Path, key: str) -> str:
        """Copy ``local_path`` to ``key`` atomically; return the object's URI."""
        raise NotImplementedError

    def local_path(self, key: str) -> Path:
        """A local file with the object's bytes (the object itself, or a cached download).

        Meant for content-addressed objects, which never change once written."""
        raise NotImplementedError

    def get_bytes(self, key: str) -> bytes:
        """The object's current bytes, never from a cache (for records that are rewritten)."""
        raise NotImplementedError

    def put_bytes(self, data: bytes, key: str) -> str:
        with tempfile.NamedTemporaryFile(delete=False) as tmp:
            tmp.write(data)
        try:
            return self.put_file(Path(tmp.name), key)
        finally:
            os.unlink(tmp.name)

    def put_json(self, obj: Any, key: str) -> str:
        return self.put_bytes(json.dumps(obj, indent=2, sort_keys=True).encode(), key)

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))


class LocalStorage(Storage):
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root_uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def put_file(self, local_path: Path, key: str) -> str:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        os.close(fd)
        try:
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return str(dest)

    def local_path(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not in storage")
        return path

    def get_bytes(self, key: str) -> bytes:
        return self.local_path(key).read_bytes()


class S3Storage(Storage):
    """``s3://bucket/prefix`` through boto3: ``AWS_ENDPOINT_URL`` and the standard credential
    chain apply. Downloads are cached under ``cache_dir`` by key (objects are immutable once
    written, since keys carry content hashes)."""

    def __init__(self, uri: str, cache_dir: Path) -> None:
        from pipeline.s3 import s3_client

        parsed = urlparse(uri)
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.root_uri = uri.rstrip("/")
        self.cache_dir = cache_dir
        self.client = s3_client()

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    @contextmanager
    def _reachable(self, key: str) -> Iterator[None]:
        """Turn "endpoint unreachable" (after boto3's own retries) into one typed error that
        names the object and the endpoint."""
        from botocore.exceptions import BotoCoreError

        from pipeline.s3 import endpoint_url

        try:
            yield
        except BotoCoreError as exc:
            raise StorageUnavailableError(self.uri(key), endpoint_url(self.client), str(exc)) from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            with self._reachable(key):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def put_file(self, local_path: Path, key: str) -> str:
        # upload_file switches to multipart for large files; S3 shows the object only once
        # the whole upload completed, which is the atomicity we need.
        with self._reachable(key):
            self.client.upload_file(str(local_path), self.bucket, self._key(key))
        return self.uri(key)

    def get_bytes(self, key: str) -> bytes:
        with self._reachable(key):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def local_path(self, key: str) -> Path:
        dest = self.cache_dir / self.bucket / self._key(key)
        if dest.is_file():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        os.close(fd)
        try:
            with self._reachable(key):
                self.client.download_file(self.bucket, self._key(key), tmp)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest


def open_storage(uri: str, cache_dir: Path | None = None) -> Storage:
    """Storage at a folder path, ``file://`` URI or ``s3://bucket/prefix``."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError("PIPELINE_STORAGE_URI", "s3://bucket/prefix", uri)
        return S3Storage(uri, cache_dir or Path(tempfile.gettempdir()) / "pipeline-s3-cache")
    if parsed.scheme in ("", "file"):
        return LocalStorage(Path(parsed.path if parsed.scheme == "file" else uri))
    raise ConfigError("PIPELINE_STORAGE_URI", "a folder, file:// or s3:// URI", uri)


def storage_for(settings: Settings) -> Storage:
    """The storage named by the settings (S3 downloads are cached under the pipeline home)."""
    return open_storage(settings.storage_uri, cache_dir=settings.home / "cache")
