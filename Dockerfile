# syntax=docker/dockerfile:1
#
# One project image for every batchscore service in docker-compose.yaml: the Airflow
# components (apache-airflow is a dependency of the project), the MLflow tracking
# server, the Dask scheduler and workers, and the lookup API (`batchscore serve`).
#
#   docker build -t batchscore:local .                               # CPU torch
#   docker build --build-arg VARIANT=gpu -t batchscore:local-gpu .   # + the [gpu] extra
#
# VARIANT=gpu adds the project's `gpu` extra (dask-cuda, for `dask cuda worker`) and
# keeps PyPI's CUDA build of torch; the default CPU variant installs torch from the
# CPU wheel index first, which saves the gigabytes of CUDA libraries that no CPU
# service uses. Both variants install the same pinned versions from pyproject.toml.

ARG PYTHON_VERSION=3.11
ARG VARIANT=cpu

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# curl: the HTTP healthchecks in docker-compose.yaml.
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/batchscore
# Only what decides the dependencies, so that a code change reuses the layer below.
COPY pyproject.toml ./
COPY docker/requirements.py docker/

FROM base AS deps-cpu
ARG TORCH_VERSION=2.13.0
# The CPU torch (2.13.0+cpu) satisfies the project's torch==2.13.0 pin, so the second
# install keeps it. The project's `postgres` extra holds the Postgres drivers (the same
# pins `make install` puts in the dev venv): psycopg2-binary for Airflow's and MLflow's
# backends (postgresql+psycopg2://); asyncpg because Airflow 3 also opens an async
# engine on its database, on a URL it derives as postgresql+asyncpg://.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && python docker/requirements.py postgres > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

FROM base AS deps-gpu
RUN python docker/requirements.py gpu postgres > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
# The NVIDIA container runtime mounts the driver libraries these ask for.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM deps-${VARIANT} AS runtime
# The project itself, without its dependencies (installed above). The source is
# bind-mounted for the install only, so it adds no layer; pip builds a wheel and
# installs it into site-packages.
RUN --mount=type=bind,source=.,target=/tmp/src,rw \
    pip install --no-deps /tmp/src

# uid 50000 / gid 0 as in Airflow's own images. The folders below are the mount
# points of the named volumes in docker-compose.yaml; a new named volume takes the
# owner of the folder it is mounted on, so the services can write to them.
RUN useradd --uid 50000 --gid 0 --create-home --home-dir /home/batchscore batchscore \
    && mkdir -p /opt/airflow/dags /opt/airflow/logs /opt/airflow/auth \
        /var/lib/batchscore/runs /mlartifacts /data \
    && chown -R 50000:0 /opt/airflow /var/lib/batchscore /mlartifacts /data \
    && chmod -R g+rwX /opt/airflow /var/lib/batchscore /mlartifacts /data

# The DAGs folder that AIRFLOW__CORE__DAGS_FOLDER points at.
COPY --chown=50000:0 dags/ /opt/airflow/dags/
COPY --chmod=0755 docker/airflow-init.sh /usr/local/bin/batchscore-airflow-init

ENV AIRFLOW_HOME=/opt/airflow \
    BATCHSCORE_HOME=/var/lib/batchscore \
    MLFLOW_DISABLE_TELEMETRY=true \
    GX_ANALYTICS_ENABLED=false
USER 50000
WORKDIR /home/batchscore
# 8000 lookup API, 8080 Airflow API server and UI, 5000 MLflow, 8786/8787 Dask scheduler
# (8787: its dashboard, which needs bokeh, a dependency of the project).
EXPOSE 8000 8080 5000 8786 8787
CMD ["batchscore", "--help"]
