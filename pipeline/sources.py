"""Dataset sources: a local folder (or ``file://``), an ``http(s)://`` URL prefix, an ``s3://``
prefix. Each can tell a file's cheap fingerprint (size and mtime, ETag or Last-Modified) without
downloading it, so that an unchanged source is not fetched again, and can stream a file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from pipeline.errors import SourceNotFoundError, SourceUnavailableError
from pipeline.s3 import endpoint_url, s3_client

CHUNK = 1 << 20


class Source:
    uri: str

    def fingerprint(self, name: str) -> dict[str, Any] | None:
        """Metadata that changes when the file changes, or None when the source cannot tell;
        raises if the file is missing."""
        raise NotImplementedError

    def stream(self, name: str) -> tuple[Iterator[bytes], int | None]:
        """The file's bytes in chunks, and its size when known."""
        raise NotImplementedError

    def file_uri(self, name: str) -> str:
        return f"{self.uri.rstrip('/')}/{name}"


class LocalSource(Source):
    def __init__(self, folder: Path, uri: str) -> None:
        self.folder = folder
        self.uri = uri

    def _path(self, name: str) -> Path:
        path = self.folder / name
        if not path.is_file():
            if not self.folder.is_dir():
                raise SourceNotFoundError(self.uri, "an existing folder", "no such folder")
            raise SourceNotFoundError(str(path), "a file", "no such file")
        return path

    def fingerprint(self, name: str) -> dict[str, Any]:
        st = self._path(name).stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def stream(self, name: str) -> tuple[Iterator[bytes], int | None]:
        path = self._path(name)

        def chunks(fh: IO[bytes]) -> Iterator[bytes]:
            with fh:
                while block := fh.read(CHUNK):
                    yield block

        return chunks(path.open("rb")), path.stat().st_size


class HttpSource(Source):
    """An ``http(s)://`` URL prefix; retries connection errors and 5xx with backoff."""

    def __init__(self, uri: str) -> None:
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        self.uri = uri
        self.session = requests.Session()
        retry = Retry(total=3, backoff_factor=0.5, status_forcelist=(502, 503, 504), allowed_methods=None)
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.session.mount("https://", HTTPAdapter(max_retries=retry))
        self.timeout = (5, 60)

    def _request(self, method: str, name: str, **kwargs: Any) -> Any:
        import requests

        url = self.file_uri(name)
        try:
            response = self.session.request(method, url, timeout=self.timeout, allow_redirects=True, **kwargs)
        except requests.RequestException as exc:
            raise SourceUnavailableError(url, "a reachable HTTP server", type(exc).__name__) from exc
        if response.status_code != 200:
            response.close()
            error = SourceUnavailableError if response.status_code >= 500 else SourceNotFoundError
            raise error(url, "HTTP 200", f"HTTP {response.status_code}")
        return response

    def fingerprint(self, name: str) -> dict[str, Any] | None:
        import requests

        url = self.file_uri(name)
        try:
            response = self.session.head(url, timeout=self.timeout, allow_redirects=True)
        except requests.RequestException as exc:
            raise SourceUnavailableError(url, "a reachable HTTP server", type(exc).__name__) from exc
        if response.status_code == 404:
            raise SourceNotFoundError(url, "HTTP 200", "HTTP 404")
        if response.status_code != 200:  # HEAD refused (405, 403 on presigned URLs): just fetch
            return None
        found = {k: response.headers.get(k) for k in ("ETag", "Last-Modified", "Content-Length")}
        # Without a validator a same-size change would go unnoticed: fetch every time instead.
        return found if found["ETag"] or found["Last-Modified"] else None

    def stream(self, name: str) -> tuple[Iterator[bytes], int | None]:
        import requests
        import urllib3

        response = self._request("GET", name, stream=True)
        size = response.headers.get("Content-Length")
        url = self.file_uri(name)

        def chunks() -> Iterator[bytes]:
            try:
                # The bytes as stored: a .gz served with Content-Encoding: gzip stays compressed.
                yield from response.raw.stream(CHUNK, decode_content=False)
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                # A connection dropped mid-body (urllib3's ProtocolError, IncompleteRead): retryable.
                raise SourceUnavailableError(url, "a complete download", type(exc).__name__) from exc
            finally:
                response.close()

        return chunks(), int(size) if size else None


class S3Source(Source):
    """``s3://bucket/prefix`` through boto3 (``AWS_ENDPOINT_URL``, standard credential chain)."""

    def __init__(self, uri: str) -> None:
        parsed = urlparse(uri)
        self.uri = uri
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.client = s3_client()

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _call(self, name: str, method: str) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return getattr(self.client, method)(Bucket=self.bucket, Key=self._key(name))
        except ClientError as exc:
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            kind = SourceUnavailableError if status >= 500 else SourceNotFoundError
            raise kind(self.file_uri(name), "an existing S3 object", f"S3 {error.get('Code', status)}") from exc
        except NoCredentialsError as exc:
            raise SourceNotFoundError(self.file_uri(name), "AWS credentials (environment, profile or role)", "none") from exc
        except BotoCoreError as exc:
            where = f"a reachable S3 endpoint at {endpoint_url(self.client)}"
            raise SourceUnavailableError(self.file_uri(name), where, str(exc)) from exc

    def fingerprint(self, name: str) -> dict[str, Any]:
        head = self._call(name, "head_object")
        return {"ETag": head.get("ETag"), "size": head.get("ContentLength")}

    def stream(self, name: str) -> tuple[Iterator[bytes], int | None]:
        from botocore.exceptions import BotoCoreError

        obj = self._call(name, "get_object")
        where, endpoint = self.file_uri(name), endpoint_url(self.client)

        def chunks() -> Iterator[bytes]:
            try:
                yield from obj["Body"].iter_chunks(CHUNK)
            except (BotoCoreError, OSError) as exc:
                raise SourceUnavailableError(where, f"a complete download from {endpoint}", str(exc)) from exc

        return chunks(), obj.get("ContentLength")


def open_source(uri: str) -> Source:
    """The :class:`Source` for a folder path, ``file://``, ``http(s)://`` or ``s3://`` URI."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        return HttpSource(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise SourceNotFoundError("source_uri", "s3://bucket/prefix", uri)
        return S3Source(uri)
    if parsed.scheme == "file":
        return LocalSource(Path(parsed.path), uri)
    if parsed.scheme == "":
        return LocalSource(Path(uri).expanduser(), uri)
    raise SourceNotFoundError("source_uri", "a folder, file://, http(s):// or s3:// URI", uri)

