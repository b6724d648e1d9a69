#!/usr/bin/env bash
# Create or upgrade the Airflow metadata database and the pools the DAGs need. Safe to run again.
# `make airflow-init` runs it for the embedded mode (SQLite); the compose stack's airflow-init
# service runs it against PostgreSQL before any other Airflow service starts.
set -euo pipefail

airflow db migrate
# Production moves (promote, rollback) run one at a time in this pool; Airflow never schedules a
# task whose pool does not exist.
airflow pools set promotions 1 "registry alias moves, one at a time"
