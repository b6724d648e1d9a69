"""The endpoint's ASGI guards: the bearer token, the cap on requests in flight, and the worker
processes that parse big bodies off the event loop; each refusal a one-line JSON problem."""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from collections.abc import MutableMapping
from typing import Any

from pipeline.config import ServingSettings
from pipeline.serving.bodies import decode_body
from pipeline.serving.payload import InputShape

PROBES = frozenset({"/health", "/ready"})
"""Routes that are never authenticated nor counted against ``max_in_flight`` or ``max_connections``."""

PARSE_INLINE_BYTES = 64 * 1024
"""Bodies up to this size are parsed on the event loop (about a millisecond); larger ones in a
worker process: ``json.loads`` and ``np.asarray`` hold the GIL for their whole call (about 0.1 s
for 8 MB), so a thread would still stall every other request, ``/health`` included."""
PARSE_WORKERS = 2
"""Worker processes for big bodies; more requests queue for them (their bodies are counted
against ``max_buffered_bytes`` meanwhile)."""


DRAIN_S = 2.0
"""A refused request's body is read and dropped for up to this long before the answer, so that
the client, still sending, reads the 503 (or 401, 413) instead of a reset connection."""


async def drain(scope: MutableMapping[str, Any], receive: Any, seconds: float = DRAIN_S) -> None:
    """Read and drop the request body (none kept) until it ends or ``seconds`` pass."""
    headers = dict(scope["headers"])
    if headers.get(b"content-length", b"0") == b"0" and b"transfer-encoding" not in headers:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (left := deadline - loop.time()) > 0:
        try:
            message = await asyncio.wait_for(receive(), left)
        except TimeoutError:
            return
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


async def refuse(
    scope: MutableMapping[str, Any],
    receive: Any,
    send: Any,
    status: int,
    detail: str,
    headers: dict[str, str] | None = None,
) -> None:
    await drain(scope, receive)
    await send_problem(send, status, detail, headers)


async def send_problem(send: Any, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """A JSON problem straight on the ASGI ``send`` (for middleware), closing the connection."""
    body = json.dumps({"detail": detail}).encode()
    head = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *((k.encode(), v.encode()) for k, v in (headers or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class RequireToken:
    """ASGI middleware: ``Authorization: Bearer <token>`` on every route but the probes and the
    docs (and ``/metrics`` when opened); 401 with ``WWW-Authenticate: Bearer`` otherwise."""

    def __init__(self, app: Any, token: str, open_paths: frozenset[str]) -> None:
        self.app, self.token, self.open_paths = app, token.encode(), open_paths

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            header = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
                found = "no Authorization header" if not header else "a wrong or malformed one"
                await refuse(
                    scope,
                    receive,
                    send,
                    401,
                    f"Authorization: expected a bearer token, found {found}",
                    {"www-authenticate": 'Bearer realm="pipeline serve"'},
                )
                return
        await self.app(scope, receive, send)


class Admission:
    """ASGI middleware: at most ``max_in_flight`` requests at once (the probes not counted);
    beyond, 503 with ``Retry-After``. The event loop is single-threaded: a plain counter."""

    def __init__(self, app: Any, serving: ServingSettings) -> None:
        self.app, self.serving, self.in_flight = app, serving, 0

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in PROBES:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.serving.max_in_flight:
            await refuse(
                scope,
                receive,
                send,
                503,
                f"requests in flight: expected at most {self.serving.max_in_flight}, found "
                "that many already; retry later",
                {"retry-after": str(self.serving.retry_after_s)},
            )
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class BodyDecoder:
    """Decodes big bodies in worker processes (spawned on first use), so that the GIL they hold
    is not the server's."""

    def __init__(self, workers: int = PARSE_WORKERS) -> None:
        self.workers = workers
        self._pool: Any = None

    def start(self) -> None:
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: the server process runs threads (torch, the registry watch).
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=die_with_parent,
                initargs=(os.getpid(),),
            )

    async def decode(self, kind: str, body: bytes, shape: InputShape, declared_shape: str | None = None) -> Any:
        from concurrent.futures.process import BrokenProcessPool

        self.start()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, decode_body, kind, body, shape, declared_shape
            )
        except BrokenProcessPool:  # a worker died (killed for memory?): new ones for the next request
            self._pool = None
            raise

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def die_with_parent(parent_pid: int) -> None:
    """In a child process (a decoder worker, a server worker): end when the parent ``parent_pid``
    ends, even by SIGKILL. A pool's workers hold both ends of their task queue, so they never see
    it close, and would wait for ever; a server worker would go on serving the port."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(0)
