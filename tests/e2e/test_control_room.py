"""The control room, in a real browser: Debian's Chromium, driven by Playwright, through the
Airflow UI (API server, scheduler, DAG processor and triggerer, as ``make airflow-ui`` runs them,
with logins) and a real ``mlflow server``'s UI.

One person's day, on a small real cut of Fashion-MNIST: alice opens ``training_pipeline``'s
trigger form, sets the epochs, the sample cap, a loose quality gate and the ``approval`` promotion
in their sections, and triggers; once the run waits for a person, she opens the ``train`` task and
follows its "MLflow run" link to the run's page in MLflow, metrics shown. omar, an operator,
opens "Models" from the Browse menu, sees the new version at ``staging``, approves it (production
moves; the history says omar and his comment), then rolls production back, all from the page.
vera, a viewer, sees the same page without a button.

Screenshots of every step and the services' logs go to ``.runtime/e2e/`` (git-ignored; CI keeps
the clone). The test stops every process it started and checks that none is left and no port
is still taken, so it can run again at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

import psutil
import pytest
import requests
from recipes import recipe_flags
from services import MlflowServer, ProcessGroup, free_port, port_is_free, wait_for_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ARTIFACTS = ROOT / ".runtime" / "e2e"
CHROMIUM = "/usr/bin/chromium"
#: Without these, Chromium tries the network at every start (there is none on CI machines).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
DAG_ID = "training_pipeline"
MODEL = "fashion-mnist-classifier"
USERS = {"alice": "admin", "omar": "op", "vera": "viewer"}
#: What alice changes in the trigger form, by section: a quick run (one epoch of the default
#: network on 1,200 images reaches about 0.3), so the gate's bars are opened wide.
FORM = {
    "Data": {"sample_cap": "1200"},
    "Training": {"epochs": "1"},
    "Quality gate": {"gate_min_accuracy": "0", "gate_max_accuracy_drop": "1", "gate_max_class_drop": "1"},
}
WAIT_S = 600


@dataclass
class ControlRoom:
    """The processes a person's browser talks to, and what the test needs to reach them."""

    airflow_url: str
    mlflow: MlflowServer
    services: ProcessGroup
    env: dict[str, str]
    passwords: dict[str, str]
    ports: list[int] = field(default_factory=list)

    def api(self, user: str) -> requests.Session:
        """Airflow's REST API as ``user`` (a JWT from ``/auth/token``)."""
        token = requests.post(
            f"{self.airflow_url}/auth/token", json={"username": user, "password": self.passwords[user]}, timeout=30
        )
        token.raise_for_status()
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
        return session

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{self.services.log_tail(name, 30)}" for name in self.services.processes)


def airflow_env(workdir: Path, source: Path, mlflow_url: str, port: int, passwords: Path) -> dict[str, str]:
    """``make airflow-ui``'s environment with logins (no admin-for-everyone), built from scratch:
    nothing of this test process's own Airflow, pipeline or MLflow set-up leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PIPELINE_", "MLFLOW_"))}
    return {
        **env,
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "AIRFLOW_HOME": str(workdir / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_UI_PORT": str(port),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, r in USERS.items()),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        "GX_ANALYTICS_ENABLED": "False",
        "PIPELINE_HOME": str(workdir / "home"),
        "MLFLOW_TRACKING_URI": mlflow_url,
        "PIPELINE_SOURCE_URI": str(source),
    }


@pytest.fixture(scope="module")
def control_room(small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlRoom]:
    """The Airflow UI with logins and an MLflow server on one store, production at version 1 (a
    ``pipeline run --promotion auto`` of the tests' small recipe), so there is a version to roll
    back to."""
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    (ARTIFACTS / "logs").mkdir(parents=True)
    workdir = tmp_path_factory.mktemp("control-room")
    passwords = {user: secrets.token_urlsafe(16) for user in USERS}
    (workdir / "passwords.json").write_text(json.dumps(passwords))
    port = free_port()
    mlflow = MlflowServer(f"sqlite:///{workdir / 'mlflow.db'}", str(workdir / "mlartifacts"))
    services = ProcessGroup(ARTIFACTS / "logs")
    with mlflow:
        env = airflow_env(workdir, small_dataset, mlflow.url, port, workdir / "passwords.json")
        room = ControlRoom(f"http://127.0.0.1:{port}", mlflow, services, env, passwords, [port, mlflow.port])
        try:
            init = subprocess.run(
                ["bash", str(ROOT / "scripts/airflow-init.sh")], env=env, capture_output=True, text=True, timeout=600
            )
            assert init.returncode == 0, init.stderr[-3000:]
            services.start("airflow-ui", ["bash", str(ROOT / "scripts/airflow-ui.sh")], env)
            seed = subprocess.run(
                [str(BIN / "pipeline"), "run", *recipe_flags(), "--epochs", "1", "--gate-min-accuracy", "0.5"]
                + ["--promotion", "auto"],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert seed.returncode == 0, seed.stderr[-3000:]
            wait_for_port(port, timeout=120)
            wait_until(lambda: dags_parsed(room), "the DAG processor parses the DAGs", room)
            yield room
        finally:
            leftovers = services.stop()
    # Outside `with mlflow`: the MLflow server has stopped too.
    assert leftovers == [], f"processes left running: {leftovers}"
    assert [p for p in room.ports if not port_is_free(p)] == [], "a port is still taken"


def dags_parsed(room: ControlRoom) -> bool:
    api = room.api("alice")
    return all(api.get(f"{room.airflow_url}/api/v2/dags/{dag}", timeout=30).ok for dag in (DAG_ID, "rollback_model"))


def wait_until(probe, what: str, room: ControlRoom, timeout: float = WAIT_S):
    """Poll ``probe`` until it returns something true; the services' logs if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        room.services.check_alive()
        with contextlib.suppress(requests.RequestException):
            if found := probe():
                return found
        time.sleep(2)
    raise AssertionError(f"waited {timeout:.0f} s for {what}\n{room.logs()}")


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
    left = [p for p in psutil.Process().children(recursive=True) if "chrom" in p.name() or p.name() == "node"]
    assert left == [], f"browser processes left running: {left}"


class Person:
    """One person's browser session (its own cookies), logged in through Airflow's login page."""

    def __init__(self, browser, room: ControlRoom, user: str) -> None:
        self.room, self.user = room, user
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.context.set_default_timeout(30_000)
        self.page = self.context.new_page()
        self.shots = 0
        self.page.goto(f"{room.airflow_url}/auth/login")
        self.page.fill("input[name=username]", user)
        self.page.fill("input[name=password]", room.passwords[user])
        self.page.keyboard.press("Enter")
        self.page.wait_for_url(lambda url: "/auth/login" not in url)

    def shot(self, what: str, page=None) -> None:
        self.shots += 1
        (page or self.page).screenshot(path=ARTIFACTS / f"{self.user}-{self.shots:02d}-{what}.png", full_page=True)

    def models_page(self):
        """Browse, then Models: the registry page, framed in Airflow's UI."""
        self.page.goto(f"{self.room.airflow_url}/")
        self.page.get_by_role("button", name="Browse").click()
        self.page.get_by_role("menuitem", name="Models").click()
        frame = self.page.frame_locator("iframe").first
        frame.get_by_role("heading", name="Models", exact=True).wait_for()
        return frame

    def wait_on_models_page(self, text: str, what: str):
        """Reload the Models page until the aliases line shows ``text``."""

        def shows():
            aliases = self.models_page().get_by_text("Aliases:").inner_text()
            return text in aliases

        wait_until(shows, what, self.room, timeout=180)
        return self.models_page()

    def close(self) -> None:
        self.context.close()


def last_history_entry(page) -> list[str]:
    """The newest row of the Models page's promotion history, cell by cell."""
    history = page.locator("table").last
    return history.locator("tr").filter(has=page.locator("td")).first.inner_text().split("\t")


def form_section(page, name: str):
    """A section (accordion item) of the trigger form, by its title. (Not by its region's
    accessible name: the UI labels it by an id with the title in it, spaces included.)"""
    title = page.get_by_role("button", name=name, exact=True)
    return page.get_by_role("dialog").locator("[data-part=item]").filter(has=title)


def test_a_run_from_the_trigger_form_to_production_and_back(control_room: ControlRoom, browser):
    room = control_room
    alice = Person(browser, room, "alice")

    # The trigger form: each change in its own section; promotion "approval".
    alice.page.goto(f"{room.airflow_url}/dags/{DAG_ID}")
    alice.page.get_by_role("button", name="Trigger").first.click()
    form = alice.page.get_by_role("dialog")
    for section, fields in FORM.items():
        form.get_by_role("button", name=section, exact=True).click()
        content = form_section(alice.page, section)
        for name, value in fields.items():
            content.locator(f"input[name=element_{name}]").fill(value)
    form.get_by_role("button", name="Promotion", exact=True).click()
    promotion = form_section(alice.page, "Promotion")
    promotion.locator("div:has(> input[name=element_promotion])").get_by_role("combobox").click()
    alice.page.get_by_role("option", name="approval").click()
    assert promotion.locator("input[name=element_promotion]").input_value() == "approval"
    assert form.get_by_role("checkbox", name=re.compile("Unpause")).is_checked()
    alice.shot("trigger-form")
    form.get_by_role("button", name="Trigger").last.click()
    alice.page.wait_for_url(re.compile(f"/dags/{DAG_ID}/runs/"))
    run_id = unquote(alice.page.url.rsplit("/runs/", 1)[1].split("/")[0])

    api = room.api("alice")
    runs = f"{room.airflow_url}/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}"
    run = api.get(runs, timeout=30).json()
    assert run["triggering_user_name"] == "alice"
    assert {k: run["conf"][k] for k in ("epochs", "sample_cap", "gate_min_accuracy", "promotion")} == {
        "epochs": 1,
        "sample_cap": 1200,
        "gate_min_accuracy": 0,
        "promotion": "approval",
    }

    def waiting_for_a_person():
        listing = api.get(f"{runs}/taskInstances", params={"limit": 100}, timeout=30).json()
        states = {ti["task_id"]: ti["state"] for ti in listing["task_instances"]}
        failed = [task for task, state in states.items() if state in ("failed", "upstream_failed")]
        assert not failed, f"tasks failed: {failed}\n{room.logs()}"
        return states.get("approve") == "awaiting_input"

    wait_until(waiting_for_a_person, f"run {run_id} to wait for an approval", room)

    # The train task's "MLflow run" link (Details), to the run's page on the MLflow server.
    alice.page.goto(f"{room.airflow_url}/dags/{DAG_ID}/runs/{run_id}/tasks/train")
    alice.page.get_by_role("link", name="Details", exact=True).click()
    alice.page.get_by_role("link", name="MLflow run").wait_for()
    alice.shot("train-task")
    with alice.context.expect_page() as opened:
        alice.page.get_by_role("link", name="MLflow run").click()
    mlflow_page = opened.value
    import mlflow

    from pipeline.config import Settings

    client = mlflow.MlflowClient(room.mlflow.url)
    (train_run,) = client.search_runs(
        [client.get_experiment_by_name(Settings.from_env(room.env).experiment_name).experiment_id],
        f"tags.`airflow.run_id` = '{run_id}' and params.epochs = '1'",
    )
    mlflow_page.get_by_role("cell", name="test_accuracy", exact=True).wait_for()
    assert mlflow_page.url.startswith(room.mlflow.url) and train_run.info.run_id in mlflow_page.url
    text = mlflow_page.locator("body").inner_text()
    for metric in ("test_accuracy", "val_accuracy", "train_loss"):
        assert metric in text and repr(train_run.data.metrics[metric]) in text
    alice.shot("mlflow-run", mlflow_page)
    alice.close()

    # omar approves from the Models page: production moves to version 2, by his name.
    omar = Person(browser, room, "omar")
    page = omar.models_page()
    assert "production → v1" in page.get_by_text("Aliases:").inner_text()
    assert "staging → v2" in page.get_by_text("Aliases:").inner_text()
    waiting = page.locator("tr", has_text=f"Promote {MODEL} version 2 to production?")
    omar.shot("waiting-for-approval")
    waiting.get_by_placeholder("comment (for the history)").fill("card read, latencies fine")
    waiting.get_by_role("button", name="Approve").click()
    page.get_by_text(f"{DAG_ID} run {run_id}: Approve by omar").wait_for()
    page = omar.wait_on_models_page("production → v2", "production to move to version 2")
    latest = last_history_entry(page)
    assert latest[2:7] == ["production", "promote", "1", "2", f"omar via airflow:{DAG_ID}/{run_id}"]
    assert latest[7] == "approved: card read, latencies fine"
    omar.shot("approved")
    states = {
        ti["task_id"]: ti["state"]
        for ti in api.get(f"{runs}/taskInstances", params={"limit": 100}, timeout=30).json()["task_instances"]
    }
    assert (states["promote"], states["reject"]) == ("success", "skipped")

    # ... and rolls production back to version 1.
    rollback = page.locator("form", has_text="Roll back production")
    rollback.get_by_placeholder("reason (for the history)").fill("complaints from the shop floor")
    rollback.get_by_role("button").click()
    page.get_by_text(re.compile(r"rollback_model run .* \(triggered by omar\)")).wait_for()
    page = omar.wait_on_models_page("production → v1", "production to go back to version 1")
    latest = last_history_entry(page)
    assert latest[2:6] == ["production", "rollback", "2", "1"]
    assert latest[6].startswith("omar via airflow:rollback_model/") and latest[7] == "complaints from the shop floor"
    omar.shot("rolled-back")
    omar.close()

    # vera reads the same page, and has nothing to press.
    vera = Person(browser, room, "vera")
    page = vera.models_page()
    assert "production → v1" in page.get_by_text("Aliases:").inner_text()
    assert page.get_by_role("button").count() == 0
    vera.shot("viewer")
    vera.close()
