"""Write the .env that docker-compose.yaml reads its secrets from, with random values.

``python docker/compose_env.py [PATH]`` (``make compose-env``): PATH defaults to ``.env``
beside docker-compose.yaml. An existing file is never overwritten: its secrets are the
ones the stack's volumes (the Postgres roles, Airflow's Fernet-encrypted connections)
were created with. Every password is hexadecimal: it can stand in a database URL and
never starts with a dash that a command line would take for an option.
"""

from __future__ import annotations

import base64
import os
import secrets
import sys
from pathlib import Path

PROJECT_NAME = "batchscore"
# Each variable that docker-compose.yaml requires (${VAR:?...}) and what it is.
SECRETS = {
    "POSTGRES_PASSWORD": "the postgres superuser",
    "AIRFLOW_DB_PASSWORD": "Airflow's database role",
    "MLFLOW_DB_PASSWORD": "MLflow's database role",
    "REDIS_PASSWORD": "Redis (requirepass); the pipeline and lookup API get it as "
    "BATCHSCORE_STORE_PASSWORD",
    "AIRFLOW_ADMIN_PASSWORD": "the Airflow UI/API user admin",
    "AIRFLOW_FERNET_KEY": "Airflow's Fernet key (encrypts connections and variables)",
    "AIRFLOW_JWT_SECRET": "signs the JWTs of Airflow's API and execution API",
    "AIRFLOW_API_SECRET_KEY": "Airflow API server's session secret",
    "LOOKUP_API_KEY": "the lookup API's key for every namespace",
}


def fernet_key() -> str:
    """What ``cryptography.fernet.Fernet.generate_key()`` returns, without the import."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def generate() -> dict[str, str]:
    values = {name: secrets.token_hex(20) for name in SECRETS}
    values["AIRFLOW_FERNET_KEY"] = fernet_key()
    return values


def render(values: dict[str, str]) -> str:
    lines = [
        "# Secrets of docker-compose.yaml, written by docker/compose_env.py. Keep this file",
        "# out of version control; changing a password after the first `up` needs the",
        "# services' volumes changed too (see docker/postgres/init-databases.sh).",
        f"COMPOSE_PROJECT_NAME={PROJECT_NAME}",
    ]
    for name, value in values.items():
        lines += [f"# {SECRETS[name]}", f"{name}={value}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    default = Path(__file__).resolve().parents[1] / ".env"
    target = Path(argv[0]) if argv else default
    if target.exists():
        print(f"{target} exists; left as it is (delete it to generate new secrets)")
        return 0
    # Created readable by its owner only, in one step: no moment with other permissions.
    with os.fdopen(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(render(generate()))
    print(f"wrote {target} with random secrets for docker compose")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
