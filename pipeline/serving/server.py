"""The server process of ``pipeline serve``: uvicorn's h11 protocol with the connection limits and
timeouts, and the settling that keeps a long-lived process steady."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from typing import Any

from pipeline.config import ServingSettings, Settings
from pipeline.serving.app import POLL_S, Metrics, create_app
from pipeline.serving.guards import PROBES
from pipeline.serving.slot import ModelSlot

MAX_HEADER_BYTES = 16 * 1024
"""Request line and headers (h11's incomplete-event limit): beyond, 400 and the connection closed."""
PROBE_LINES = tuple(f"GET {path}{end}".encode() for path in sorted(PROBES) for end in (" ", "?"))
"""How a probe's request line starts: such a connection beyond ``max_connections`` is served one
answer and closed, so that a connection flood does not fail the orchestrator's liveness probe."""
KERNEL_CACHE = "64"
"""oneDNN's primitive cache capacity in the server (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``; an
operator's own value wins). Its default, 1024, keeps the kernels of every batch size the
micro-batcher has ever formed: +1.2 GB over a few hundred sizes with the default network, and the
soak's slow growth. 64 keeps single-image passes at full speed (their kernels stay cached)."""


def serve(
    model_uri: str,
    settings: Settings,
    host: str = "127.0.0.1",
    port: int = 8000,
    poll_s: float = POLL_S,
    runtime: str | None = None,
    workers: int | None = None,
) -> None:
    """Run the endpoint until stopped; raise if the model never loaded. ``runtime`` (``torch``,
    ``onnx``, ``onnx-int8``) overrides ``PIPELINE_SERVE_RUNTIME``, ``workers``
    ``PIPELINE_SERVE_WORKERS`` (:meth:`ServingSettings.worker_count`; several run under
    :func:`pipeline.serving.workers.run_workers`, each with its share of the limits and cores)."""
    from pipeline.errors import InfraValidationError
    from pipeline.serving.workers import run_workers
    from pipeline.training.hardware import usable_cpus

    serving = ServingSettings.from_env()
    if runtime:
        serving = dataclasses.replace(serving, runtime=runtime)
    if workers is not None:
        serving = dataclasses.replace(serving, workers=workers)
    cpus = usable_cpus()
    count = serving.worker_count(cpus)
    if count == 1:
        error = run_worker(model_uri, settings, host, port, poll_s, serving, cpus)
    else:
        share = (model_uri, settings, host, port, poll_s, serving.per_worker(count), max(1, cpus // count))
        error = None if run_workers(count, host, port, worker_main, share) else "it did not load in a worker"
    if error:
        raise InfraValidationError(model_uri, "a model that loads", error)  # the CLI exits 2


def run_worker(
    model_uri: str,
    settings: Settings,
    host: str,
    port: int,
    poll_s: float,
    serving: ServingSettings,
    threads: int,
    sockets: list[Any] | None = None,
) -> str | None:
    """One server process: its model slot, app and uvicorn server, until stopped; returns why the
    model never loaded, or None. On the ``sockets`` of a supervisor, the model is loaded before
    the process takes connections (the kernel would give them to a worker not ready yet); alone,
    it listens at once and ``/ready`` says 503 until the model is loaded."""
    import torch
    import uvicorn

    torch.set_num_threads(max(1, threads))
    metrics = Metrics()
    slot = ModelSlot(model_uri, on_swap=metrics.served, runtime=serving.runtime)
    server = uvicorn.Server(server_config(create_app(slot, metrics, settings, poll_s, serving), serving, host, port))

    def stop_if_unloadable() -> None:
        while not slot.ready.wait(0.2):
            if slot.error:
                server.should_exit = True
                return

    settle_process()
    if sockets is not None:
        slot.load_first(settings)
        if slot.error:
            return slot.error
    threading.Thread(target=stop_if_unloadable, daemon=True).start()
    server.run(sockets=sockets)
    return slot.error


def worker_main(*args: Any) -> None:
    """A supervised worker's entry point (:func:`run_worker`'s arguments): exits with
    :data:`~pipeline.serving.workers.UNLOADABLE_EXIT` when the model never loaded."""
    import sys

    from pipeline.serving.workers import UNLOADABLE_EXIT

    if run_worker(*args):
        sys.exit(UNLOADABLE_EXIT)


def settle_process() -> None:
    """Make a long-lived serving process steady, before its first request and its first model:

    * bound oneDNN's primitive cache (:data:`KERNEL_CACHE`), so that memory stops growing with
      every new batch size;
    * move the heap of the imports (half a million objects: torch, MLflow, FastAPI) out of the
      garbage collector's reach with :func:`gc.freeze`. Without it, every full collection scans
      them all: a 0.3 s pause of the event loop every few seconds under load, which is what
      ``/health`` p99 and the request p99 measured. Models load after this, so an old model
      that a swap lets go is still collected.
    """
    import gc

    import mlflow.pytorch  # noqa: F401  the loader's modules, imported now to be frozen with the rest

    import pipeline.models.registered  # noqa: F401

    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", KERNEL_CACHE)
    gc.collect()
    gc.freeze()


def server_config(app: Any, serving: ServingSettings, host: str = "127.0.0.1", port: int = 8000) -> Any:
    """The uvicorn configuration ``pipeline serve`` runs ``app`` with: h11 with its header limit,
    the keep-alive timeout, and :func:`guarded_protocol` for the connection limit and timeouts."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        http=guarded_protocol(serving),
        timeout_keep_alive=serving.keep_alive_s,  # type: ignore[arg-type]  # a float delay works
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )


def guarded_protocol(serving: ServingSettings) -> type:
    """uvicorn's h11 protocol, plus: a connection beyond ``max_connections`` gets 503 with
    ``Retry-After`` and is closed (unless it asks for a probe: answered, then closed); a connection that sends no complete request line and headers
    within ``header_timeout_s`` (of its start, or of the previous answer) is closed; and a
    connection whose request body was left unread by the answer (413, 401, 503) is closed
    rather than kept reading it. (uvicorn's own ``limit_concurrency`` answers 503 without
    ``Retry-After`` and counts the probes too.)"""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.over_limit = len(self.connections) > serving.max_connections
            self.probe_only = False
            self.header_timer: Any = None
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            self.header_timer = self.loop.call_later(serving.header_timeout_s, self._headers_too_slow)

        def _headers_too_slow(self) -> None:
            self.header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.over_limit and self.conn.their_state is h11.IDLE and data.startswith(PROBE_LINES):
                self.probe_only = True  # a liveness probe is answered even beyond the limit, then closed
                self.over_limit = False
            if self.over_limit:
                if not self.transport.is_closing():
                    body = json.dumps(
                        {
                            "detail": f"connections: expected at most {serving.max_connections}, found "
                            "that many already; retry later"
                        }
                    ).encode()
                    self.transport.write(
                        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
                        + f"retry-after: {serving.retry_after_s}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
                        + body
                    )
                    self.transport.close()
                return
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE and self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def on_response_complete(self) -> None:
            body_unread = self.conn.their_state is h11.SEND_BODY
            super().on_response_complete()
            if self.transport.is_closing():
                return
            if body_unread or self.probe_only:
                self.transport.close()
            elif self.conn.their_state is h11.IDLE:
                self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None
            super().connection_lost(exc)

    return GuardedH11Protocol
