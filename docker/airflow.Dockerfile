# The Airflow image of the stack (docker/docker-compose.yaml): every Airflow service, the Celery
# workers and `pipeline serve` run from it. Build context: the repository root.
#
#   docker build -f docker/airflow.Dockerfile -t image-pipeline/airflow:cpu .
#   docker build -f docker/airflow.Dockerfile --build-arg TORCH_VARIANT=cuda -t image-pipeline/airflow:cuda .
#
# TORCH_VARIANT=cpu installs torch's CPU build (download.pytorch.org/whl/cpu, about 1 GB less);
# TORCH_VARIANT=cuda installs the PyPI build, which brings the CUDA libraries as wheels: the host
# needs only the NVIDIA driver and the NVIDIA container toolkit, not a CUDA base image.
# PIPELINE_CODE_VERSION tags every MLflow run with the code it ran (the image has no git):
#   --build-arg PIPELINE_CODE_VERSION=$(git rev-parse --short=12 HEAD)
FROM python:3.11-slim-bookworm

ARG TORCH_VARIANT=cpu
ARG PIPELINE_CODE_VERSION=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# gid 0, as Airflow's own image does, so that an arbitrary uid (OpenShift) can still write.
RUN useradd --uid 50000 --gid 0 --no-log-init --create-home --home-dir /home/airflow airflow

WORKDIR /opt/pipeline

# torch first, from the index of the chosen variant, at the version requirements.lock pins; the
# project install below then finds it already satisfied (2.13.0+cpu matches torch==2.13.0).
COPY requirements.lock ./
RUN torch_pin=$(grep '^torch==' requirements.lock) \
    && case "$TORCH_VARIANT" in \
         cpu) pip install "$torch_pin" --index-url https://download.pytorch.org/whl/cpu ;; \
         cuda) pip install "$torch_pin" ;; \
         *) echo "TORCH_VARIANT must be cpu or cuda, not '$TORCH_VARIANT'" >&2; exit 2 ;; \
       esac

# The project, editable: pipeline.config.project_root() is then /opt/pipeline whatever the
# working directory. The Great Expectations suites (expectations/) are the package's
# pipeline.suites (pyproject.toml maps the folder), so they are copied before the install.
COPY pyproject.toml README.md ./
COPY pipeline/ pipeline/
COPY expectations/ expectations/
RUN pip install -c requirements.lock -e .
# litdata without its declared deps, which it imports only for what the pipeline does not use:
# torchvision (PyPI's does not load beside the CPU torch), obstore (its optional S3 path, which
# cannot reach an http:// endpoint such as MinIO's or moto's) and tifffile (docs/data.md).
RUN pip install -c requirements.lock --no-deps litdata

COPY dags/ dags/
COPY plugins/ plugins/
COPY scripts/ scripts/
COPY docker/*.sh docker/

ENV AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/pipeline/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/pipeline/plugins \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    GX_ANALYTICS_ENABLED=False \
    PIPELINE_HOME=/opt/airflow/pipeline-home \
    PIPELINE_CODE_VERSION=${PIPELINE_CODE_VERSION}

# Logs (a volume in compose: the API server reads the workers' logs from it) and the pipeline's
# local cache, both writable by the airflow user.
RUN mkdir -p /opt/airflow/logs /opt/airflow/pipeline-home \
    && chown -R airflow:0 /opt/airflow && chmod -R g+rwX /opt/airflow

# Run from Airflow's home, which the airflow user may write (the project's folder it may not).
WORKDIR /opt/airflow
USER airflow
ENTRYPOINT ["/opt/pipeline/docker/airflow-entrypoint.sh"]
CMD ["airflow", "version"]
