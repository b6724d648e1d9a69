"""Infra validation: serve the registered version for real before it may become ``staging``.

What the gate measured offline must also be what a client gets. This stage:

1. starts ``pipeline serve --model-uri models:/<name>/<version>`` in a fresh process on a free
   loopback port (the registry artifact, loaded the way production loads it);
2. waits for ``/ready`` (a version that cannot load makes the server exit: that is a failure);
3. sends real requests, one image at a time and one batch, and times them;
4. checks that the served predictions equal the offline ones: the training run's checkpoint,
   evaluated in this process on the same test images (same classes, probabilities within
   ``PROBABILITY_TOLERANCE``);
5. with ``PIPELINE_SERVE_RUNTIME`` ``onnx`` or ``onnx-int8`` (what production serves), does the
   same in that runtime, against the same variant run offline;
6. only then points ``staging`` at the version (a recorded alias move, see ``pipeline.registry.promote``).

The outcome and the latencies go to the version's tags (``infra_validation``, ``infra.*``) and to
the run as ``infra/infra_validation.json``. A failure raises
:class:`~pipeline.errors.InfraValidationError`; ``staging`` does not move.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.command_lines import serve_command
from pipeline.config import Settings
from pipeline.errors import InfraValidationError, PromotionRefusedError, ServingTimeoutError
from pipeline.refs import ModelVersionRef, ProcessedDatasetRef, Ref
from pipeline.registry.history import STAGING, TAG_GATE, TAG_INFRA
from pipeline.registry.promote import move_alias
from pipeline.storage import Storage
from pipeline.tracking import tracking_client

log = logging.getLogger(__name__)

PROBABILITY_TOLERANCE = 1e-4
"""Largest difference between a served and an offline probability: the same float32 arithmetic
in an exported program and in eager mode agrees to about 1e-6."""
READY_TIMEOUT_S = 180.0
SINGLE_REQUESTS = 16
BATCH_IMAGES = 64


@dataclass(frozen=True)
class InfraValidationResult(Ref):
    model_name: str
    version: str
    images: int
    """Test images sent (one batch request; the first ``single_requests`` also one by one)."""
    single_requests: int
    max_probability_difference: float
    latency_ms: dict[str, float]
    """``single_p50``, ``single_p99``, ``batch`` (wall time of the batch request)."""
    staging: dict[str, Any] | None
    """The alias move to ``staging`` (None when the version was staging already)."""
    runtime: dict[str, Any] | None = None
    """With ``PIPELINE_SERVE_RUNTIME`` ``onnx`` or ``onnx-int8``, that runtime's check too:
    ``name``, ``max_probability_difference`` (against the same variant offline),
    ``agreement_with_float`` (top-1, against the float model offline) and ``latency_ms``."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, payload: dict[str, Any], token: str | None = None) -> tuple[dict[str, Any], float]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers)
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:  # the server's own explanation is the useful part
        raise ValueError(f"HTTP {exc.code} from {url}: {exc.read()[:300].decode(errors='replace')}") from exc
    return body, (time.perf_counter() - start) * 1000


def _last_line(log_path: Path) -> str:
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _die_with_parent() -> None:
    """In the server process: get SIGTERM when the validating process dies (even by SIGKILL),
    so that no server outlives a killed Airflow task."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def _ready(base: str, server: subprocess.Popen, log_path: Path, where: str, timeout_s: float) -> bool:
    """Wait for ``/ready``; False if the port was taken before the server bound it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            last = _last_line(log_path)
            if "address already in use" in last.lower():
                return False
            raise InfraValidationError(
                where, "a serving process that loads the model", f"exit status {server.returncode}: {last}"
            )
        try:
            with urllib.request.urlopen(f"{base}/ready", timeout=5) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet, or 503 while loading
        time.sleep(0.25)
    raise ServingTimeoutError(
        f"{where}: expected /ready within {timeout_s:.0f} s, found the server still "
        f"starting; its last line: {_last_line(log_path)}"
    )


@contextmanager
def serving_process(
    name: str, version: str, settings: Settings, where: str, runtime: str | None = None
) -> Iterator[str]:
    """``pipeline serve`` for the version in a fresh process; yields its base URL; always stops it."""
    with tempfile.TemporaryDirectory(prefix="infra-validate-") as tmp:
        log_path = Path(tmp) / "serve.log"
        for _ in range(3):  # a free port can be taken by someone else before the server binds it
            port = free_port()
            with log_path.open("wb") as server_log:
                server = subprocess.Popen(
                    serve_command(f"models:/{name}/{version}", port=port, runtime=runtime),
                    stdout=server_log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **settings.to_env()},
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )
            try:
                base = f"http://127.0.0.1:{port}"
                if _ready(base, server, log_path, where, READY_TIMEOUT_S):
                    yield base
                    return
            finally:
                server.terminate()
                try:
                    server.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
        raise ServingTimeoutError(f"{where}: expected a free loopback port, found three taken in a row")


def offline_probabilities(run_id: str, storage: Storage, images: np.ndarray) -> np.ndarray:
    """The training run's own model (its best checkpoint), as serving would compute it."""
    from pipeline.models.classifier import load_checkpoint
    from pipeline.models.export import export_for_serving, predict_probabilities

    model = export_for_serving(load_checkpoint(str(storage.local_path(f"checkpoints/{run_id}/best.ckpt"))))
    return predict_probabilities(model, images)


def served_probabilities(
    base: str, images: np.ndarray, version: str, where: str
) -> tuple[np.ndarray, dict[str, float]]:
    """Ask the server for every image (one batch) and for the first few one by one (with the
    bearer token the server reads from the same environment, when one is configured)."""
    from pipeline.config import ServingSettings

    token = ServingSettings.from_env().token
    singles, latencies = [], []
    for image in images[:SINGLE_REQUESTS]:
        body, ms = _post(f"{base}/predict", {"image": image.tolist()}, token)
        singles.append(body["predictions"][0]["probabilities"])
        latencies.append(ms)
    batch, batch_ms = _post(f"{base}/predict", {"instances": images.tolist()}, token)
    if batch["model_version"] != version:
        raise InfraValidationError(where, f"answers from version {version}", f"version {batch['model_version']}")
    served = np.asarray([p["probabilities"] for p in batch["predictions"]], dtype=np.float32)
    if not np.allclose(np.asarray(singles, dtype=np.float32), served[:SINGLE_REQUESTS], atol=PROBABILITY_TOLERANCE):
        raise InfraValidationError(where, "the same answer for an image alone and in a batch", "different answers")
    latency = {
        "single_p50": float(np.percentile(latencies, 50)),
        "single_p99": float(np.percentile(latencies, 99)),
        "batch": batch_ms,
    }
    return served, latency


def offline_variant_probabilities(
    name: str, version: str, runtime: str, settings: Settings, images: np.ndarray
) -> np.ndarray:
    """The version's ONNX or INT8 variant (``runtime`` ``onnx``, ``onnx-int8``), run in this
    process; refused unless it passed its checks at export."""
    from pipeline.errors import ReferenceNotFoundError
    from pipeline.models.registered import load_variant

    try:
        return load_variant(name, version, runtime, settings).predict_probabilities(images)
    except ReferenceNotFoundError as exc:
        raise InfraValidationError(
            exc.where, f"{exc.expected}, to serve with PIPELINE_SERVE_RUNTIME={runtime}", exc.found
        ) from None


def compare(served: np.ndarray, offline: np.ndarray, where: str, against: str) -> float:
    """The largest probability difference; raise unless the classes are the same and it is
    within :data:`PROBABILITY_TOLERANCE`."""
    difference = float(np.abs(served - offline).max())
    changed = int((served.argmax(axis=1) != offline.argmax(axis=1)).sum())
    if changed or difference > PROBABILITY_TOLERANCE:
        raise InfraValidationError(
            where,
            f"served predictions equal to the offline ones of {against} (probabilities within {PROBABILITY_TOLERANCE})",
            f"{changed} of {len(served)} classes differ, largest probability difference {difference:.4g}",
        )
    return difference


def infra_validate(
    candidate: ModelVersionRef, processed: ProcessedDatasetRef, storage: Storage, settings: Settings, actor: str
) -> InfraValidationResult:
    """Serve ``candidate`` in a fresh process, compare with offline predictions, then stage it.

    With ``PIPELINE_SERVE_RUNTIME`` ``onnx`` or ``onnx-int8`` (what production serves), the
    version is also served in that runtime and compared with the same variant run offline: an
    INT8 model is not expected to match the float one's probabilities (its agreement with it
    was measured on the whole test split at export, and is recorded here on these images)."""
    from pipeline.config import ServingSettings
    from pipeline.data.processed import load_split

    client = tracking_client(settings)
    name, version = candidate.model_name, candidate.version
    where = f"{name} version {version}"
    tags = client.get_model_version(name, version).tags
    if tags.get(TAG_GATE) != "passed":
        raise PromotionRefusedError(
            where, f"a version that passed the gate (tag {TAG_GATE}=passed)", repr(tags.get(TAG_GATE, "no such tag"))
        )
    images = load_split(processed, storage, "test")[0][:BATCH_IMAGES]
    offline = offline_probabilities(candidate.run_id, storage, images)
    runtime = ServingSettings.from_env().runtime

    def served_in(runtime: str | None) -> tuple[np.ndarray, dict[str, float]]:
        with serving_process(name, version, settings, where, runtime) as base:
            try:
                return served_probabilities(base, images, version, where)
            except (urllib.error.URLError, OSError, KeyError, ValueError) as exc:
                raise InfraValidationError(where, "valid answers to /predict", f"{type(exc).__name__}: {exc}") from exc

    variant: dict[str, Any] | None = None
    try:
        served, latency = served_in("torch")
        difference = compare(served, offline, where, f"run {candidate.run_id}")
        if runtime != "torch":
            expected = offline_variant_probabilities(name, version, runtime, settings, images)
            answers, variant_latency = served_in(runtime)
            variant = {
                "name": runtime,
                "max_probability_difference": compare(answers, expected, where, f"its {runtime} variant"),
                "agreement_with_float": float((answers.argmax(axis=1) == offline.argmax(axis=1)).mean()),
                "latency_ms": variant_latency,
            }
    except InfraValidationError as exc:  # a verdict on the version (a timeout is not: it is retried)
        client.set_model_version_tag(name, version, "infra.reason", str(exc)[:4900])
        client.set_model_version_tag(name, version, TAG_INFRA, "failed")
        raise

    record = {
        "infra.reason": "none",
        "infra.max_probability_difference": f"{difference:.3g}",
        "infra.images": str(len(images)),
        **{f"infra.latency_{k}_ms": f"{v:.1f}" for k, v in latency.items()},
        **(
            {
                f"infra.{runtime}.max_probability_difference": f"{variant['max_probability_difference']:.3g}",
                f"infra.{runtime}.agreement_with_float": f"{variant['agreement_with_float']:.4f}",
                **{f"infra.{runtime}.latency_{k}_ms": f"{v:.1f}" for k, v in variant["latency_ms"].items()},
            }
            if variant
            else {}
        ),
        TAG_INFRA: "passed",
    }  # the verdict last
    for key, value in record.items():
        client.set_model_version_tag(name, version, key, value)
    # Forward only: a rerun that reused an old model does not take staging back from a newer one.
    move = move_alias(
        settings.for_model(name),
        STAGING,
        version,
        "stage",
        actor,
        "passed the gate and infra validation",
        forward_only=True,
    )
    result = InfraValidationResult(
        model_name=name,
        version=version,
        images=len(images),
        single_requests=SINGLE_REQUESTS,
        max_probability_difference=difference,
        latency_ms=latency,
        staging=move.to_dict() if move else None,
        runtime=variant,
    )
    with tempfile.TemporaryDirectory(prefix="infra-report-") as tmp:
        (Path(tmp) / "infra_validation.json").write_text(json.dumps(result.to_dict(), indent=2))
        client.log_artifacts(candidate.run_id, tmp, "infra")
    log.info(
        "%s served correctly (p50 %.1f ms single, %.1f ms for %d images); alias staging",
        where,
        latency["single_p50"],
        latency["batch"],
        len(images),
    )
    return result
