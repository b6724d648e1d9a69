"""The Models page's buttons: promote a staging version, roll production back, answer a pending
approval; each one acts through Airflow, as the logged-in user, so Airflow's permissions decide
who may and the promotion history records who did.

* **Promote** and **Roll back** trigger the deployment DAGs ``promote_model`` and
  ``rollback_model`` with Airflow's own trigger (the run's ``triggering_user_name`` is the user,
  whom the task writes into the history as ``<user> via airflow:<dag>/<run>``). They need the
  permission to create runs of that DAG.
* **Approve** and **Reject** answer the ``approve`` task of ``training_pipeline`` or
  ``promote_model`` with Airflow's own human-in-the-loop update (its checks: a second answer is
  refused, ``PIPELINE_APPROVERS`` limits who may answer). They need edit access to that DAG's
  human-in-the-loop details.

A form on the page sends the user's session cookie, so a cookie-authenticated post must come
from this server's own pages (its ``Origin``, or ``Referer`` when a browser sends no
``Origin``); the cookie is ``SameSite=Lax`` as well. A request with a bearer token (an API
client) needs neither. The Airflow functions are called as the REST API calls them, so their
validation and their answers (404, 409, 400) are the REST API's.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlencode, urlparse

TRAINING_DAG, APPROVAL_TASK = "training_pipeline", "approve"
PROMOTE_DAG, ROLLBACK_DAG = "promote_model", "rollback_model"
APPROVAL_DAGS = (TRAINING_DAG, PROMOTE_DAG)
"""The DAGs whose ``approve`` task asks a person (the run's Param ``promotion``, or ``approval``)."""
ANSWERS = ("Approve", "Reject")
"""The approval's options, as :mod:`pipeline.entrypoints.approval` offers them."""
REASON_MAX = 500


class CrossSiteRequestError(Exception):
    """A cookie-authenticated post that did not come from this server's pages (an HTTP request's
    fault, answered 403; not a :class:`~pipeline.errors.PipelineError`, which tasks raise and
    the DAGs' retry policies are built from)."""


@dataclass(frozen=True)
class Allowed:
    """Which of the page's buttons the user may press (the page shows only those)."""

    promote: bool = False
    rollback: bool = False
    answer: tuple[str, ...] = ()
    """The DAGs of :data:`APPROVAL_DAGS` whose approvals the user may answer."""


def check_same_origin(headers: Any, server_netlocs: set[str]) -> None:
    """Refuse a post authenticated by the session cookie whose ``Origin`` (or, with none,
    ``Referer``) is not this server; a bearer-token request is not a browser's and passes."""
    if headers.get("authorization", "").lower().startswith("bearer "):
        return
    source = headers.get("origin") or headers.get("referer") or ""
    netloc = urlparse(source).netloc if source and source != "null" else ""
    if not netloc or netloc not in server_netlocs:
        raise CrossSiteRequestError(
            f"refused a form post from {source or 'a page that sent no Origin'}: "
            f"expected a page of this server ({', '.join(sorted(server_netlocs)) or 'none known'})"
        )


def server_netlocs(host_header: str | None, base_url: str) -> set[str]:
    """The host[:port] a same-origin page would send: the request's ``Host`` and ``[api] base_url``'s."""
    return {n for n in (host_header or "", urlparse(base_url).netloc) if n}


_PROCESS_KEY = secrets.token_bytes(32)
NOTICE_MAX = 300


def _notice_key() -> bytes:
    """Airflow's JWT secret (the same in every API server process), else this process's own."""
    from airflow.configuration import conf

    secret = conf.get("api_auth", "jwt_secret", fallback="") or ""
    return hashlib.sha256(b"pipeline-notice:" + secret.encode()).digest() if secret else _PROCESS_KEY


def notice_query(kind: Literal["done", "error"], text: str, key: bytes | None = None) -> str:
    """The Models page's query string that shows what a button did: signed, so that a link
    from elsewhere cannot make the page say a thing this server did not."""
    text = text[:NOTICE_MAX]
    sig = hmac.new(key or _notice_key(), f"{kind}\n{text}".encode(), hashlib.sha256).hexdigest()[:32]
    return urlencode({kind: text, "sig": sig})


def verified_notice(done: str, error: str, sig: str, key: bytes | None = None) -> dict[str, str]:
    """The notice of :func:`notice_query` when its signature holds; else none."""
    for kind, text in (("done", done), ("error", error)):
        if text:
            want = hmac.new(key or _notice_key(), f"{kind}\n{text}".encode(), hashlib.sha256).hexdigest()[:32]
            return {kind: text} if hmac.compare_digest(want, sig or "") else {}
    return {}


def reason_of(text: str | None, what: str) -> str:
    """A person's reason or comment: one line, at most :data:`REASON_MAX` characters, not empty."""
    reason = " ".join((text or "").split())
    if not reason:
        raise ValueError(f"{what}: expected a reason for the promotion history, found an empty field")
    if len(reason) > REASON_MAX:
        raise ValueError(f"{what}: expected at most {REASON_MAX} characters, found {len(reason)}")
    return reason


def promote_conf(model_name: str, version: str, reason: str) -> dict[str, Any]:
    """``promote_model``'s Params for the version a person saw at ``staging``, refused here as
    ``pipeline promote`` refuses the default staging version (not gated against today's
    production, rejected by a person, or one production was rolled back from): the button names
    the version only so that the run promotes what the person saw."""
    from pipeline.config import Settings
    from pipeline.errors import PromotionRefusedError
    from pipeline.registry.promote import check_default_promotion

    if not version.isdigit():
        raise ValueError(f"version: expected a registered version number, found {version!r}")
    reason = reason_of(reason, "reason")
    settings = Settings.from_env()
    try:
        check_default_promotion(settings.for_model(model_name), version)
    except PromotionRefusedError as exc:
        raise ValueError(str(exc)) from exc
    return {"model_name": model_name, "version": version, "reason": reason}


def rollback_conf(model_name: str, reason: str) -> dict[str, Any]:
    """``rollback_model``'s Params: back to the production version before the current one."""
    return {"model_name": model_name, "to_version": None, "reason": reason_of(reason, "reason")}


def answer_payload(answer: str, comment: str) -> dict[str, Any]:
    """The human-in-the-loop response of the approval: its option and the person's comment."""
    if answer not in ANSWERS:
        raise ValueError(f"answer: expected one of {', '.join(ANSWERS)}, found {answer!r}")
    return {"chosen_options": [answer], "params_input": {"comment": reason_of(comment, "comment")}}


def allowed_for(user: Any) -> Allowed:
    """What Airflow's auth manager lets ``user`` do from the page."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    def may(method: Literal["POST", "PUT"], entity: Any, dag_id: str) -> bool:
        return get_auth_manager().is_authorized_dag(
            method=method, access_entity=entity, details=DagDetails(id=dag_id), user=user
        )

    return Allowed(
        promote=may("POST", DagAccessEntity.RUN, PROMOTE_DAG),
        rollback=may("POST", DagAccessEntity.RUN, ROLLBACK_DAG),
        answer=tuple(dag_id for dag_id in APPROVAL_DAGS if may("PUT", DagAccessEntity.HITL_DETAIL, dag_id)),
    )


def trigger(
    dag_id: str, conf: dict[str, Any], *, dag_bag: Any, user: Any, session: Any, request: Any
) -> tuple[str, str]:
    """A manual run of ``dag_id`` with ``conf``, triggered by ``user`` (Airflow's REST trigger);
    returns its run id, and a note to add when the DAG is paused (the run waits for it)."""
    from airflow.api_fastapi.core_api.datamodels.dag_run import TriggerDAGRunPostBody
    from airflow.api_fastapi.core_api.routes.public.dag_run import trigger_dag_run
    from airflow.models.dag import DagModel

    body = TriggerDAGRunPostBody(logical_date=None, conf=conf)
    run = trigger_dag_run(dag_id, body, dag_bag, user, session, request)
    model = session.get(DagModel, dag_id)
    waits = "; the DAG is paused: the run starts once someone unpauses it" if model and model.is_paused else ""
    return run.run_id, waits  # type: ignore[attr-defined]  # the route returns the DagRun row


def answer_approval(dag_id: str, run_id: str, payload: dict[str, Any], *, user: Any, session: Any) -> str:
    """Answer the approval of ``dag_id`` run ``run_id`` as ``user`` (Airflow's REST update of
    its human-in-the-loop detail); returns the answer recorded."""
    from airflow.api_fastapi.core_api.datamodels.hitl import UpdateHITLDetailPayload
    from airflow.api_fastapi.core_api.routes.public.hitl import update_hitl_detail

    if dag_id not in APPROVAL_DAGS:
        raise ValueError(f"dag_id: expected one of {', '.join(APPROVAL_DAGS)}, found {dag_id!r}")
    answered = update_hitl_detail(dag_id, run_id, APPROVAL_TASK, UpdateHITLDetailPayload(**payload), user, session)
    return answered.chosen_options[0]
