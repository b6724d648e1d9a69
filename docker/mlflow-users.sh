#!/usr/bin/env bash
# Creates (or updates the password of) the MLflow user that the serving container logs in as: an
# ordinary user, not an admin, so it reads the registry (the server's default permission, READ,
# see docker/mlflow-server.sh) and can neither move an alias nor change a version. Run once the
# MLflow server is up, as its admin; safe to run again.
#
#   MLFLOW_TRACKING_URI                                    the server (http://mlflow:5000)
#   MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD     its admin
#   MLFLOW_SERVING_USERNAME, MLFLOW_SERVING_PASSWORD       the user to create
set -euo pipefail

: "${MLFLOW_TRACKING_URI:?set MLFLOW_TRACKING_URI (http://mlflow:5000)}"
: "${MLFLOW_TRACKING_USERNAME:?set MLFLOW_TRACKING_USERNAME (the MLflow admin)}"
: "${MLFLOW_TRACKING_PASSWORD:?set MLFLOW_TRACKING_PASSWORD (the MLflow admin password)}"
: "${MLFLOW_SERVING_USERNAME:?set MLFLOW_SERVING_USERNAME}"
: "${MLFLOW_SERVING_PASSWORD:?set MLFLOW_SERVING_PASSWORD: the project ships no default password}"

if [ "$MLFLOW_SERVING_USERNAME" = "$MLFLOW_TRACKING_USERNAME" ]; then
  echo "error: MLFLOW_SERVING_USERNAME: expected a user other than the admin, found $MLFLOW_SERVING_USERNAME" >&2
  exit 2
fi

exec python - <<'PY'
import os

from mlflow.exceptions import MlflowException
from mlflow.server.auth.client import AuthServiceClient

client = AuthServiceClient(os.environ["MLFLOW_TRACKING_URI"])
name, password = os.environ["MLFLOW_SERVING_USERNAME"], os.environ["MLFLOW_SERVING_PASSWORD"]
try:
    user = client.get_user(name)
except MlflowException:
    client.create_user(name, password)
    print(f"created MLflow user {name} (read-only)")
else:
    client.update_user_password(name, password)
    if user.is_admin:
        client.update_user_admin(name, False)
    print(f"MLflow user {name} exists: password set, not an admin")
PY
