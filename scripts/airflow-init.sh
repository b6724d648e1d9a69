#!/usr/bin/env bash
# Create or upgrade the Airflow metadata database and the pools the DAGs need. Safe to run again.
# `make airflow-init` runs it for the embedded mode (SQLite); the compose stack's airflow-init
# service runs it against PostgreSQL before any other Airflow service starts.
set -euo pipefail

airflow db migrate
# Production moves (promote, rollback) run one at a time in this pool; Airflow never schedules a
# task whose pool does not exist.
airflow pools set promotions 1 "registry alias moves, one at a time"

# With the FAB auth manager (the compose stack's): its tables, then the users and roles the
# environment names (scripts/airflow-users.py; nothing has a default password).
case "${AIRFLOW__CORE__AUTH_MANAGER:-}" in
  *.FabAuthManager)
    airflow fab-db migrate
    python "$(dirname "$0")/airflow-users.py"
    ;;
esac
