"""Helpers for tests that run real services on loopback."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class RecordingServer:
    """A static HTTP server over a folder that records each request's method and path."""

    def __init__(self, folder: Path, validators: bool = True) -> None:
        """``validators=False`` drops Last-Modified, as some servers and CDNs do."""
        self.requests: list[tuple[str, str]] = []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def send_head(self):
                requests.append((self.command, self.path))
                return super().send_head()

            def send_header(self, keyword, value):
                if validators or keyword not in ("Last-Modified", "ETag"):
                    super().send_header(keyword, value)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> RecordingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``pipeline`` console script."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "pipeline"), *args],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600,
    )


class MlflowServer:
    """A real ``mlflow server`` process on a free loopback port over an existing store: what a
    person's browser (the MLflow UI) and the REST API read."""

    def __init__(self, backend_store_uri: str, artifact_root: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", backend_store_uri,
            "--default-artifact-root", artifact_root, "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]

    def __enter__(self) -> MlflowServer:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, timeout=120)
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
