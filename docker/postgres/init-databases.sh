#!/usr/bin/env bash
# Create the Airflow and MLflow databases, each owned by its own role.
#
# The postgres image runs this once, on the first start with an empty data
# volume (files in /docker-entrypoint-initdb.d). Changing a password later means
# ALTER ROLE by hand, or `docker compose down -v` to start again from nothing.
set -euo pipefail

: "${AIRFLOW_DB_PASSWORD:?AIRFLOW_DB_PASSWORD is not set}"
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set}"

psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
    -v airflow_password="${AIRFLOW_DB_PASSWORD}" \
    -v mlflow_password="${MLFLOW_DB_PASSWORD}" <<'SQL'
CREATE ROLE airflow LOGIN PASSWORD :'airflow_password';
CREATE DATABASE airflow OWNER airflow;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
SQL
