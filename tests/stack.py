"""docker-compose.yaml's services as processes on this machine, for the stack test.

One source for commands and environments: every service runs the ``command`` and
``environment`` that docker-compose.yaml gives it (``<<:`` merges resolved by PyYAML's
safe loader, ``${VAR:-default}`` / ``${VAR:?message}`` interpolated here against the
values that ``docker/compose_env.py`` writes into a user's .env). Only what separates
containers is rewritten:

- host names of services and their container ports -> 127.0.0.1 and a free port
  (``redis:6379`` -> ``127.0.0.1:41234``), listen addresses ``0.0.0.0`` -> 127.0.0.1;
- container paths (/var/lib/batchscore, /opt/airflow, /mlartifacts, /data) -> folders
  under pytest's tmp dir; /opt/airflow/dags -> this repository's dags/ (the image copies
  it there);
- ports that every container has to itself but processes on one host cannot share
  (Airflow's log servers, the scheduler's health server, the Dask workers' dashboards).

PostgreSQL is the machine's server on 127.0.0.1:5432: ``docker/postgres/init-databases.sh``
creates the databases and roles, under names unique to the test session, and ``drop``
removes them. Each process runs in its own process group, which ``stop`` ends.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import yaml

from batchscore.testing import RedisServer, free_port, stop_process_groups, tail
from tests.airflow_server import AirflowStartError, RestApiV2
from tests.conftest import BIN, REPO

COMPOSE_FILE = REPO / "docker-compose.yaml"
POSTGRES_INIT = REPO / "docker" / "postgres" / "init-databases.sh"
# The Dockerfile copies docker/airflow-init.sh to /usr/local/bin/batchscore-airflow-init.
IMAGE_PROGRAMS = {"batchscore-airflow-init": REPO / "docker" / "airflow-init.sh"}
POSTGRES = ("127.0.0.1", 5432)
HEALTH_TIMEOUT = 240.0  # seconds; Airflow's four components on 2 busy cores take the longest

_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


class MissingVariable(ValueError):
    """A ``${VAR:?message}`` whose variable is unset or empty, as Compose refuses it."""


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation: ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?message}``, ``${VAR?message}`` and ``$$`` (a literal ``$``)."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, argument = match.groups()
        found = env.get(name)
        unset = found is None or (bool(operator) and operator.startswith(":") and found == "")
        if not operator:
            return found or ""
        if operator.endswith("-"):
            return argument if unset else str(found)
        if unset:
            raise MissingVariable(f"{name}: {argument}")
        return str(found)

    return _VARIABLE.sub(replace, value)


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The file with its ``<<:`` merge keys resolved (PyYAML's safe loader does that)."""
    loaded = yaml.safe_load(path.read_text())
    assert isinstance(loaded, dict), f"{path} is not a mapping"
    return loaded


@dataclass(frozen=True)
class ServiceSpec:
    """One service of the compose file, interpolated: what its container would run."""

    name: str
    command: list[str]
    environment: dict[str, str]
    healthcheck: list[str] | None  # ["CMD", ...] or ["CMD-SHELL", "..."]
    replicas: int


def service_spec(compose: Mapping[str, Any], name: str, env: Mapping[str, str]) -> ServiceSpec:
    service = compose["services"][name]

    def words(value: str | list[str] | None) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            return [interpolate(word, env) for word in shlex.split(value)]
        return [interpolate(str(word), env) for word in value]

    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    check = service.get("healthcheck", {}).get("test")
    return ServiceSpec(
        name=name,
        command=words(service.get("entrypoint")) + words(service.get("command")),
        environment={k: interpolate(str(v), env) for k, v in environment.items()},
        healthcheck=[interpolate(str(w), env) for w in check] if check else None,
        replicas=int(service.get("deploy", {}).get("replicas", 1)),
    )


def compose_env_module() -> ModuleType:
    """``docker/compose_env.py``, which writes a user's .env: the test's secrets come from it."""
    path = REPO / "docker" / "compose_env.py"
    spec = importlib.util.spec_from_file_location("compose_env", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------- loopback rewriting


@dataclass
class Loopback:
    """Container addresses and paths -> this machine's. ``ports[service][container_port]``
    is the local port that stands for ``service:container_port``."""

    ports: dict[str, dict[int, int]]
    paths: dict[str, Path]

    def port(self, service: str, container_port: int) -> int:
        return self.ports[service][container_port]

    def text(self, value: str) -> str:
        for service, ports in self.ports.items():
            for inside, outside in ports.items():
                value = re.sub(
                    rf"(?<![\w.-]){re.escape(service)}:{inside}(?!\d)",
                    f"127.0.0.1:{outside}",
                    value,
                )
        for inside in sorted(self.paths, key=len, reverse=True):  # /opt/airflow/dags first
            value = re.sub(
                rf"(?<![\w.-]){re.escape(inside)}(?=/|$|[^\w.-])", str(self.paths[inside]), value
            )
        return value

    def command(self, service: str, argv: list[str]) -> list[str]:
        """Listen addresses and ports of ``service``'s own command, then ``text``."""
        own = self.ports.get(service, {})
        out: list[str] = []
        for index, word in enumerate(argv):
            flag = argv[index - 1] if index else ""
            if flag == "--host" and word == "0.0.0.0":
                word = "127.0.0.1"
            elif flag == "--port" and word.isdigit() and int(word) in own:
                word = str(own[int(word)])
            elif flag == "--dashboard-address" and word.startswith(":"):
                word = f"127.0.0.1:{own[int(word[1:])]}"
            out.append(self.text(word))
        return out

    def environment(self, env: Mapping[str, str]) -> dict[str, str]:
        return {k: self.text(v) for k, v in env.items()}

    def healthcheck(self, service: str, test: list[str]) -> list[str]:
        """The healthcheck as argv: ``localhost:<container port>`` -> the local port;
        redis-cli, which names no port, gets ``-p``."""
        kind, *rest = test
        argv = ["sh", "-c", " ".join(rest)] if kind == "CMD-SHELL" else list(rest)
        own = self.ports.get(service, {})
        rewritten = []
        for word in argv:
            for inside, outside in own.items():
                word = re.sub(rf"\blocalhost:{inside}(?!\d)", f"127.0.0.1:{outside}", word)
            if service == "redis":
                word = re.sub(r"\bredis-cli\b", f"redis-cli -p {own[6379]}", word)
            rewritten.append(self.text(word))
        return rewritten


# ----------------------------------------------------------------------------- processes


def base_environment() -> dict[str, str]:
    """This machine's environment without the settings a container would not have."""
    kept = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW_", "AIRFLOW__", "BATCHSCORE_", "MLFLOW_", "REDISCLI_"))
    }
    return kept | {"PATH": os.pathsep.join([str(BIN), kept.get("PATH", "")]), "NO_COLOR": "1"}


@dataclass
class Process:
    """A service's process, in a process group of its own, its output in ``log``."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 30) -> None:
        """TERM to the group, then KILL whatever is left after ``grace`` seconds."""
        stop_process_groups([self.popen], grace)


def program(argv: list[str], env: Mapping[str, str]) -> list[str]:
    """argv with its program found as the container finds it (the image's PATH)."""
    name = argv[0]
    if name in IMAGE_PROGRAMS:
        return ["bash", str(IMAGE_PROGRAMS[name]), *argv[1:]]
    found = shutil.which(name, path=env.get("PATH"))
    assert found, f"{name} is not installed (PATH={env.get('PATH')})"
    return [found, *argv[1:]]


@dataclass
class Stack:
    """The started processes and databases; ``stop`` ends them all and drops the databases."""

    folder: Path
    processes: list[Process] = field(default_factory=list)
    databases: list[str] = field(default_factory=list)
    stoppers: list[Callable[[], None]] = field(default_factory=list)  # servers started apart

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Process:
        log = self.folder / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as handle:
            popen = subprocess.Popen(
                program(argv, env),
                env=env,
                cwd=self.folder,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        process = Process(name, argv, env, log, popen)
        self.processes.append(process)
        return process

    def run_once(self, name: str, argv: list[str], env: dict[str, str], timeout: float) -> None:
        """A one-shot service (``restart: "no"``): it must exit 0, like
        ``condition: service_completed_successfully``."""
        process = self.start(name, argv, env)
        try:
            code = process.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            process.stop()
            raise AirflowStartError(
                f"{name} ran past {timeout:.0f} s\n{self.tails([name])}"
            ) from None
        if code != 0:
            raise AssertionError(f"{name} exited with {code}\n{self.tails([name])}")

    def check_alive(self) -> None:
        for process in self.processes:
            code = process.popen.poll()
            if code is not None and process.name not in ("airflow-init", "postgres-init"):
                raise AirflowStartError(
                    f"{process.name} exited with {code}\n{self.tails([process.name])}"
                )

    def tails(self, names: list[str] | None = None, lines: int = 60) -> str:
        return "\n".join(
            f"--- {p.name}: {' '.join(p.argv)} ({p.log}) ---\n{tail(p.log, lines)}"
            for p in self.processes
            if names is None or p.name in names
        )

    @contextmanager
    def report_failure(self) -> Iterator[None]:
        """On any failure inside, print the tail of every service's log (pytest shows it)."""
        try:
            yield
        except BaseException:
            print(f"\n===== service logs (under {self.folder / 'logs'}) =====\n{self.tails()}")
            raise

    def wait_healthy(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        """Run the service's compose healthcheck until it passes (``service_healthy``)."""
        deadline = time.monotonic() + HEALTH_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
            except subprocess.TimeoutExpired:
                last = "timed out"
                continue
            if done.returncode == 0:
                return
            last = f"exit {done.returncode}: {done.stdout[-500:]} {done.stderr[-1000:]}"
            time.sleep(1)
        raise AirflowStartError(
            f"{name} not healthy after {HEALTH_TIMEOUT:.0f} s: `{' '.join(argv)}` {last}\n"
            f"{self.tails([name])}"
        )

    def stop(self, grace: float = 30) -> None:
        """TERM to every process group at once, KILL to what is left after ``grace`` s."""
        stop_process_groups([p.popen for p in self.processes], grace)
        for stopper in reversed(self.stoppers):
            stopper()
        for database in self.databases:
            drop_database(database)


# ----------------------------------------------------------------------------- Postgres


def psql(sql: str) -> None:
    host, port = POSTGRES
    subprocess.run(
        ["psql", "-h", host, "-p", str(port), "-U", "postgres", "-d", "postgres", "-v",
         "ON_ERROR_STOP=1", "-qc", sql],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def drop_database(name: str) -> None:
    """The database and its owner role (init-databases.sh names both alike)."""
    psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    psql(f'DROP ROLE IF EXISTS "{name}"')


# ------------------------------------------------------------------------ the REST client


@dataclass
class StackAirflow(RestApiV2):
    """REST API v2 of the stack's Airflow (api-server, scheduler, DAG processor and
    triggerer run apart), logged in as the admin user of AIRFLOW_ADMIN_PASSWORD."""

    stack: Stack
    url: str
    admin_password: str = field(repr=False)
    username: str = "admin"
    _token: str | None = field(default=None, repr=False)

    @property
    def base(self) -> str:
        return self.url

    @property
    def password(self) -> str:
        return self.admin_password

    def check_alive(self) -> None:
        self.stack.check_alive()

    def log_tail(self) -> str:
        return self.stack.tails([p.name for p in self.stack.processes if "airflow" in p.name])


def get(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(url, timeout=30, **kwargs)


def unique_prefix() -> str:
    """Database and role names of one test session: lowercase, a letter first."""
    return f"bs{uuid.uuid4().hex[:10]}"


# ---------------------------------------------------------------------------- deploying

SERVICES = (
    "postgres",
    "redis",
    "mlflow",
    "dask-scheduler",
    "dask-worker",
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "lookup-api",
)
AIRFLOW_COMPONENTS = (
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
)


def container_ports(service: Mapping[str, Any]) -> list[int]:
    """The ports a service listens on: its ``expose`` and the container side of ``ports``."""
    found = [int(p) for p in service.get("expose", [])]
    found += [int(str(p).rsplit(":", 1)[-1]) for p in service.get("ports", [])]
    return sorted(set(found))


def instances(spec: ServiceSpec) -> list[str]:
    """One name per container: ``dask-worker-1``, ``dask-worker-2`` for ``replicas: 2``."""
    if spec.replicas == 1:
        return [spec.name]
    return [f"{spec.name}-{i}" for i in range(1, spec.replicas + 1)]


@dataclass
class Deployment:
    """The running stack: what a user reaches on the host, and how to stop it all."""

    stack: Stack
    loopback: Loopback
    values: dict[str, str]  # what .env holds: the secrets, the database names
    specs: dict[str, ServiceSpec]
    _airflow_extra: dict[str, str] = field(default_factory=dict, repr=False)

    def url(self, service: str, container_port: int) -> str:
        return f"http://127.0.0.1:{self.loopback.port(service, container_port)}"

    @property
    def tracking_uri(self) -> str:
        return self.url("mlflow", 5000)

    def airflow(self) -> StackAirflow:
        return StackAirflow(
            self.stack, self.url("airflow-apiserver", 8080), self.values["AIRFLOW_ADMIN_PASSWORD"]
        )

    def env(self, service: str) -> dict[str, str]:
        """A container's environment on this machine: the compose env, rewritten."""
        env = base_environment() | self.loopback.environment(self.specs[service].environment)
        if service.startswith("airflow-"):
            env |= self.airflow_extra
        return env

    @property
    def airflow_extra(self) -> dict[str, str]:
        """Ports every Airflow container has to itself, which processes on one host need
        apart; and the API server on loopback."""
        if not self._airflow_extra:
            self._airflow_extra = {
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
                "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(
                    self.loopback.port("airflow-scheduler", 8974)
                ),
                "AIRFLOW__API__HOST": "127.0.0.1",
            }
        return self._airflow_extra

    def start(self, service: str) -> None:
        """Start every container of ``service`` and wait until its healthcheck passes."""
        spec = self.specs[service]
        for name in instances(spec):
            env = self.env(service)
            self.stack.start(name, self.loopback.command(name, spec.command), env)
        for name in instances(spec):
            self.wait_healthy(service, name)

    def wait_healthy(self, service: str, name: str | None = None) -> None:
        spec = self.specs[service]
        if spec.healthcheck:
            argv = self.loopback.healthcheck(name or service, spec.healthcheck)
            self.stack.wait_healthy(name or service, argv, self.env(service))

    def stop(self) -> None:
        self.stack.stop()


def deploy(folder: Path, data: Path, services: tuple[str, ...] = SERVICES) -> Deployment:
    """Start ``services`` as docker-compose.yaml defines them, in its depends_on order."""
    compose = load_compose()
    prefix = unique_prefix()
    values = compose_env_module().generate() | {
        "AIRFLOW_DB_NAME": f"{prefix}_airflow",
        "MLFLOW_DB_NAME": f"{prefix}_mlflow",
    }
    specs = {name: service_spec(compose, name, values) for name in SERVICES}
    ports: dict[str, dict[int, int]] = {}
    for name, spec in specs.items():
        for instance in instances(spec):
            ports[instance] = {
                p: POSTGRES[1] if name == "postgres" else free_port()
                for p in container_ports(compose["services"][name])
            }
    paths = {
        "/var/lib/batchscore": folder / "batchscore",
        "/opt/airflow/dags": REPO / "dags",
        "/opt/airflow": folder / "airflow",
        "/mlartifacts": folder / "mlartifacts",
        "/data": data,
    }
    for path in paths.values():
        path.mkdir(parents=True, exist_ok=True)
    deployment = Deployment(Stack(folder), Loopback(ports, paths), values, specs)
    try:
        with deployment.stack.report_failure():
            _start(deployment, services)
    except BaseException:
        deployment.stop()
        raise
    return deployment


def _start(deployment: Deployment, services: tuple[str, ...]) -> None:
    stack, values = deployment.stack, deployment.values
    if "postgres" in services:
        # The image runs the init script on the first start; here, against the machine's
        # server. The names are registered first, so that a half-done init is dropped too.
        stack.databases += [values["AIRFLOW_DB_NAME"], values["MLFLOW_DB_NAME"]]
        env = deployment.env("postgres") | {"PGHOST": POSTGRES[0], "PGPORT": str(POSTGRES[1])}
        stack.run_once("postgres-init", ["bash", str(POSTGRES_INIT)], env, timeout=60)
        deployment.wait_healthy("postgres")
    if "redis" in services:
        start_redis(deployment)
    for service in ("mlflow", "dask-scheduler", "dask-worker"):
        if service in services:
            deployment.start(service)
    if "dask-worker" in services:
        wait_for_workers(deployment)
    if "airflow-init" in services:
        spec = deployment.specs["airflow-init"]
        stack.run_once("airflow-init", spec.command, deployment.env("airflow-init"), timeout=600)
    started = [s for s in AIRFLOW_COMPONENTS if s in services]
    for service in started:  # at once: they wait on the database only
        spec = deployment.specs[service]
        stack.start(
            service, deployment.loopback.command(service, spec.command), deployment.env(service)
        )
    if started:
        from tests.airflow_server import wait_until_healthy

        wait_until_healthy(deployment.airflow(), HEALTH_TIMEOUT)
        for service in started:  # and each compose healthcheck passes
            deployment.wait_healthy(service)
    if "lookup-api" in services:
        deployment.start("lookup-api")


def start_redis(deployment: Deployment) -> None:
    """redis-server with the compose command's arguments, through the tests' launcher."""
    spec = deployment.specs["redis"]
    assert spec.command[0] == "redis-server", spec.command
    folder = deployment.stack.folder / "redis"
    folder.mkdir(exist_ok=True)
    server = RedisServer(folder, *spec.command[1:], port=deployment.loopback.port("redis", 6379))
    server.start(password=deployment.values["REDIS_PASSWORD"])
    deployment.stack.stoppers.append(server.stop)
    deployment.wait_healthy("redis")


def wait_for_workers(deployment: Deployment) -> None:
    """Every replica of dask-worker has joined the scheduler."""
    from distributed import Client

    address = deployment.loopback.text("tcp://dask-scheduler:8786")
    with Client(address, timeout=60) as client:
        client.wait_for_workers(deployment.specs["dask-worker"].replicas, timeout=HEALTH_TIMEOUT)


def save_model_folder(path: Path, model: object, n_features: int) -> Path:
    """A model folder as a user has one before registering it: ``mlflow.pytorch.save_model``
    in MLflow's default pt2 format (no pickle trust needed to load it)."""
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_features))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1))]),
    )
    mlflow.pytorch.save_model(
        model,
        str(path),
        signature=signature,
        input_example=np.zeros((4, n_features), dtype=np.float32),
        serialization_format="pt2",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )
    return path
