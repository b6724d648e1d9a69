"""A registry that does not answer, told apart from one that answers no."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.config import Settings
from pipeline.errors import PipelineError, RegistryUnavailableError
from pipeline.redact import redact_text


def error_code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", ""))


_UNAVAILABLE_CODES = (
    "TEMPORARILY_UNAVAILABLE",
    "SERVICE_UNDER_MAINTENANCE",
    "WORKSPACE_TEMPORARILY_UNAVAILABLE",
    "DEADLINE_EXCEEDED",
)


def is_unavailable(exc: BaseException | None) -> bool:
    """True for a registry that did not answer: its database (an SQLAlchemy connection error, raw
    or wrapped by the store, which reports most as TEMPORARILY_UNAVAILABLE), or its server (a
    connection error or a 5xx once MLflow's HTTP retries are spent). Looks down the chain of causes."""
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and not isinstance(exc, PipelineError):
        seen.add(id(exc))
        if isinstance(
            exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError | sqlalchemy.exc.DisconnectionError
        ):
            return True
        if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
            return True
        if isinstance(exc, MlflowException):
            text = str(exc)
            if error_code(exc) in _UNAVAILABLE_CODES or (
                text.startswith("API request to")
                and any(f"failed with {what}" in text for what in ("exception", "timeout", "error code 5"))
            ):
                return True
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return False


def first_line(exc: BaseException, limit: int = 300) -> str:
    line = next((part.strip() for part in str(exc).splitlines() if part.strip()), type(exc).__name__)
    return line if len(line) <= limit else line[: limit - 3] + "..."


@contextmanager
def registry_reachable(settings: Settings) -> Iterator[None]:
    """Turn "the registry did not answer" into one :class:`RegistryUnavailableError` line."""
    try:
        yield
    except Exception as exc:
        if is_unavailable(exc):
            raise RegistryUnavailableError(redact_text(settings.tracking_uri), redact_text(first_line(exc))) from exc
        raise
