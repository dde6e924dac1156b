# syntax=docker/dockerfile:1
# AIWFE pod image: `aiwfe run -m MANIFEST --pod NAME` (see `aiwfe k8s` for the Kubernetes objects).
#
#   docker build -t aiwfe:latest .
#   docker run --rm -e NATS_URL=nats://host:4222 aiwfe:latest          # the monolith manifest
#
# Stage 1 builds the project and its dependencies into a virtual environment; stage 2
# copies only that environment into a slim image that runs as an unprivileged user.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/aiwfe
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kernel ./kernel
COPY bus ./bus
COPY plugins ./plugins
COPY bench ./bench
COPY testing ./testing
RUN /opt/aiwfe/bin/pip install --no-cache-dir . \
    && /opt/aiwfe/bin/python -m compileall -q -j 0 /opt/aiwfe/lib

FROM ${PYTHON_IMAGE} AS runtime
ARG AIWFE_UID=10001
RUN groupadd --system --gid "${AIWFE_UID}" aiwfe \
    && useradd --system --uid "${AIWFE_UID}" --gid aiwfe --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin aiwfe
COPY --from=builder /opt/aiwfe /opt/aiwfe
COPY manifests /app/manifests
WORKDIR /app
ENV PATH=/opt/aiwfe/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    AIWFE_OPS_HOST=0.0.0.0
USER ${AIWFE_UID}:${AIWFE_UID}
# 9000: /health /ready /metrics; 8080: the gateway's HTTP and WebSocket port (gateway pods only).
EXPOSE 9000 8080
# Kubernetes uses its own probes (`aiwfe k8s`); this one serves plain `docker run`.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9000/health', timeout=2)"]
ENTRYPOINT ["aiwfe"]
CMD ["run", "-m", "manifests/monolith.toml", "--ops-port", "9000"]
