"""An SMTP server on loopback for the alert tests (aiosmtpd), and the settings that send to it."""

from __future__ import annotations

import email
import email.policy
import json
from email.message import EmailMessage

from services import free_port

RECIPIENT = "ml-team@example.com"


class SmtpSink:
    """Receives every message sent to ``127.0.0.1:<port>`` and keeps it in :attr:`messages`."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.port = free_port()

    def __enter__(self) -> SmtpSink:
        from aiosmtpd.controller import Controller

        messages = self.messages

        class Keep:
            async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's hook name)
                messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
                return "250 OK"

        self.controller = Controller(Keep(), hostname="127.0.0.1", port=self.port)
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()

    def connection(self) -> str:
        """The Airflow connection (``AIRFLOW_CONN_<ID>``, JSON) of this server: plain SMTP."""
        extra = {"disable_ssl": True, "disable_tls": True, "from_email": "airflow@example.com", "retry_limit": 1}
        return json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": self.port, "extra": extra})

    def subjects(self) -> list[str]:
        return [str(message["Subject"]) for message in self.messages]

    def body(self, index: int = -1) -> str:
        message = self.messages[index]
        part = message.get_body(preferencelist=("html", "plain"))
        return part.get_content() if part is not None else ""


def send_alerts_to(monkeypatch, sink: SmtpSink, conn_id: str = "smtp_default") -> None:
    """Alerts on, through ``sink`` (the connection defined in the environment, as a team would
    in its deployment)."""
    monkeypatch.setenv("PIPELINE_ALERT_TO", RECIPIENT)
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", sink.connection())


class WebhookSink:
    """An HTTP server on ``127.0.0.1:<port>`` that keeps every JSON body posted to it: the
    webhook an Apprise connection (``json://``) sends alerts to."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        self.port = free_port()

    def __enter__(self) -> WebhookSink:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        posts = self.posts

        class Keep(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's hook name)
                length = int(self.headers.get("Content-Length") or 0)
                posts.append({"path": self.path, **json.loads(self.rfile.read(length) or b"{}")})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Keep)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def connection(self) -> str:
        """The Airflow Apprise connection (``AIRFLOW_CONN_<ID>``, JSON) posting to this server."""
        config = {"path": f"json://127.0.0.1:{self.port}/alerts", "tag": "alerts"}
        return json.dumps({"conn_type": "apprise", "extra": {"config": config}})
