"""Helpers for tests that run real services on loopback."""

from __future__ import annotations

import http.server
import os
import signal
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


class TcpProxy:
    """A TCP relay on a fixed loopback port in front of a service, which a test can take down
    (open connections reset, new ones refused) and bring back on the same port: an outage of the
    service exactly as its clients see it, while the service itself keeps its state."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cut = threading.Event()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._cut_after: int | None = None
        self._relayed = 0

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Refuse new connections and reset the open ones."""
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._connections = self._connections, set()
        if listener is not None:
            # close() alone would leave the socket listening while the accept thread is blocked
            # in accept(); shutdown() wakes it up.
            _close(listener)
        for conn in connections:
            _close(conn)

    def cut_after(self, nbytes: int) -> None:
        """Stop once ``nbytes`` more bytes went from the service to its clients (mid-transfer);
        ``self.cut`` is set when that happened."""
        with self._lock:
            self._relayed, self._cut_after = 0, nbytes
            self.cut.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._listener is not listener:
                    _close(client)
                    _close(upstream)
                    return
                self._connections |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, dest: socket.socket, downstream: bool) -> None:
        try:
            while data := source.recv(65536):
                dest.sendall(data)
                if downstream and self._count(len(data)):
                    self.stop()
                    self.cut.set()
                    return
        except OSError:
            pass
        _close(source)
        _close(dest)

    def _count(self, n: int) -> bool:
        with self._lock:
            if self._cut_after is None:
                return False
            self._relayed += n
            if self._relayed < self._cut_after:
                return False
            self._cut_after = None
            return True

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


class ProcessGroup:
    """Long-running service processes, each in its own session (so that its children, such as
    Celery's pool or gunicorn's workers, can be stopped with it), output to a log file each.

    :meth:`stop` ends them all and returns every process of theirs still alive afterwards,
    which should be none."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        log.close()
        self.processes[name] = process
        return process

    def log_tail(self, name: str, lines: int = 40) -> str:
        text = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def check_alive(self) -> None:
        dead = {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}
        if dead:
            tails = "\n".join(f"--- {name} (exit {code})\n{self.log_tail(name)}" for name, code in dead.items())
            raise RuntimeError(f"service processes exited: {dead}\n{tails}")

    def stop(self, timeout: float = 30.0) -> list[str]:
        import psutil

        tree = []
        for process in self.processes.values():
            try:
                parent = psutil.Process(process.pid)
                tree += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for proc in tree:
            try:
                proc.info_cmdline = proc.cmdline()[:4]
            except psutil.Error:
                proc.info_cmdline = ["?"]
        for process in self.processes.values():
            _signal_group(process.pid, signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=timeout)
        for proc in alive:
            _signal_group(proc.pid, signal.SIGKILL)
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        for process in self.processes.values():
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        return [f"{p.pid} {' '.join(p.info_cmdline)}" for p in tree if _alive(p)]


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class ScriptedServer:
    """A loopback HTTP server whose every request (GET or HEAD) is answered by
    ``respond(handler, server)``: for servers that misbehave on purpose (an endless body, a
    redirect elsewhere). ``server.closing`` is set on exit; a ``respond`` that loops must watch
    it (and bound itself), so that the server always stops."""

    def __init__(self, respond, host: str = "127.0.0.1") -> None:
        self.closing = threading.Event()
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append((self.command, self.path))
                respond(self, server)

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()
