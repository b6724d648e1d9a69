"""What an operator sets for the serving endpoint."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.config.base import check_range, env_flag, env_number
from pipeline.errors import ConfigError

RUNTIMES = ("torch", "onnx", "onnx-int8")
"""What ``pipeline serve`` can answer with (``--runtime``, ``PIPELINE_SERVE_RUNTIME``)."""


@dataclass(frozen=True)
class ServingSettings:
    """What an operator sets for ``pipeline serve``: authentication and the limits that keep the
    endpoint up under hostile or broken clients. Read with :meth:`from_env`; never from a DAG Param
    (whoever triggers a DAG must not lift a limit)."""

    runtime: str = "torch"
    """``PIPELINE_SERVE_RUNTIME`` (``pipeline serve --runtime`` wins): what answers requests.
    ``torch``, the registered pt2 program; ``onnx`` or ``onnx-int8``, the version's ONNX float32
    or INT8 variant on ONNX Runtime (:mod:`pipeline.registry.export`), served only if it passed its
    checks (a version whose variant failed is not loaded, and infra validation fails)."""

    workers: int = 1
    """``PIPELINE_SERVE_WORKERS`` (``pipeline serve --workers`` wins): server processes sharing the
    listening socket, each with its own copy of the model, its own micro-batcher and registry
    watcher; 0 means one per usable CPU core. The connection, in-flight and buffered-bytes limits
    are the endpoint's: each worker holds its share. Torch threads are divided between them."""

    token: str | None = field(default=None, repr=False)
    """``PIPELINE_SERVE_TOKEN``, or the contents of the file ``PIPELINE_SERVE_TOKEN_FILE`` (read at
    start; at least 16 characters; a file that others may write is refused): when set, every route
    but ``/health``, ``/ready`` and the OpenAPI document needs ``Authorization: Bearer <token>``
    (401 otherwise). Unset: no authentication (the default, on loopback)."""

    metrics_open: bool = False
    """``PIPELINE_SERVE_METRICS_OPEN``: ``true`` serves ``/metrics`` without the token (for a
    Prometheus scraper that cannot send one)."""

    max_connections: int = 512
    """``PIPELINE_SERVE_MAX_CONNECTIONS``: open connections at once; a connection beyond gets 503
    with ``Retry-After`` and is closed (``/health`` included: probes compete for connections)."""

    max_in_flight: int = 128
    """``PIPELINE_SERVE_MAX_IN_FLIGHT``: requests being handled at once, ``/health`` and ``/ready``
    not counted; beyond, 503 with ``Retry-After``."""

    max_buffered_bytes: int = 256 * 1024 * 1024
    """``PIPELINE_SERVE_MAX_BUFFERED_BYTES``: request-body bytes held in memory at once, over all
    requests (a body reserves its declared length on arrival: 32 bodies of the largest size);
    beyond, 503 with ``Retry-After``."""

    body_timeout_s: float = 30.0
    """``PIPELINE_SERVE_BODY_TIMEOUT_S``: seconds a whole request body may take to arrive (a floor
    of about 280 KB/s for the largest body); a slower one gets 408 and the connection is closed."""

    header_timeout_s: float = 10.0
    """``PIPELINE_SERVE_HEADER_TIMEOUT_S``: seconds a new connection (or the next request on a
    kept-alive one) may take to send its request line and headers; then it is closed."""

    keep_alive_s: float = 5.0
    """``PIPELINE_SERVE_KEEP_ALIVE_S``: seconds an idle kept-alive connection stays open."""

    retry_after_s: int = 1
    """``PIPELINE_SERVE_RETRY_AFTER_S``: the ``Retry-After`` a refused client is told to wait."""

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ConfigError("PIPELINE_SERVE_RUNTIME", f"one of {', '.join(RUNTIMES)}", repr(self.runtime))
        if self.token is not None and (len(self.token) < 16 or any(c.isspace() for c in self.token)):
            raise ConfigError(
                "PIPELINE_SERVE_TOKEN", "at least 16 characters without spaces", f"{len(self.token)} characters"
            )
        for name, low, high in (
            ("workers", 0, 1024),
            ("max_connections", 1, 1_000_000),
            ("max_in_flight", 1, 1_000_000),
            ("max_buffered_bytes", 1024 * 1024, 1 << 40),
            ("body_timeout_s", 0.1, 3600),
            ("header_timeout_s", 0.1, 3600),
            ("keep_alive_s", 0.1, 3600),
            ("retry_after_s", 0, 3600),
        ):
            check_range(f"PIPELINE_SERVE_{name.upper()}", getattr(self, name), low, high)

    def worker_count(self, cpus: int) -> int:
        """The number of server processes on a machine with ``cpus`` usable cores."""
        return self.workers or max(1, cpus)

    def per_worker(self, workers: int) -> ServingSettings:
        """The limits one of ``workers`` processes holds: its share of the endpoint's (at least 1,
        and 1 MiB of buffered bytes)."""
        if workers <= 1:
            return self
        return replace(
            self,
            workers=1,
            max_connections=max(1, self.max_connections // workers),
            max_in_flight=max(1, self.max_in_flight // workers),
            max_buffered_bytes=max(1024 * 1024, self.max_buffered_bytes // workers),
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServingSettings:
        env = os.environ if environ is None else environ
        token, token_file = env.get("PIPELINE_SERVE_TOKEN") or None, env.get("PIPELINE_SERVE_TOKEN_FILE")
        if token and token_file:
            raise ConfigError(
                "PIPELINE_SERVE_TOKEN_FILE", "one of PIPELINE_SERVE_TOKEN and PIPELINE_SERVE_TOKEN_FILE", "both set"
            )
        if token_file:
            token = read_token_file(Path(token_file))
        return cls(
            runtime=env.get("PIPELINE_SERVE_RUNTIME") or "torch",
            token=token,
            metrics_open=env_flag(env, "PIPELINE_SERVE_METRICS_OPEN"),
            **{
                name: env_number(
                    env, f"PIPELINE_SERVE_{name.upper()}", type(getattr(cls, name)), getattr(cls, name), -1e18, 1e18
                )
                for name in (
                    "workers",
                    "max_connections",
                    "max_in_flight",
                    "max_buffered_bytes",
                    "body_timeout_s",
                    "header_timeout_s",
                    "keep_alive_s",
                    "retry_after_s",
                )
            },
        )


def read_token_file(path: Path) -> str:
    import stat

    where = f"PIPELINE_SERVE_TOKEN_FILE {path}"
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(where, "a regular file holding the token", "something else")
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(where, "a file only its owner may write", f"mode {stat.S_IMODE(mode):o}")
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(where, "a readable UTF-8 file holding the token", type(exc).__name__) from None
