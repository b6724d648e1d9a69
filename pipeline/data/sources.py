"""Dataset sources: a local folder (or ``file://``), an ``http(s)://`` URL prefix, an ``s3://``
prefix. Each can tell a file's cheap fingerprint (size and mtime, ETag or Last-Modified) without
downloading it, so that an unchanged source is not fetched again, and can stream a file.

What a source may do is bounded (:class:`~pipeline.config.SourceLimits`, read from the
environment): an HTTP source follows redirects only to its own scheme, host and port, or to a
host in ``PIPELINE_REDIRECT_HOSTS``; an announced size over ``PIPELINE_MAX_DOWNLOAD_BYTES`` is
refused before the body is read; a local source follows no symbolic link out of its folder.
Messages show :meth:`Source.file_uri`, with credentials redacted; only requests use the full URI.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse, urlsplit, urlunsplit

from pipeline.config import SourceLimits
from pipeline.errors import SourceLimitError, SourceNotFoundError, SourceUnavailableError
from pipeline.redact import redact_text, redact_uri
from pipeline.s3 import endpoint_url, s3_client

CHUNK = 1 << 20

#: Redirects an HTTP source follows for one request, each checked against the allowed hosts.
MAX_REDIRECTS = 5


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
        """The file's URI as messages, logs and records show it: credentials redacted."""
        return redact_uri(self._file_url(name))

    def _file_url(self, name: str) -> str:
        """The file's full URI, credentials included: for requests only."""
        return f"{self.uri.rstrip('/')}/{name}"


class LocalSource(Source):
    """A folder. A symbolic link in it is followed only when its target, resolved, is inside the
    folder too (a file shared between two names); one that leads out of it is refused, so a
    source folder cannot make the worker copy any file it can read."""

    def __init__(self, folder: Path, uri: str) -> None:
        self.folder = folder
        self.uri = uri

    def _path(self, name: str) -> Path:
        path = self.folder / name
        if not path.is_file():
            if not self.folder.is_dir():
                raise SourceNotFoundError(self.uri, "an existing folder", "no such folder")
            raise SourceNotFoundError(str(path), "a file", "no such file")
        real = path.resolve()
        if not real.is_relative_to(self.folder.resolve()):
            raise SourceNotFoundError(
                str(path), "a file inside the source folder", "a symbolic link to a file outside it"
            )
        return real

    def fingerprint(self, name: str) -> dict[str, Any]:
        st = self._path(name).stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def stream(self, name: str) -> tuple[Iterator[bytes], int | None]:
        path = self._path(name)

        def chunks() -> Iterator[bytes]:
            # O_NOFOLLOW: a link put in place of the checked file since is not followed either.
            with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as fh:
                while block := fh.read(CHUNK):
                    yield block

        return chunks(), path.stat().st_size


class _RedactingFilter(logging.Filter):
    """Masks credentials in a library's log records (urllib3 logs each request line, query
    included, at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


_REDACTING = _RedactingFilter()


def _redact_library_logs() -> None:
    logger = logging.getLogger("urllib3.connectionpool")
    if _REDACTING not in logger.filters:
        logger.addFilter(_REDACTING)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return (
        parts.scheme.lower(),
        (parts.hostname or "").lower(),
        parts.port or {"http": 80, "https": 443}.get(parts.scheme),
    )


class HttpSource(Source):
    """An ``http(s)://`` URL prefix (its query, such as a token, is kept on every file's URL);
    retries connection errors and 5xx with backoff. Redirects are followed by hand, each one
    checked: to the same scheme, host and port, or to a host in ``limits.redirect_hosts``."""

    def __init__(self, uri: str, limits: SourceLimits | None = None) -> None:
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        self.uri = uri
        self.limits = limits or SourceLimits.from_env()
        _redact_library_logs()
        self.session = requests.Session()
        retry = Retry(
            total=3,
            backoff_factor=0.5,
            status_forcelist=(502, 503, 504),
            allowed_methods=None,
            redirect=False,
            raise_on_redirect=False,
        )
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.session.mount("https://", HTTPAdapter(max_retries=retry))
        self.timeout = (5, 60)

    def _file_url(self, name: str) -> str:
        parts = urlsplit(self.uri)
        return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{name}"))

    def _redirect_allowed(self, start: str, target: str) -> bool:
        scheme, host, port = _origin(target)
        if scheme not in ("http", "https"):
            return False
        return (
            _origin(start) == (scheme, host, port)
            or host in self.limits.redirect_hosts
            or (f"{host}:{port}" in self.limits.redirect_hosts)
        )

    def _send(self, method: str, name: str, **kwargs: Any) -> Any:
        """The response to ``method`` on the file's URL, after the allowed redirects."""
        import requests
        from requests.utils import get_auth_from_url

        start = url = self._file_url(name)
        auth = get_auth_from_url(start)
        for _ in range(MAX_REDIRECTS + 1):
            same_origin = _origin(url) == _origin(start)
            try:
                response = self.session.request(
                    method,
                    url,
                    timeout=self.timeout,
                    allow_redirects=False,
                    auth=auth if same_origin and any(auth) else None,
                    **kwargs,
                )
            except requests.RequestException as exc:
                raise SourceUnavailableError(
                    self.file_uri(name), "a reachable HTTP server", type(exc).__name__
                ) from exc
            if not response.is_redirect:
                return response
            target = urljoin(url, response.headers["location"])
            response.close()
            if not self._redirect_allowed(start, target):
                raise SourceLimitError(
                    self.file_uri(name),
                    "redirects to the same scheme, host and port, or to a host in PIPELINE_REDIRECT_HOSTS",
                    f"a redirect to {redact_uri(target)}",
                )
            url = target
        raise SourceUnavailableError(self.file_uri(name), f"at most {MAX_REDIRECTS} redirects", "more")

    def _request(self, method: str, name: str, **kwargs: Any) -> Any:
        response = self._send(method, name, **kwargs)
        if response.status_code != 200:
            response.close()
            error = SourceUnavailableError if response.status_code >= 500 else SourceNotFoundError
            raise error(self.file_uri(name), "HTTP 200", f"HTTP {response.status_code}")
        return response

    def fingerprint(self, name: str) -> dict[str, Any] | None:
        url = self.file_uri(name)
        response = self._send("HEAD", name)
        response.close()
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
        size = response.headers.get("Content-Length", "")
        url = self.file_uri(name)
        if size.isdigit() and int(size) > self.limits.max_download_bytes:
            response.close()
            raise SourceLimitError(
                url,
                f"at most {self.limits.max_download_bytes} bytes (PIPELINE_MAX_DOWNLOAD_BYTES)",
                f"Content-Length {size}",
            )

        def chunks() -> Iterator[bytes]:
            try:
                # The bytes as stored: a .gz served with Content-Encoding: gzip stays compressed.
                # read1 returns what one read of the socket gives, so that the caller's deadline
                # is checked even while a server trickles bytes.
                while block := response.raw.read1(CHUNK, decode_content=False):
                    yield block
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                # A connection dropped mid-body (urllib3's ProtocolError, IncompleteRead): retryable.
                raise SourceUnavailableError(url, "a complete download", type(exc).__name__) from exc
            finally:
                response.close()

        return chunks(), int(size) if size.isdigit() else None


class S3Source(Source):
    """``s3://bucket/prefix`` through boto3 (``AWS_ENDPOINT_URL``, standard credential chain)."""

    def __init__(self, uri: str, limits: SourceLimits | None = None) -> None:
        parsed = urlparse(uri)
        self.uri = uri
        self.limits = limits or SourceLimits.from_env()
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
            raise SourceNotFoundError(
                self.file_uri(name), "AWS credentials (environment, profile or role)", "none"
            ) from exc
        except BotoCoreError as exc:
            where = f"a reachable S3 endpoint at {endpoint_url(self.client)}"
            raise SourceUnavailableError(self.file_uri(name), where, redact_text(str(exc))) from exc

    def fingerprint(self, name: str) -> dict[str, Any]:
        head = self._call(name, "head_object")
        return {"ETag": head.get("ETag"), "size": head.get("ContentLength")}

    def stream(self, name: str) -> tuple[Iterator[bytes], int | None]:
        from botocore.exceptions import BotoCoreError

        obj = self._call(name, "get_object")
        where, endpoint = self.file_uri(name), endpoint_url(self.client)
        if (obj.get("ContentLength") or 0) > self.limits.max_download_bytes:
            obj["Body"].close()
            raise SourceLimitError(
                where,
                f"at most {self.limits.max_download_bytes} bytes (PIPELINE_MAX_DOWNLOAD_BYTES)",
                f"an object of {obj['ContentLength']} bytes",
            )

        def chunks() -> Iterator[bytes]:
            try:
                yield from obj["Body"].iter_chunks(CHUNK)
            except (BotoCoreError, OSError) as exc:
                raise SourceUnavailableError(
                    where, f"a complete download from {endpoint}", redact_text(str(exc))
                ) from exc

        return chunks(), obj.get("ContentLength")


def open_source(uri: str, limits: SourceLimits | None = None) -> Source:
    """The :class:`Source` for a folder path, ``file://``, ``http(s)://`` or ``s3://`` URI,
    bounded by ``limits`` (default: :meth:`SourceLimits.from_env`)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        return HttpSource(uri, limits)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise SourceNotFoundError("source_uri", "s3://bucket/prefix", redact_uri(uri))
        return S3Source(uri, limits)
    if parsed.scheme == "file":
        return LocalSource(Path(parsed.path), uri)
    if parsed.scheme == "":
        return LocalSource(Path(uri).expanduser(), uri)
    raise SourceNotFoundError("source_uri", "a folder, file://, http(s):// or s3:// URI", redact_uri(uri))
