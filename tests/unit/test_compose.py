"""docker-compose.yaml, the Dockerfile and docker/, checked without Docker.

Docker does not run where these tests run: nothing here builds the image or starts
a container. What is checked is what would otherwise only show up at `docker compose
up`: a service without an image, a `depends_on` on a missing service, a BATCHSCORE_*
name that the settings reject at startup, an Airflow option that does not exist, a
command or flag that the image's console scripts do not have. Every CLI is asked to
parse its own command line (click / argparse), which runs nothing.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from importlib.metadata import PackageNotFoundError, entry_points, requires
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from batchscore.core.settings import ENV_PREFIX, ApiSettings, RunSettings, load_settings
from tests.stack import MissingVariable, compose_env_module, service_spec
from tests.stack import interpolate as stack_interpolate

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
AIRFLOW_INIT_SCRIPT = REPO / "docker" / "airflow-init.sh"
POSTGRES_INIT_SCRIPT = REPO / "docker" / "postgres" / "init-databases.sh"

EXPECTED_SERVICES = {
    "postgres",
    "redis",
    "mlflow",
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "dask-scheduler",
    "dask-worker",
    "dask-cuda-scheduler",
    "dask-cuda-worker",
    "lookup-api",
}
# Where the pipeline runs: Airflow tasks (LocalExecutor: in the scheduler) and Dask workers.
PIPELINE_SERVICES = {"airflow-scheduler", "dask-worker", "dask-cuda-worker"}
RUNS_READERS = PIPELINE_SERVICES | {"lookup-api"}
CONSOLE_SCRIPTS = {"batchscore", "airflow", "mlflow", "dask"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
LOCAL_HOSTS = {"localhost", "127.0.0.1", "0.0.0.0"}

# ---------------------------------------------------------------------------- helpers

_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
# What `make compose-env` writes into .env (random secrets), and nothing else: the other
# variables take their defaults, so the tests are hermetic.
DOTENV = compose_env_module().generate()


def interpolate(value: Any, env: dict[str, str] = DOTENV) -> Any:
    """Compose's interpolation (tests/stack.py, which the stack test runs with) over .env."""
    return stack_interpolate(value, env) if isinstance(value, str) else value


@cache
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict), "docker-compose.yaml is not a mapping"
    return loaded


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]  # type: ignore[no-any-return]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(interpolate(v)) for k, v in env.items()}


def argv(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [interpolate(v) for v in shlex.split(value)]
    return [str(interpolate(v)) for v in value]


def command(service: dict[str, Any]) -> list[str]:
    return argv(service.get("entrypoint")) + argv(service.get("command"))


def healthcheck_argv(service: dict[str, Any]) -> list[str]:
    """The healthcheck as argv; a CMD-SHELL one is split the way `sh -c` would run it."""
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return argv(test)
    kind, *rest = test
    if kind == "CMD-SHELL":
        return argv(" ".join(rest))
    return argv(rest)


def is_project_image(service: dict[str, Any]) -> bool:
    return "build" in service or str(service.get("image", "")).startswith("batchscore:")


def one_shot(name: str) -> bool:
    """A service that others wait on to finish (the Airflow DB migration)."""
    conditions = [
        (s.get("depends_on") or {}).get(name, {}).get("condition") for s in services().values()
    ]
    return "service_completed_successfully" in conditions


def volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (a named volume or a host path), short syntax."""
    mounts = {}
    for volume in service.get("volumes", []):
        assert isinstance(volume, str), f"long volume syntax is not handled here: {volume}"
        source, target, *_ = interpolate(volume).split(":")
        mounts[target] = source
    return mounts


def urls_in(service: dict[str, Any]) -> list[str]:
    words = list(environment(service).values()) + command(service)
    return [w for w in words if re.match(r"^[a-z][a-z0-9+.-]*://", w)]


# ------------------------------------------------------------------------- Dockerfile


@cache
def dockerfile_instructions() -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments) with ARGs before the first FROM expanded."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    global_args: dict[str, str] = {}
    found, stage = [], ""
    for line in lines:
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        rest = re.sub(
            r"\$\{(\w+)\}", lambda m: global_args.get(m.group(1), m.group(0)), rest.strip()
        )
        if instruction == "ARG" and not stage:
            name, _, default = rest.partition("=")
            global_args[name] = default
            continue
        if instruction == "FROM":
            stage = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
        found.append((stage, instruction, rest))
    return found


def dockerfile_stage(name: str) -> list[tuple[str, str]]:
    return [(i, rest) for stage, i, rest in dockerfile_instructions() if stage == name]


def default_image_stages() -> list[str]:
    """The stages the default (CPU) image is built from, the first first."""
    bases = {stage: rest.split()[0] for stage, i, rest in dockerfile_instructions() if i == "FROM"}
    chain = [list(bases)[-1]]
    while bases.get(chain[-1]) in bases:
        chain.append(bases[chain[-1]])
    return chain[::-1]


def dockerfile_env() -> dict[str, str]:
    """The ENV of the default image."""
    env = {}
    for stage in default_image_stages():
        for instruction, rest in dockerfile_stage(stage):
            if instruction == "ENV":
                env.update(dict(pair.split("=", 1) for pair in shlex.split(rest)))
    return env


# ------------------------------------------------------------------- the compose file


def test_the_compose_file_parses_and_holds_the_whole_stack() -> None:
    assert set(services()) == EXPECTED_SERVICES


def test_every_service_has_an_image_or_a_build() -> None:
    for name, service in services().items():
        assert "image" in service or "build" in service, f"{name} has neither image nor build"
        if "build" in service:
            build = service["build"]
            context = build if isinstance(build, str) else build.get("context", ".")
            assert (REPO / context / "Dockerfile").is_file(), f"{name} builds without a Dockerfile"


def test_every_service_that_serves_has_a_healthcheck() -> None:
    for name, service in services().items():
        if one_shot(name):
            assert service.get("restart") == "no", f"{name} runs once; it must not restart"
            continue
        serves = "ports" in service or "expose" in service
        assert serves or name.startswith("airflow-"), f"{name} serves nothing: expose its port"
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        assert healthcheck_argv(service), f"{name}: empty healthcheck test"


def test_depends_on_names_existing_services_with_a_condition() -> None:
    for name, service in services().items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: use depends_on with conditions, not a list"
        for target, spec in depends.items():
            assert target in services(), f"{name} depends on {target}, which does not exist"
            assert spec.get("condition") in CONDITIONS, f"{name} -> {target}: no condition"
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services()[target], f"{target} cannot become healthy"
            if spec["condition"] == "service_completed_successfully":
                assert one_shot(target)
            # A service outside any profile cannot wait on one that only a profile starts.
            if not service.get("profiles"):
                assert not services()[target].get("profiles"), f"{name} needs {target}'s profile"


def test_depends_on_has_no_cycle() -> None:
    graph = {n: set(s.get("depends_on", {})) for n, s in services().items()}
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"depends_on cycle: {' -> '.join((*path, node))}"
        if node not in done:
            for target in graph[node]:
                visit(target, (*path, node))
            done.add(node)

    for node in graph:
        visit(node, ())


def test_the_airflow_services_wait_for_the_database_migration() -> None:
    assert one_shot("airflow-init")
    for name in EXPECTED_SERVICES - {"airflow-init"}:
        if name.startswith("airflow-"):
            condition = services()[name]["depends_on"]["airflow-init"]["condition"]
            assert condition == "service_completed_successfully", name
    assert command(services()["airflow-init"]) == ["batchscore-airflow-init"]
    assert "airflow db migrate" in AIRFLOW_INIT_SCRIPT.read_text()


def test_urls_point_at_services_of_this_file() -> None:
    for name, service in services().items():
        for url in urls_in(service):
            host = urlsplit(url).hostname
            assert host in services() or host in LOCAL_HOSTS, f"{name}: {url} names no service"


# ----------------------------------------------------------------- batchscore settings


def accepted_batchscore_names() -> set[str]:
    """The BATCHSCORE_* names the settings accept; an aliased field has no such name."""
    return {
        f"{ENV_PREFIX}{name}".upper()
        for cls in (RunSettings, ApiSettings)
        for name, field in cls.model_fields.items()
        if field.validation_alias is None
    }


def test_batchscore_variables_are_fields_of_the_settings() -> None:
    used = set(re.findall(r"\bBATCHSCORE_[A-Z0-9_]+", COMPOSE_FILE.read_text()))
    used |= {k for k in dockerfile_env() if k.startswith(ENV_PREFIX)}
    for service in services().values():
        used |= {k for k in environment(service) if k.startswith(ENV_PREFIX)}
    assert used, "no BATCHSCORE_* variable found: the parsing is broken"
    unknown = used - accepted_batchscore_names()
    assert not unknown, f"the settings reject {sorted(unknown)} at startup"


def settings_services() -> list[str]:
    return sorted(
        name
        for name, service in services().items()
        if is_project_image(service) and any(k.startswith(ENV_PREFIX) for k in environment(service))
    )


@pytest.mark.parametrize("name", settings_services())
def test_each_service_environment_builds_its_settings(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Startup as the container would do it: the image's ENV, then the service's."""
    service = services()[name]
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key, value in {**dockerfile_env(), **environment(service)}.items():
        monkeypatch.setenv(key, value)
    serves_lookups = command(service)[:2] == ["batchscore", "serve"]
    settings = load_settings(ApiSettings if serves_lookups else RunSettings)
    assert urlsplit(settings.resolved_store_url).hostname == "redis"
    if isinstance(settings, RunSettings):
        assert urlsplit(settings.cluster).hostname == "dask-scheduler"
        assert settings.tracking_uri == "http://mlflow:5000"


def test_pipelines_use_the_stack_services() -> None:
    scheduler = services()["dask-scheduler"]
    port = command(scheduler)[command(scheduler).index("--port") + 1]
    for name in PIPELINE_SERVICES:
        env = environment(services()[name])
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
        assert env["BATCHSCORE_STORE_URL"] == "redis://redis:6379/0", name
        assert env["BATCHSCORE_CLUSTER"] == f"tcp://dask-scheduler:{port}", name
    assert environment(services()["lookup-api"])["BATCHSCORE_STORE_URL"] == "redis://redis:6379/0"
    assert f"tcp://dask-scheduler:{port}" in command(services()["dask-worker"])


def test_dask_workers_preload_and_start_with_the_engines_worker_environment() -> None:
    """The workers of the stack's long-lived cluster import torch, MLflow and GX as they
    start (``scoring.preload``); the CPU workers run with the same process environment as
    a LocalCluster's (jemalloc for Arrow, glibc's heap not trimmed per batch)."""
    from scoring.engine import worker_process_env

    for worker in ("dask-worker", "dask-cuda-worker"):
        argv_ = command(services()[worker])
        assert argv_[argv_.index("--preload") + 1] == "scoring.preload", worker
    env = environment(services()["dask-worker"])
    assert {k: env.get(k) for k in worker_process_env()} == worker_process_env()


def test_the_runs_folder_is_one_volume_at_one_path() -> None:
    """Parts written by a Dask worker are read by the next Airflow task and the lookup API."""
    home = {environment(services()[n]).get("BATCHSCORE_HOME") for n in RUNS_READERS}
    assert home == {dockerfile_env()["BATCHSCORE_HOME"]}, home
    (path,) = home
    sources = {volume_mounts(services()[n]).get(path) for n in RUNS_READERS}
    assert len(sources) == 1 and None not in sources, sources
    (volume,) = sources
    assert volume in compose()["volumes"], f"{volume} is not a named volume"
    inputs = {volume_mounts(services()[n]).get("/data") for n in PIPELINE_SERVICES}
    assert len(inputs) == 1 and None not in inputs, f"/data differs between services: {inputs}"


def test_bind_mounted_files_exist() -> None:
    for name, service in services().items():
        for source in volume_mounts(service).values():
            if source.startswith("./docker/"):
                assert (REPO / source).is_file(), f"{name} mounts {source}, which is missing"


# ----------------------------------------------------------------------------- Airflow


@cache
def airflow_options() -> dict[str, set[str]]:
    # Located, not imported: importing airflow sets up its configuration and home.
    spec = importlib.util.find_spec("airflow")
    assert spec and spec.submodule_search_locations, "apache-airflow is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / "config_templates" / "config.yml"
    sections = yaml.safe_load(path.read_text())
    return {section: set(spec["options"]) for section, spec in sections.items()}


def test_airflow_variables_name_options_of_the_installed_airflow() -> None:
    for name, service in services().items():
        for key in environment(service):
            if key.startswith("AIRFLOW__"):
                section, option = key.removeprefix("AIRFLOW__").lower().split("__", 1)
                assert option in airflow_options().get(section, set()), f"{name}: {key}"


def test_airflow_is_postgres_backed_local_executor_with_one_jwt_secret() -> None:
    airflow = {n: environment(s) for n, s in services().items() if n.startswith("airflow-")}
    apiserver = command(services()["airflow-apiserver"])
    port = apiserver[apiserver.index("--port") + 1]
    for name, env in airflow.items():
        assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor", name
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == (
            f"http://airflow-apiserver:{port}/execution/"
        ), name
    for shared in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY"):
        values = {env[shared] for env in airflow.values()}
        assert len(values) == 1 and "" not in values, f"{shared} differs: {values}"


def test_the_dags_folder_is_the_one_the_image_copies_dags_into() -> None:
    copies = [
        rest.split()[-2:]
        for _, instruction, rest in dockerfile_instructions()
        if instruction == "COPY" and rest.split()[-2].rstrip("/") == "dags"
    ]
    assert copies, "the Dockerfile does not copy dags/"
    destination = copies[-1][1].rstrip("/")
    for name, service in services().items():
        folder = environment(service).get("AIRFLOW__CORE__DAGS_FOLDER")
        if name.startswith("airflow-"):
            assert folder == destination, f"{name}: DAGS_FOLDER {folder}, image has {destination}"


def test_database_urls_match_the_postgres_init_script() -> None:
    """Each URL names the role and database that the init script creates from the
    postgres service's environment (one variable each: the role owns its namesake)."""
    postgres = environment(services()["postgres"])
    init = POSTGRES_INIT_SCRIPT.read_text()
    mlflow = command(services()["mlflow"])
    urls = {
        "AIRFLOW": environment(services()["airflow-scheduler"])[
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"
        ],
        "MLFLOW": mlflow[mlflow.index("--backend-store-uri") + 1],
    }
    for prefix, url in urls.items():
        parts = urlsplit(url)
        assert parts.hostname == "postgres" and parts.port == 5432, url
        assert parts.password == postgres[f"{prefix}_DB_PASSWORD"], f"{url}: password"
        name = postgres[f"{prefix}_DB_NAME"]
        assert parts.username == name and parts.path == f"/{name}", f"{url} vs {name}"
        variable = prefix.lower() + "_db"
        assert f'-v {variable}="${{{prefix}_DB_NAME:-{name}}}"' in init, variable
        assert f'CREATE ROLE :"{variable}" LOGIN' in init
        assert f'CREATE DATABASE :"{variable}" OWNER :"{variable}"' in init
        assert f"{prefix}_DB_PASSWORD" in init
    mounts = volume_mounts(services()["postgres"])
    init_mount = mounts.get("/docker-entrypoint-initdb.d/10-init-databases.sh")
    assert init_mount == "./docker/postgres/init-databases.sh"


# ------------------------------------------------------------------------------ MLflow


def test_mlflow_admits_the_host_that_the_pipelines_call_it_by() -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    args = command(services()["mlflow"])
    allowed = [h.strip() for h in args[args.index("--allowed-hosts") + 1].split(",")]
    for name in PIPELINE_SERVICES:
        host = urlsplit(environment(services()[name])["MLFLOW_TRACKING_URI"]).netloc
        assert is_allowed_host_header(allowed, host), f"mlflow rejects Host: {host} ({name})"
    assert is_allowed_host_header(allowed, "localhost:5000"), "the published port is refused"
    for flag in ("--serve-artifacts", "--artifacts-destination", "--backend-store-uri"):
        assert flag in args


# ---------------------------------------------------------------------------- the GPU


def test_the_gpu_profile_service_reserves_nvidia_gpus() -> None:
    gpu = {n: s for n, s in services().items() if "gpu" in s.get("profiles", [])}
    assert set(gpu) == {"dask-cuda-scheduler", "dask-cuda-worker"}
    service = gpu["dask-cuda-worker"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert command(service)[:3] == ["dask", "cuda", "worker"]
    assert service["build"]["args"]["VARIANT"] == "gpu"
    assert "deploy" not in gpu["dask-cuda-scheduler"], "the scheduler needs no GPU"
    for name, other in services().items():
        if name != "dask-cuda-worker" and "build" in other:
            assert other["build"].get("args", {}).get("VARIANT", "cpu") == "cpu", name
            assert other["image"] != service["image"], f"{name} shares the GPU image's tag"


# ------------------------------------------------------- the commands exist in the image


@cache
def dependency_closure() -> set[str]:
    """The distributions that `pip install .` brings in (markers evaluated here)."""
    seen, todo = set(), ["batchscore"]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            required = requires(name) or []
        except PackageNotFoundError:  # a requirement not installed here
            continue
        for line in required:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def copied_programs() -> set[str]:
    """Names the Dockerfile copies into /usr/local/bin."""
    return {
        rest.split()[-1].removeprefix("/usr/local/bin/")
        for _, instruction, rest in dockerfile_instructions()
        if instruction == "COPY" and rest.split()[-1].startswith("/usr/local/bin/")
    }


def test_the_programs_are_console_scripts_of_the_project_and_its_dependencies() -> None:
    scripts = {ep.name: ep for ep in entry_points(group="console_scripts")}
    for program in CONSOLE_SCRIPTS:
        assert program in scripts, f"no console script {program} in this environment"
        distribution = canonicalize_name(scripts[program].dist.name)  # type: ignore[union-attr]
        assert distribution in dependency_closure(), f"{program} comes from {distribution}"
    for name, service in services().items():
        if not is_project_image(service):
            continue
        program = command(service)[0]
        assert program in CONSOLE_SCRIPTS | copied_programs(), f"{name} runs {program}"
        checker = healthcheck_argv(service)[0] if "healthcheck" in service else "curl"
        assert checker in CONSOLE_SCRIPTS | {"curl"}, f"{name} checks health with {checker}"
    installs = " ".join(rest for _, i, rest in dockerfile_instructions() if i == "RUN")
    assert re.search(r"apt-get install [^&]*\bcurl\b", installs), "curl is not installed"


def click_command(program: str, args: list[str]) -> tuple[Any, list[str]]:
    """The click command that `program args...` would run, and the arguments it gets."""
    if program == "dask":
        found = {ep.name: ep for ep in entry_points(group="dask_cli")}
        if args[0] not in found:
            pytest.skip(f"`dask {args[0]}` comes from an extra not installed here")
        return found[args[0]].load(), args[1:]
    if program == "batchscore":
        import typer

        from batchscore.cli import app

        group: Any = typer.main.get_command(app)
    else:
        group = {ep.name: ep for ep in entry_points(group="console_scripts")}[program].load()
    # Typer ships its own copy of click: its groups are no click.Group, hence getattr.
    while getattr(group, "commands", None) and args and args[0] in group.commands:
        group, args = group.commands[args[0]], args[1:]
    if getattr(group, "commands", None):
        pytest.fail(f"`{program}` has no subcommand {args[:1]}; it has {sorted(group.commands)}")
    return group, args


def project_command_lines() -> list[tuple[str, list[str]]]:
    lines = []
    for name, service in services().items():
        if is_project_image(service):
            lines.append((name, command(service)))
            if "healthcheck" in service:
                lines.append((f"{name} healthcheck", healthcheck_argv(service)))
    return lines


CLICK_PROGRAMS = {"batchscore", "mlflow", "dask"}


@pytest.mark.parametrize(
    ("where", "line"),
    [(w, line) for w, line in project_command_lines() if line[0] in CLICK_PROGRAMS],
    ids=lambda value: value if isinstance(value, str) else " ".join(value[:3]),
)
def test_click_commands_accept_their_arguments(where: str, line: list[str]) -> None:
    """Parsing only: click checks the subcommand, every option and its type, runs nothing."""
    if line[:3] == ["dask", "cuda", "worker"]:
        # dask-cuda (the [gpu] extra) is not installed here; 26.10 registers
        # `dask cuda worker` under the dask_cli entry points. The GPU variant installs it:
        assert any("requirements.py gpu" in rest for _, rest in dockerfile_stage("deps-gpu"))
    cmd, args = click_command(line[0], line[1:])
    try:
        cmd.make_context(line[0], args)
    except Exception as exc:  # click's UsageError, or the same from Typer's copy of click
        if not hasattr(exc, "format_message"):
            raise
        pytest.fail(f"{where}: `{' '.join(line)}`: {exc.format_message()}")


def test_airflow_commands_parse(tmp_path: Path) -> None:
    """Airflow's own argparse parser, in a child process with a throwaway AIRFLOW_HOME."""
    lines = [line[1:] for _, line in project_command_lines() if line[0] == "airflow"]
    script_lines = [
        shlex.split(line)[1:]
        for line in AIRFLOW_INIT_SCRIPT.read_text().splitlines()
        if line.startswith("airflow ")
    ]
    assert ["db", "migrate"] in script_lines
    lines += script_lines
    code = (
        "import json, sys\n"
        "from airflow.cli.cli_parser import get_parser\n"
        "parser = get_parser()\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    parser.parse_args(args)\n"
    )
    env = {"AIRFLOW_HOME": str(tmp_path), "PATH": str(Path(sys.executable).parent)}
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(lines)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]


# -------------------------------------------------------------- Dockerfile, .dockerignore


def test_the_dockerfile_builds_the_project_on_python_311_slim() -> None:
    instructions = dockerfile_instructions()
    bases = [rest.split()[0] for _, i, rest in instructions if i == "FROM"]
    assert bases[0] == "python:3.11-slim", bases
    runtime = dockerfile_stage("runtime")
    runs = [rest for i, rest in runtime if i == "RUN"]
    assert any(
        re.search(r"--mount=type=bind,source=\.,target=(\S+?),rw\s+pip install --no-deps \1", r)
        for r in runs
    ), "the runtime stage does not pip install the project"
    # Airflow 3 opens a sync (psycopg2) and an async (asyncpg) engine on its database: the
    # `postgres` extra has both, and both image variants install it (dev includes it too).
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    drivers = {Requirement(r).name for r in project["optional-dependencies"]["postgres"]}
    assert drivers == {"psycopg2-binary", "asyncpg"}
    assert "batchscore[postgres]" in project["optional-dependencies"]["dev"][0]
    for stage in ("deps-cpu", "deps-gpu"):
        text = " ".join(rest for i, rest in dockerfile_stage(stage) if i == "RUN")
        assert re.search(r"docker/requirements\.py [\w ]*\bpostgres\b", text), (
            f"{stage}: no drivers"
        )
    assert not any("gpu" in rest for i, rest in dockerfile_stage("deps-cpu") if i == "RUN")
    assert default_image_stages() == ["base", "deps-cpu", "runtime"], "not the CPU variant"


def test_the_cpu_torch_is_the_version_the_project_pins() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch = next(r for r in map(Requirement, project["dependencies"]) if r.name == "torch")
    (arg,) = [rest for i, rest in dockerfile_stage("deps-cpu") if rest.startswith("TORCH_VERSION=")]
    assert str(torch.specifier) == f"=={arg.split('=', 1)[1]}", "the Dockerfile's torch is stale"


def test_the_requirements_helper_lists_pyproject_dependencies() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "docker" / "requirements.py"), "gpu"],
        capture_output=True,
        text=True,
        check=True,
    )
    listed = done.stdout.split("\n")
    assert any(line.startswith("apache-airflow") for line in listed)
    assert any(line.startswith("dask-cuda") for line in listed)


def excluded(path: str, patterns: list[str]) -> bool:
    """Enough of .dockerignore's matching for the paths below (no `!` exceptions)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        pattern = pattern.strip("/")
        candidates = [pattern, pattern.removeprefix("**/")]
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            return True
        if pattern.startswith("**/") and any(fnmatch.fnmatchcase(x, pattern[3:]) for x in parts):
            return True
    return False


def test_the_dockerignore_keeps_what_the_image_needs_and_drops_the_venv() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns), "the matcher here ignores exceptions"
    needed = [
        "pyproject.toml",
        "README.md",
        "dags/batchscore_pipeline.py",
        "batchscore/cli.py",
        "docker/requirements.py",
        "docker/airflow-init.sh",
    ]
    for path in needed:
        assert not excluded(path, patterns), f".dockerignore drops {path}"
    for path in (".venv/bin/python", ".git/HEAD", "data/input.parquet", "x/__pycache__/y.pyc"):
        assert excluded(path, patterns), f".dockerignore sends {path} to the daemon"


def test_the_docker_shell_scripts_parse() -> None:
    for script in (AIRFLOW_INIT_SCRIPT, POSTGRES_INIT_SCRIPT):
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, f"{script}: {done.stderr}"


# ------------------------------------------------------------ secrets, Redis, the API


def variables(text: str) -> dict[str, set[str]]:
    """Each interpolated variable of the compose file and the operators it is used with."""
    found: dict[str, set[str]] = {}
    for match in _VARIABLE.finditer(text):
        if match.group(1):
            found.setdefault(match.group(1), set()).add(match.group(2) or "")
    return found


SECRET_NAME = re.compile(r"PASSWORD|SECRET|FERNET|_KEY$")


def test_no_secret_has_a_value_in_the_repository() -> None:
    """Every secret is required (``${VAR:?...}``) and `make compose-env` writes each."""
    used = variables(COMPOSE_FILE.read_text())
    secrets = {name for name in used if SECRET_NAME.search(name)}
    for name in secrets:
        assert used[name] == {":?"}, f"{name} is used with {used[name]}: give no default"
    required = {name for name, operators in used.items() if ":?" in operators}
    assert required == set(compose_env_module().SECRETS), "compose_env.py and the file differ"
    assert ".env" in (REPO / ".gitignore").read_text().split()
    assert excluded(".env", [line.strip() for line in DOCKERIGNORE.read_text().splitlines()])
    with pytest.raises(MissingVariable, match="make compose-env"):
        service_spec(compose(), "airflow-scheduler", {})


def test_compose_env_writes_a_private_env_file_once(tmp_path: Path) -> None:
    target = tmp_path / ".env"
    script = [sys.executable, str(REPO / "docker" / "compose_env.py"), str(target)]
    subprocess.run(script, check=True, capture_output=True)
    first = target.read_text()
    assert target.stat().st_mode & 0o777 == 0o600
    values = dict(
        line.split("=", 1) for line in first.splitlines() if line and not line.startswith("#")
    )
    assert values.pop("COMPOSE_PROJECT_NAME") == "batchscore"
    assert set(values) == set(compose_env_module().SECRETS)
    assert all(re.fullmatch(r"[A-Za-z0-9_=-]{32,}", v) for v in values.values()), "not URL-safe"
    again = subprocess.run(script, check=True, capture_output=True, text=True)
    assert target.read_text() == first and "left as it is" in again.stdout
    from cryptography.fernet import Fernet

    Fernet(values["AIRFLOW_FERNET_KEY"].encode())  # a key Airflow accepts
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^compose-env:\n\t.*docker/compose_env\.py$", makefile, re.M)


def test_redis_needs_its_password_and_every_client_is_given_it() -> None:
    redis = services()["redis"]
    password = DOTENV["REDIS_PASSWORD"]
    args = command(redis)
    assert args[:1] == ["redis-server"] and args[args.index("--requirepass") + 1] == password
    assert environment(redis)["REDISCLI_AUTH"] == password, "the healthcheck cannot log in"
    assert "redis-cli" in " ".join(healthcheck_argv(redis))
    for name in PIPELINE_SERVICES | {"lookup-api"}:
        assert environment(services()[name])["BATCHSCORE_STORE_PASSWORD"] == password, name


def test_the_lookup_api_asks_every_caller_for_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    env = environment(services()["lookup-api"])
    assert json.loads(env["BATCHSCORE_API_KEYS"]) == {DOTENV["LOOKUP_API_KEY"]: ["*"]}


def test_dags_start_paused_except_the_ad_hoc_one(tmp_path: Path) -> None:
    """A fresh stack must not run `score_churn_daily` every night on data it lacks; the
    ad-hoc `batchscore` DAG (no schedule) stays triggerable: REST triggers of a paused
    DAG stay queued."""
    for name, service in services().items():
        if name.startswith("airflow-"):
            paused = environment(service)["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"]
            assert paused == "true", name
    code = (
        "import json\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag({str(REPO / 'dags')!r})\n"
        "assert not bag.import_errors, bag.import_errors\n"
        "print(json.dumps({i: d.is_paused_upon_creation for i, d in bag.dags.items()}))\n"
    )
    env = {"AIRFLOW_HOME": str(tmp_path), "PATH": str(Path(sys.executable).parent)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    paused = json.loads(done.stdout.strip().splitlines()[-1])
    assert paused["batchscore"] is False
    assert paused["score_churn_daily"] is None, "the daily job follows the stack's default"


# ----------------------------------------------------------------------------- Dask


def test_the_dask_dashboard_is_published_on_loopback_and_can_render() -> None:
    from importlib.metadata import version

    from packaging.version import Version

    assert "127.0.0.1:8787:8787" in [interpolate(p) for p in services()["dask-scheduler"]["ports"]]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    bokeh = [Requirement(r) for r in project["dependencies"] if r.startswith("bokeh")]
    assert bokeh and bokeh[0].specifier.contains("3.1"), "dask's dashboard needs bokeh>=3.1"
    assert Version(version("bokeh")) >= Version("3.1")


def test_gpu_workers_form_a_cluster_of_their_own() -> None:
    """With the gpu profile on, no shard may go to a CPU worker: the GPU workers join
    their own scheduler, which the runs are pointed at through BATCHSCORE_CLUSTER."""
    cuda = command(services()["dask-cuda-scheduler"])
    port = cuda[cuda.index("--port") + 1]
    assert f"tcp://dask-cuda-scheduler:{port}" in command(services()["dask-cuda-worker"])
    assert "tcp://dask-cuda-scheduler" not in " ".join(command(services()["dask-worker"]))
    gpu_env = DOTENV | {"BATCHSCORE_CLUSTER": f"tcp://dask-cuda-scheduler:{port}"}
    for name in PIPELINE_SERVICES:
        env = service_spec(compose(), name, gpu_env).environment
        assert env["BATCHSCORE_CLUSTER"] == f"tcp://dask-cuda-scheduler:{port}", name


# ---------------------------------------------------------- a Compose CLI reads the file


def compose_cli() -> list[str] | None:
    """`docker compose` (v2) where there is one, else Debian's `docker-compose` (1.29):
    both read and check a file without a Docker engine."""
    if shutil.which("docker"):
        try:
            done = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
            if done.returncode == 0:
                return ["docker", "compose"]
        except (OSError, subprocess.TimeoutExpired):
            pass
    found = shutil.which("docker-compose")
    return [found] if found else None


def run_compose(env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """No Compose CLI fails the test rather than skipping it: Debian's needs no engine."""
    cli = compose_cli()
    if cli is None:
        pytest.fail(
            "no Compose CLI here (neither `docker compose` nor `docker-compose`): run "
            "`make stack-deps`, which installs Debian's docker-compose (no Docker engine needed)",
            pytrace=False,
        )
    # Only what the CLI needs to run: no variable of this shell may change the resolution.
    clean = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    return subprocess.run(
        [*cli, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "--profile", "gpu", *args],
        cwd=REPO,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_compose_cli_accepts_the_file_and_resolves_it_as_the_stack_test_does(
    tmp_path: Path,
) -> None:
    """`config` validates the file against the Compose schema, then resolves merges and
    interpolation: the commands and environments must be those that tests/stack.py
    reads from the file, which the stack test runs."""
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in DOTENV.items()))
    checked = run_compose(env_file, "config", "-q")
    assert checked.returncode == 0, checked.stderr
    resolved = yaml.safe_load(run_compose(env_file, "config").stdout)["services"]
    assert set(resolved) == EXPECTED_SERVICES
    for name in EXPECTED_SERVICES:
        ours = service_spec(compose(), name, DOTENV)
        theirs = resolved[name]
        assert [str(w) for w in theirs.get("command", [])] == ours.command, name
        env = {k: str(v) for k, v in (theirs.get("environment") or {}).items()}
        assert env == ours.environment, name


def test_a_compose_cli_refuses_the_file_without_its_env(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    refused = run_compose(empty, "config", "-q")
    assert refused.returncode != 0
    assert "make compose-env" in refused.stderr
