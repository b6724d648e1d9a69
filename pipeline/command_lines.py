"""The ``pipeline`` command lines that one process builds to start another.

Infra validation (``pipeline.registry``), the benchmarks and the tests all start ``pipeline
serve`` in a fresh process; they build its command line here, once. It lives in the base layer
because registry and serving are independent layers, neither importing the other.
"""

from __future__ import annotations

import sys


def serve_command(
    model_uri: str,
    *,
    port: int,
    host: str = "127.0.0.1",
    poll_interval: float | None = None,
    runtime: str | None = None,
    workers: int | None = None,
) -> list[str]:
    """The ``pipeline serve`` command line that serves ``model_uri`` on ``host:port``, run by this
    interpreter; ``poll_interval`` (seconds between registry checks of an alias) and ``runtime``
    (``torch``, ``onnx``, ``onnx-int8``) and ``workers`` (server processes) are left to the
    command's own defaults when None."""
    command = [sys.executable, "-m", "pipeline", "serve", "--model-uri", model_uri, "--host", host, "--port", str(port)]
    if poll_interval is not None:
        command += ["--poll-interval", str(poll_interval)]
    if runtime is not None:
        command += ["--runtime", runtime]
    if workers is not None:
        command += ["--workers", str(workers)]
    return command
