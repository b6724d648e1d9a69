#!/usr/bin/env bash
# Entrypoint of the MLflow server image: the tracking server and model registry with basic auth,
# runs and the registry in PostgreSQL, artifacts in S3 (proxied: clients need no S3 credentials).
# Everything comes from the environment; extra arguments go to `mlflow server`.
#
#   MLFLOW_BACKEND_STORE_URI      postgresql+psycopg2://user:password@host:5432/mlflow
#   MLFLOW_AUTH_DATABASE_URI      users and permissions (another database, same server is fine)
#   MLFLOW_ARTIFACTS_DESTINATION  s3://bucket/prefix; MLFLOW_S3_ENDPOINT_URL for MinIO and the like
#   MLFLOW_AUTH_ADMIN_USERNAME    the admin created on first start ...
#   MLFLOW_AUTH_ADMIN_PASSWORD    ... with this password (MLflow ships none; neither do we)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  signs the UI's session and CSRF cookies
#   MLFLOW_HOST (default 127.0.0.1; the compose stack sets 0.0.0.0 inside its network),
#   MLFLOW_PORT, MLFLOW_WORKERS, MLFLOW_AUTH_DEFAULT_PERMISSION (READ)
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (postgresql+psycopg2://...)}"
: "${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI (the users database)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix)}"
: "${MLFLOW_AUTH_ADMIN_USERNAME:?set MLFLOW_AUTH_ADMIN_USERNAME}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD: the project ships no default password}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY (a long random string)}"

# basic_auth.ini has no variable substitution, so the users database goes in a generated copy,
# readable by this user only (the URI may hold a password).
config_dir=$(mktemp -d)
export MLFLOW_AUTH_CONFIG_PATH=$config_dir/basic_auth.ini
(
  umask 077
  cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
)

exec mlflow server --app-name basic-auth \
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-2}" "$@"
