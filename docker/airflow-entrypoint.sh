#!/usr/bin/env bash
# Entrypoint of the Airflow image: every Airflow service (API server, scheduler, DAG processor,
# triggerer, Celery workers, airflow-init) starts through it. The integration test
# tests/integration/test_distributed_stack.py starts the same commands through it on loopback.
#
# Airflow's users are the FAB auth manager's, made by airflow-init (scripts/airflow-init.sh,
# scripts/airflow-users.py) from the environment; nothing here holds a password.
set -euo pipefail

exec "$@"
