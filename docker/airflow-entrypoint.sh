#!/usr/bin/env bash
# Entrypoint of the Airflow image: every Airflow service (API server, scheduler, DAG processor,
# triggerer, Celery workers, airflow-init) starts through it. The integration test
# tests/integration/test_distributed_stack.py starts the same commands through it on loopback.
#
# Airflow's simple auth manager generates a password for each configured user and prints it to
# the log. Here the admin's password comes from the environment instead (AIRFLOW_ADMIN_USERNAME,
# AIRFLOW_ADMIN_PASSWORD): it is written to the auth manager's password file, readable by this
# user only. No password ships with the project.
set -euo pipefail

passwords_file=${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:-}
if [ -n "$passwords_file" ]; then
  : "${AIRFLOW_ADMIN_USERNAME:?set AIRFLOW_ADMIN_USERNAME (the Airflow UI and REST API user)}"
  : "${AIRFLOW_ADMIN_PASSWORD:?set AIRFLOW_ADMIN_PASSWORD: the project ships no default password}"
  mkdir -p "$(dirname "$passwords_file")"
  (
    umask 077
    python -c 'import json, os, sys
json.dump({os.environ["AIRFLOW_ADMIN_USERNAME"]: os.environ["AIRFLOW_ADMIN_PASSWORD"]}, open(sys.argv[1], "w"))' \
      "$passwords_file"
  )
fi

exec "$@"
