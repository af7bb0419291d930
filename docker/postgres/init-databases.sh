#!/usr/bin/env bash
# Create the Airflow and MLflow databases, each owned by a role of the same name
# (AIRFLOW_DB_NAME / MLFLOW_DB_NAME, default airflow / mlflow).
#
# The postgres image runs this once, on the first start with an empty data
# volume (files in /docker-entrypoint-initdb.d). Changing a password later means
# ALTER ROLE by hand, or `docker compose down -v` to start again from nothing.
# The stack test (tests/integration/test_stack.py) runs it against the machine's
# server with PGHOST set and names of its own.
set -euo pipefail

: "${AIRFLOW_DB_PASSWORD:?AIRFLOW_DB_PASSWORD is not set}"
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set}"

psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
    -v airflow_db="${AIRFLOW_DB_NAME:-airflow}" \
    -v airflow_password="${AIRFLOW_DB_PASSWORD}" \
    -v mlflow_db="${MLFLOW_DB_NAME:-mlflow}" \
    -v mlflow_password="${MLFLOW_DB_PASSWORD}" <<'SQL'
CREATE ROLE :"airflow_db" LOGIN PASSWORD :'airflow_password';
CREATE DATABASE :"airflow_db" OWNER :"airflow_db";
CREATE ROLE :"mlflow_db" LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE :"mlflow_db" OWNER :"mlflow_db";
SQL
