"""Several server processes on one listening socket (``pipeline serve --workers N``).

The supervisor binds the socket once and starts ``N`` processes (spawned: none shares the
parent's torch or thread state) that each run a uvicorn server on it; the kernel hands each new
connection to one of them. Their Prometheus metrics go to one multiprocess directory
(``PROMETHEUS_MULTIPROC_DIR``), so that ``GET /metrics`` on any of them adds up all. A worker
that dies is started again; one that exits with :data:`UNLOADABLE_EXIT` (its model never loaded)
stops them all; SIGTERM or SIGINT stops them all gracefully (uvicorn's own shutdown in each), and
a supervisor killed outright takes its workers with it (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

UNLOADABLE_EXIT = 3
"""A worker's exit status when it cannot serve (its model never loaded): the others are stopped."""
STOP_WAIT_S = 30.0
"""How long a worker has to finish its requests after SIGTERM before it is killed."""


def bind(host: str, port: int) -> Any:
    """A TCP socket bound to ``host:port`` that child processes inherit (not yet listening: the
    first worker to start listens)."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _supervised(parent_pid: int, target: Callable[..., None], *args: Any) -> None:
    """A worker process: ``target(*args)``, ended with the supervisor even if it is SIGKILLed."""
    from pipeline.serving.guards import die_with_parent

    die_with_parent(parent_pid)
    target(*args)


def run_workers(count: int, host: str, port: int, target: Callable[..., None], args: tuple[Any, ...]) -> bool:
    """Run ``target(*args, [socket])`` in ``count`` processes until SIGTERM or SIGINT; False when
    a worker exited with :data:`UNLOADABLE_EXIT` (the others are then stopped too)."""
    import multiprocessing
    import multiprocessing.connection
    import shutil
    import signal
    import tempfile

    from prometheus_client import multiprocess

    metrics_dir = tempfile.mkdtemp(prefix="pipeline-serve-metrics-")
    previous_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by each spawned worker at its import
    sock = bind(host, port)
    context = multiprocessing.get_context("spawn")
    stopping = threading.Event()

    def start() -> Any:
        process = context.Process(
            target=_supervised, args=(os.getpid(), target, *args, [sock]), name="pipeline-serve-worker"
        )
        process.start()
        return process

    def stop(signum: int, frame: Any) -> None:
        stopping.set()

    handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    processes: list[Any] = []
    served = True
    try:
        processes = [start() for _ in range(count)]
        while not stopping.is_set():
            multiprocessing.connection.wait([p.sentinel for p in processes], timeout=0.5)
            for index, process in enumerate(processes):
                if process.is_alive() or stopping.is_set():
                    continue
                if process.exitcode == UNLOADABLE_EXIT:
                    served = False
                    stopping.set()
                    break
                log.warning("serve worker %s exited with %s; starting another", process.pid, process.exitcode)
                multiprocess.mark_process_dead(process.pid)
                processes[index] = start()
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()  # uvicorn finishes the requests in flight, then exits
        for process in processes:
            process.join(timeout=STOP_WAIT_S)
            if process.is_alive():
                process.kill()
                process.join()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if previous_dir is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = previous_dir
    return served
