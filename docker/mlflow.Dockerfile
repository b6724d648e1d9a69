# The MLflow tracking server and model registry of the stack, with basic auth, runs and the
# registry in PostgreSQL, artifacts proxied to S3 (docker/mlflow-server.sh reads the settings from
# the environment). Build context: the repository root.
#
#   docker build -f docker/mlflow.Dockerfile -t image-pipeline/mlflow .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --uid 50001 --no-log-init --create-home --home-dir /home/mlflow mlflow

WORKDIR /opt/pipeline

# The versions the pipeline's client was tested with (requirements.lock); the `auth` extra is
# Flask-WTF, which the basic-auth app needs for its CSRF protection.
COPY requirements.lock ./
RUN pip install -c requirements.lock "mlflow[auth]" boto3 psycopg2-binary

COPY docker/mlflow-server.sh docker/mlflow-users.sh docker/

WORKDIR /home/mlflow
USER mlflow
EXPOSE 5000
ENTRYPOINT ["/opt/pipeline/docker/mlflow-server.sh"]
