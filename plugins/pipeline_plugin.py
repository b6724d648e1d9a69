"""The pipeline's Airflow plugin: links from task instances to what they made, and the pages the
links open that neither Airflow nor MLflow serves (the data and drift reports, the model card).

* Global extra links on every task instance: "MLflow run" (``train``, ``evaluate``), "Model
  version" and "Model card" (``register``, ``gate``, ``infra_validate``, ``promote``, the
  deployment DAGs' ``promote`` and ``rollback``), "Data report" (``validate``), "Drift report"
  (``check_drift``). The API server resolves them from the task's return value; which task gets
  which, and the URLs, are :mod:`pipeline.entrypoints.links`.
* A FastAPI app at ``/pipeline`` on the API server, behind Airflow's login (its JWT, the UI's
  cookie or a bearer token) and its DAG permissions: a report needs read access to the task
  instances of its DAG; a model card and the "Models" page (``/pipeline/models``, in the UI's
  navigation; ``/pipeline/api/models`` as JSON) read access to ``training_pipeline``. The page's
  buttons post to ``/pipeline/models/{name}/promote``, ``/pipeline/models/{name}/rollback`` and
  ``/pipeline/approvals/{dag}/{run}``, which act through Airflow as the user
  (:mod:`pipeline.entrypoints.registry_actions`): they need the permission to trigger
  ``promote_model`` / ``rollback_model`` or to answer the approval, else 403.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import quote

from airflow.api_fastapi.common.dagbag import DagBagDep, create_dag_bag
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import DagAccessEntity, GetUserDep, requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink
from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from pipeline.config import Settings
from pipeline.entrypoints import links, registry_actions
from pipeline.errors import ReferenceNotFoundError, RegistryUnavailableError, StorageUnavailableError

#: Served pages run no script, send no form and load nothing from elsewhere: they are shown with
#: the user's Airflow session, and a report holds names that came with the data. Their links open
#: in a new tab, or in the whole window when the page is shown inside the Airflow UI.
PAGE_HEADERS = {
    "Content-Security-Policy": "sandbox allow-popups allow-popups-to-escape-sandbox "
    "allow-top-navigation-by-user-activation; default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "frame-ancestors 'self'"
}
#: The Models page, the pipeline's own, also sends its buttons' forms, to this app only (still no
#: script: a same origin without scripts reads nothing).
FORM_PAGE_HEADERS = {
    "Content-Security-Policy": "sandbox allow-forms allow-same-origin allow-popups allow-popups-to-escape-sandbox "
    "allow-top-navigation-by-user-activation; default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'self'"
}


def return_value(dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> Any:
    """A task instance's return value as stored (JSON; never deserialised into objects), or None."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.execute(
            XComModel.get_many(
                key="return_value", run_id=run_id, dag_ids=dag_id, task_ids=task_id, map_indexes=map_index
            ).with_only_columns(XComModel.value)
        ).first()
    if row is None:
        return None
    try:
        return json.loads(row.value) if isinstance(row.value, str | bytes) else row.value
    except ValueError:
        return None


app_base = links.app_base


class PipelineLink(BaseOperatorLink):
    """A link of :data:`pipeline.entrypoints.links.NAMES`, by its ``name``."""

    name = ""

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        if not links.applies(self.name, ti_key.dag_id, ti_key.task_id):
            return ""
        result = return_value(ti_key.dag_id, ti_key.run_id, ti_key.task_id, ti_key.map_index)
        return links.task_link(
            self.name,
            ti_key.dag_id,
            ti_key.run_id,
            ti_key.task_id,
            ti_key.map_index,
            result,
            Settings.from_env(),
            app_base(),
        )


class MlflowRunLink(PipelineLink):
    name = links.MLFLOW_RUN


class ModelVersionLink(PipelineLink):
    name = links.MODEL_VERSION


class ModelCardLink(PipelineLink):
    name = links.MODEL_CARD


class DataReportLink(PipelineLink):
    name = links.DATA_REPORT


class DriftReportLink(PipelineLink):
    name = links.DRIFT_REPORT


def report_key_or_404(dag_id: str, run_id: str, task_id: str, map_index: int, storage: Any) -> str:
    try:
        return links.report_key(dag_id, task_id, return_value(dag_id, run_id, task_id, map_index), storage)
    except ReferenceNotFoundError as exc:
        raise HTTPException(404, str(exc)) from exc


def pending_approvals(base: str) -> list[dict[str, str]]:
    """The promotion approvals waiting for a person: their subject, run and where to answer."""
    from airflow.models.hitl import HITLDetail
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import select

    query = (
        select(
            HITLDetail.subject, HITLDetail.created_at, TaskInstance.dag_id, TaskInstance.run_id, TaskInstance.task_id
        )
        .join(TaskInstance, TaskInstance.id == HITLDetail.ti_id)
        .where(
            ~HITLDetail.response_received,
            TaskInstance.dag_id.in_(registry_actions.APPROVAL_DAGS),
            TaskInstance.task_id == registry_actions.APPROVAL_TASK,
            TaskInstance.state == TaskInstanceState.AWAITING_INPUT,
        )
        .order_by(HITLDetail.created_at)
    )
    with create_session() as session:
        rows = session.execute(query).all()
    return [
        {
            "subject": row.subject,
            "dag_id": row.dag_id,
            "run_id": row.run_id,
            "since": row.created_at.isoformat(timespec="seconds"),
            "url": f"{base}/dags/{quote(row.dag_id)}/runs/{quote(row.run_id, safe='')}/tasks/{quote(row.task_id)}",
        }
        for row in rows
    ]


def page(html: str | bytes, headers: dict[str, str] = PAGE_HEADERS) -> HTMLResponse:
    return HTMLResponse(html, headers={**headers, "X-Content-Type-Options": "nosniff"})


def act(request: Request, session: Any, action: Callable[[], str]) -> Response:
    """Run one of the page's actions. A browser's form post (it accepts HTML) is sent back to the
    Models page with what happened, or why not; an API client gets JSON and the status."""
    from airflow.configuration import conf

    netlocs = registry_actions.server_netlocs(request.headers.get("host"), conf.get("api", "base_url", fallback=""))
    try:
        registry_actions.check_same_origin(request.headers, netlocs)
    except registry_actions.CrossSiteRequestError as exc:
        raise HTTPException(403, str(exc)) from exc
    browser = "text/html" in request.headers.get("accept", "")
    try:
        done = action()
    except (ValueError, HTTPException) as exc:
        session.rollback()
        status, detail = (400, str(exc)) if isinstance(exc, ValueError) else (exc.status_code, str(exc.detail))
        if not browser:
            return JSONResponse({"detail": detail}, status_code=status)
        query = registry_actions.notice_query("error", detail)
        return RedirectResponse(f"{request.scope.get('root_path', '')}/models?{query}", 303)
    if not browser:
        return JSONResponse({"done": done})
    return RedirectResponse(
        f"{request.scope.get('root_path', '')}/models?{registry_actions.notice_query('done', done)}", 303
    )


def create_app() -> FastAPI:
    # No /docs, /redoc or /openapi.json: they would answer without a login.
    app = FastAPI(
        title="Image pipeline",
        description="Reports, model cards and the Models page, behind Airflow's login.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.dag_bag = create_dag_bag()  # the buttons' triggers read DAGs as the REST API does

    @app.get(
        "/dags/{dag_id}/dagRuns/{dag_run_id}/taskInstances/{task_id}/report",
        response_class=HTMLResponse,
        dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.TASK_INSTANCE))],
    )
    def report(dag_id: str, dag_run_id: str, task_id: str, map_index: int = -1) -> HTMLResponse:
        """The HTML report a task instance made: ``validate``'s data report, the drift monitor's report."""
        from pipeline.storage import storage_for

        settings = Settings.from_env()
        storage = storage_for(settings)
        key = report_key_or_404(dag_id, dag_run_id, task_id, map_index, storage)
        try:
            if not storage.exists(key):
                raise HTTPException(404, f"{dag_id}.{task_id}: the report is no longer in storage")
            return page(storage.get_bytes(key))
        except StorageUnavailableError as exc:
            raise HTTPException(503, str(exc)) from exc

    @app.get(
        "/models/{name}/versions/{version}/card",
        response_class=HTMLResponse,
        dependencies=[Depends(requires_access_dag("GET", param_dag_id="training_pipeline"))],
    )
    def model_card(name: str, version: str) -> HTMLResponse:
        """A registered version's model card, as evaluation wrote it."""
        try:
            return page(links.model_card_page(Settings.from_env(), name, version))
        except ReferenceNotFoundError as exc:
            raise HTTPException(404, str(exc)) from exc
        except RegistryUnavailableError as exc:
            raise HTTPException(503, str(exc)) from exc

    read_registry = [Depends(requires_access_dag("GET", param_dag_id="training_pipeline"))]

    @app.get("/api/models", dependencies=read_registry)
    def models_json() -> dict[str, Any]:
        """The registered models (aliases, newest versions, history) and the pending approvals."""
        from pipeline.entrypoints.registry_page import overview

        try:
            models = overview(Settings.from_env())
        except RegistryUnavailableError as exc:
            raise HTTPException(503, str(exc)) from exc
        return {"models": models, "pending_approvals": pending_approvals(app_base())}

    @app.get("/models", response_class=HTMLResponse, dependencies=read_registry)
    def models_page(user: GetUserDep, done: str = "", error: str = "", sig: str = "") -> HTMLResponse:
        """The "Models" page of the Airflow UI's navigation, with the buttons the user may press."""
        from pipeline.entrypoints.registry_page import overview
        from pipeline.entrypoints.registry_page import page as render

        settings = Settings.from_env()
        try:
            models = overview(settings)
        except RegistryUnavailableError as exc:
            raise HTTPException(503, str(exc)) from exc
        allowed = registry_actions.allowed_for(user)
        notice = registry_actions.verified_notice(done, error, sig)
        return page(render(models, pending_approvals(app_base()), settings, allowed, notice), FORM_PAGE_HEADERS)

    def trigger_with(dag_id: str) -> list[Any]:
        return [Depends(requires_access_dag("POST", DagAccessEntity.RUN, param_dag_id=dag_id))]

    def deployment_run(
        request: Request, session: Any, dag_bag: Any, user: Any, dag_id: str, conf: Callable[[], dict], moves: str
    ) -> Response:
        """A deployment DAG's run as ``user``, with the Params ``conf()`` gives (its ValueError
        is the answer), said as "will move production of ``moves``"."""

        def run() -> str:
            run_id, waits = registry_actions.trigger(
                dag_id, conf(), dag_bag=dag_bag, user=user, session=session, request=request
            )
            return f"{dag_id} run {run_id} will move production of {moves} (triggered by {user.get_name()}){waits}"

        return act(request, session, run)

    @app.post("/models/{name}/promote", dependencies=trigger_with(registry_actions.PROMOTE_DAG))
    def promote(
        name: str,
        request: Request,
        dag_bag: DagBagDep,
        user: GetUserDep,
        session: SessionDep,
        version: Annotated[str, Form()] = "",
        reason: Annotated[str, Form()] = "",
    ) -> Response:
        """The Promote button: a ``promote_model`` run for the staging version the page showed."""
        conf = lambda: registry_actions.promote_conf(name, version, reason)  # noqa: E731
        return deployment_run(
            request, session, dag_bag, user, registry_actions.PROMOTE_DAG, conf, f"{name} to v{version}"
        )

    @app.post("/models/{name}/rollback", dependencies=trigger_with(registry_actions.ROLLBACK_DAG))
    def rollback(
        name: str,
        request: Request,
        dag_bag: DagBagDep,
        user: GetUserDep,
        session: SessionDep,
        reason: Annotated[str, Form()] = "",
    ) -> Response:
        """The Roll back button: a ``rollback_model`` run to the production version before."""
        conf = lambda: registry_actions.rollback_conf(name, reason)  # noqa: E731
        return deployment_run(request, session, dag_bag, user, registry_actions.ROLLBACK_DAG, conf, f"{name} back")

    @app.post(
        "/approvals/{dag_id}/{dag_run_id}",
        dependencies=[Depends(requires_access_dag("PUT", DagAccessEntity.HITL_DETAIL))],  # of the path's dag_id
    )
    def answer_approval(
        dag_id: str,
        dag_run_id: str,
        request: Request,
        user: GetUserDep,
        session: SessionDep,
        answer: Annotated[str, Form()] = "",
        comment: Annotated[str, Form()] = "",
    ) -> Response:
        """The Approve and Reject buttons of a pending approval."""

        def run() -> str:
            payload = registry_actions.answer_payload(answer, comment)
            chosen = registry_actions.answer_approval(dag_id, dag_run_id, payload, user=user, session=session)
            return f"{dag_id} run {dag_run_id}: {chosen} by {user.get_name()}"

        return act(request, session, run)

    return app


class PipelinePlugin(AirflowPlugin):
    name = "image_pipeline"
    global_operator_extra_links = [
        MlflowRunLink(),
        ModelVersionLink(),
        ModelCardLink(),
        DataReportLink(),
        DriftReportLink(),
    ]
    fastapi_apps = [{"app": create_app(), "url_prefix": links.APP_PREFIX, "name": "Image pipeline"}]
    external_views = [
        {
            "name": "Models",
            "href": f"{links.APP_PREFIX}/models",
            "destination": "nav",
            "category": "browse",
            "url_route": "models",
        }
    ]
