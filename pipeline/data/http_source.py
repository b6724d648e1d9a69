"""An ``http(s)://`` URL prefix as a dataset source (:class:`~pipeline.data.sources.Source`).

Redirects are followed by hand, each one checked against the source's own scheme, host and port
and ``PIPELINE_REDIRECT_HOSTS``; an announced size over ``PIPELINE_MAX_DOWNLOAD_BYTES`` is refused
before the body is read (:class:`~pipeline.config.SourceLimits`); credentials in the URL are
masked in messages and in urllib3's log records.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

from pipeline.config import SourceLimits
from pipeline.data.sources import CHUNK, Source
from pipeline.errors import SourceLimitError, SourceNotFoundError, SourceUnavailableError
from pipeline.redact import redact_text, redact_uri

#: Redirects an HTTP source follows for one request, each checked against the allowed hosts.
MAX_REDIRECTS = 5


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
