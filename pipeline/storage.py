"""Content storage for the pipeline: a local folder or an S3 prefix, behind one small interface.

Keys are ``/``-separated relative paths (``raw/<hash>/train-images-idx3-ubyte.gz``). Every write
is atomic: a local file is written under a temporary name and renamed; an S3 object only
appears once its upload has completed. So a reader never sees half a file, and a failed stage
leaves nothing half-written behind. A set of objects that only means something whole (a
processed dataset: its splits and the manifest that says they are complete) is put with
:meth:`Storage.put_folder`: in a local folder it appears by one rename, on S3 the completion
marker goes last and a failed upload removes what it put.

A full disk or quota (``ENOSPC``, ``EDQUOT``; S3 507 or MinIO's ``XMinioStorageFull``) is a
:class:`~pipeline.errors.StorageFullError` naming the object: one line, not retried in a loop
here, retried by Airflow once space may have been freed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.config import Settings
from pipeline.errors import ConfigError, StorageFullError, StorageUnavailableError

log = logging.getLogger(__name__)

#: What a write gets when the disk or the user's quota is full.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
#: S3 error codes (or HTTP statuses) of an endpoint that is out of space.
S3_NO_SPACE = ("XMinioStorageFull", "InsufficientStorage", "507")


@contextmanager
def space_for(uri: str) -> Iterator[None]:
    """Turn "no space left" while writing ``uri`` into a :class:`StorageFullError` naming it."""
    try:
        yield
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise StorageFullError(uri, f"{os.strerror(exc.errno)} ({errno.errorcode[exc.errno]})") from exc
        raise


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

    def delete(self, key: str) -> None:
        """Remove the object (nothing happens if it is not there)."""
        raise NotImplementedError

    def put_folder(self, folder: Path, prefix: str, last: str) -> str:
        """Put every file of ``folder`` under ``prefix`` as a whole, ``last`` (the completion
        marker readers check) after all the others; return the prefix's URI.

        This version puts the objects one by one and, if one fails, removes those it put,
        unless ``last`` is there (another run completed the same content-addressed prefix)."""
        names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != last) + [last]
        written: list[str] = []
        try:
            for name in names:
                self.put_file(folder / name, f"{prefix}/{name}")
                written.append(name)
        except BaseException:
            self._discard(prefix, written, last)
            raise
        return self.uri(prefix)

    def _discard(self, prefix: str, written: list[str], last: str) -> None:
        try:
            if self.exists(f"{prefix}/{last}"):
                return
            for name in written:
                self.delete(f"{prefix}/{name}")
        except Exception as exc:  # noqa: BLE001 - the write's own error is the one to report
            # Without `last` a reader takes nothing here for complete, and a rerun overwrites it.
            log.warning("could not remove the partial %s (%s): %s", self.uri(prefix), ", ".join(written), exc)

    def put_bytes(self, data: bytes, key: str) -> str:
        with tempfile.NamedTemporaryFile(delete=False) as tmp, space_for(tmp.name):
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
        with space_for(str(dest)):
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

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def put_folder(self, folder: Path, prefix: str, last: str) -> str:
        """Copy ``folder`` into a hidden staging folder beside ``prefix`` and rename it into
        place: ``prefix`` appears whole or not at all, and a failure removes the staging folder."""
        dest = self._path(prefix)
        with space_for(str(dest)):
            dest.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"))
        try:
            for path in sorted(folder.iterdir()):
                if path.is_file():
                    with space_for(str(dest / path.name)):
                        shutil.copyfile(path, staging / path.name)
            self._rename_into_place(staging, dest, last)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return str(dest)

    @staticmethod
    def _rename_into_place(staging: Path, dest: Path, last: str) -> None:
        try:
            os.rename(staging, dest)  # atomic; replaces an empty folder, not a full one
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if (dest / last).is_file():  # another run completed the same content-addressed prefix first
            shutil.rmtree(staging)
            return
        # A folder without its marker, left half-written by an older version: replace it.
        trash = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.old")
        os.rename(dest, trash)
        os.rename(staging, dest)
        shutil.rmtree(trash, ignore_errors=True)

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
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        from pipeline.s3 import endpoint_url

        try:
            yield
        except BotoCoreError as exc:
            raise StorageUnavailableError(self.uri(key), endpoint_url(self.client), str(exc)) from exc
        except (ClientError, S3UploadFailedError) as exc:
            # upload_file reports an S3 error as S3UploadFailedError raised while handling it
            error = exc if isinstance(exc, ClientError) else exc.__context__
            if isinstance(error, ClientError):
                code = error.response.get("Error", {}).get("Code", "")
                status = str(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
                if code in S3_NO_SPACE or status == "507":
                    message = error.response.get("Error", {}).get("Message", "")
                    raise StorageFullError(self.uri(key), f"{code or status} {message}".strip()) from exc
            raise

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

    def delete(self, key: str) -> None:
        with self._reachable(key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def local_path(self, key: str) -> Path:
        dest = self.cache_dir / self.bucket / self._key(key)
        if dest.is_file():
            return dest
        with space_for(str(dest)):
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        os.close(fd)
        try:
            with self._reachable(key), space_for(str(dest)):
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
