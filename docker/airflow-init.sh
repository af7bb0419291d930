#!/usr/bin/env bash
# One-shot setup that the other Airflow services wait for
# (depends_on: condition: service_completed_successfully).
#
# 1. Migrate the metadata database (idempotent; a no-op when it is current).
# 2. Write the SimpleAuthManager password file: every user in
#    AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS gets AIRFLOW_ADMIN_PASSWORD, so the UI
#    login is known instead of a password generated inside a container.
# 3. Create the pool the score tasks run in (a task in a missing pool never runs).
set -euo pipefail

airflow db migrate
airflow pools set batchscore_scoring 1 "batchscore scoring runs (raise the slots to run more at once)"

passwords_file="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:?not set}"
mkdir -p "$(dirname "${passwords_file}")"
python - "${passwords_file}" <<'PY'
import json
import os
import sys

configured = os.environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "admin:admin")
users = [entry.split(":")[0].strip() for entry in configured.split(",") if entry.strip()]
password = os.environ["AIRFLOW_ADMIN_PASSWORD"]
with open(sys.argv[1], "w") as f:
    json.dump({user: password for user in users}, f)
PY
echo "airflow-init: database migrated; users ${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS:-admin:admin} can log in"
