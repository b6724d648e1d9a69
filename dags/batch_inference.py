"""
### Batch inference: the `production` model over a batch of images, into Parquet

Triggered with a `batch_uri` (a folder, `file://`, `http(s)://` or `s3://` prefix holding
`images-idx3-ubyte.gz` and, optionally, `labels-idx1-ubyte.gz`). Predicts every image with the
version behind `alias` (default `production`) and writes
`predictions/<batch hash>/<model name>/v<version>/predictions.parquet` to storage (`id`, `class_id`,
`class_name`, `probabilities`, `model_version`, and `label` when given). A summary (class
shares, mean confidence, accuracy when labelled) goes to an MLflow run of the experiment
`batch_inference`. The same batch and version are predicted once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pendulum
from airflow.sdk import Param, dag, task

if str(Path(__file__).parent) not in sys.path:  # for DagBag on another folder and runpy; see _common
    sys.path.append(str(Path(__file__).parent))
from _common import DEFAULT_ARGS  # noqa: E402


@dag(
    schedule=None,  # triggered with a batch
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    doc_md=__doc__,
    tags=["inference", "images", "mlflow"],
    default_args=DEFAULT_ARGS,
    params={
        "batch_uri": Param(
            None,
            type=["null", "string"],
            title="Batch",
            description="Folder or URI prefix holding images-idx3-ubyte.gz (and labels-idx1-ubyte.gz).",
        ),
        "alias": Param("production", type="string", title="Model alias", description="Registry alias to predict with."),
    },
)
def batch_inference():
    @task
    def predict(params=None) -> dict:
        from pipeline.entrypoints import tasks

        return tasks.batch_inference(params)

    predict()


batch_inference()
