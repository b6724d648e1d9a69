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


def wait_until_ready(server: subprocess.Popen, port: int, timeout: float = 120.0) -> None:
    """Until ``pipeline serve`` (the process ``server``) answers 200 on ``/ready``; fails if it
    exits first or takes longer than ``timeout`` seconds."""
    import requests

    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/ready", timeout=5).ok:
                return
        except requests.ConnectionError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.5)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``pipeline`` console script."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "pipeline"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


class MlflowServer:
    """A real ``mlflow server`` process on a free loopback port over an existing store: what a
    person's browser (the MLflow UI) and the REST API read."""

    def __init__(self, backend_store_uri: str, artifact_root: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            backend_store_uri,
            "--default-artifact-root",
            artifact_root,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
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
        process = subprocess.Popen(
            command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
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


class RequestCuttingProxy(TcpProxy):
    """A :class:`TcpProxy` that can also go down at the worst moment for a client: once a request
    containing a given byte string has reached the service, the service's answer to it is not
    relayed and the proxy stops. The service did the work; the client never hears of it, and
    retries into an outage."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self._pattern: bytes | None = None
        self._marked: set[socket.socket] = set()

    def cut_at_request(self, pattern: bytes | None) -> None:
        """Stop at the answer to the next request whose bytes contain ``pattern`` (None: do not);
        ``self.cut`` is set when that happened."""
        with self._lock:
            self._pattern, self._marked = pattern, set()
            if pattern is not None:
                self.cut.clear()

    def _pump(self, source: socket.socket, dest: socket.socket, downstream: bool) -> None:
        try:
            while data := source.recv(65536):
                if downstream and self._answers_marked(source):
                    self.stop()
                    self.cut.set()
                    return
                dest.sendall(data)
                if not downstream:
                    self._mark(data, dest)
        except OSError:
            pass
        _close(source)
        _close(dest)

    def _mark(self, data: bytes, upstream: socket.socket) -> None:
        with self._lock:
            if self._pattern is not None and self._pattern in data:
                self._pattern = None
                self._marked.add(upstream)

    def _answers_marked(self, upstream: socket.socket) -> bool:
        with self._lock:
            return upstream in self._marked


def kill_session(pid: int, timeout: float = 30.0) -> list[int]:
    """SIGKILL every process of the session ``pid`` leads (a service started with
    ``start_new_session``), children that moved to process groups of their own included, as a
    machine that loses power would; returns their pids once all are gone."""
    import psutil

    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        members = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == pid and proc.status() != psutil.STATUS_ZOMBIE:
                    members.append(proc)
            except (ProcessLookupError, PermissionError, psutil.Error):
                pass
        if not members:
            return sorted(killed)
        for proc in members:
            try:
                proc.kill()
                killed.add(proc.pid)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(members, timeout=5)
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes of session {pid} still alive after {timeout}s: {[p.pid for p in members]}")


class PostgresCluster:
    """A private PostgreSQL cluster (``initdb`` in a temporary folder, run as the ``postgres``
    user when the tests run as root) on a free loopback port, which a test may restart or stop
    without touching the machine's shared server. Skips the test where no PostgreSQL binaries
    are installed."""

    def __init__(self) -> None:
        import glob
        import shutil
        import tempfile

        import pytest

        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
        if not bins and not shutil.which("pg_ctl"):
            pytest.skip("no PostgreSQL server binaries (pg_ctl, initdb) on this machine")
        self.bin = Path(bins[-1]).parent if bins else Path(shutil.which("pg_ctl")).parent
        self.root = Path(tempfile.mkdtemp(prefix="pytest-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}"
        self._as_user: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            import pwd

            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def _pg_ctl(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [*self._as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), *args],
            check=True,
            capture_output=True,
            timeout=timeout,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._pg_ctl("-o", options, "-l", str(self.root / "server.log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("-m", mode, "-w", "stop")

    def running(self) -> bool:
        status = subprocess.run(
            [*self._as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "status"], capture_output=True, timeout=30
        )
        return status.returncode == 0

    def restart(self, mode: str = "fast") -> None:
        """``fast``: sessions are ended and the server shut down cleanly; ``immediate``: killed
        as in a crash, then recovered from the WAL when it starts."""
        self.stop(mode)
        self.start()

    def __enter__(self) -> PostgresCluster:
        subprocess.run(
            [
                *self._as_user,
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import shutil

        try:
            if self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


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


class FullS3Proxy:
    """An HTTP relay in front of an S3 API that answers object uploads as a full MinIO does
    (507, ``XMinioStorageFull``) once ``allow_puts`` of them went through; every other request
    is relayed as it is. ``allow_puts = None`` lets everything through (space freed)."""

    BODY = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>XMinioStorageFull</Code><Message>Storage '
        b"backend has reached its minimum free drive threshold. Please delete a few objects to proceed."
        b"</Message></Error>"
    )

    def __init__(self, target: str) -> None:
        import http.client
        from urllib.parse import urlparse

        self.allow_puts: int | None = None
        self.refused = 0
        proxy, upstream = self, urlparse(target)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _relay(self) -> None:
                body = self._body()
                is_upload = self.command == "PUT" and self.path.split("?")[0].count("/") >= 2
                if is_upload and proxy.allow_puts is not None:
                    if proxy.allow_puts <= 0:
                        proxy.refused += 1
                        self.send_response(507)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(proxy.BODY)))
                        self.end_headers()
                        self.wfile.write(proxy.BODY)
                        return
                    proxy.allow_puts -= 1
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    self.send_response(response.status)
                    for key, value in response.getheaders():
                        if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FullS3Proxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
