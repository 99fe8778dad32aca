# The image every pod of infra/k8s runs (Ray head/workers, RayJob submitters, MLflow, Prefect).
# Same install as the Makefile: the pinned stack of constraints.txt with the dev extra (the
# MLflow server needs its psycopg2-binary and boto3) and the crf extra (--crf), only not
# editable. The pinned torch is PyPI's CUDA build: the same image serves the CPU and the GPU
# workers.
#   docker build -t REGISTRY/fcn-pipeline:0.1.0 .      (see infra/k8s/README.md)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# wget: KubeRay's liveness/readiness probes run it in every Ray container.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 10001 fcn && useradd --uid 10001 --gid 10001 --create-home fcn

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY fcn_core/ fcn_core/
COPY pipelines/ pipelines/
COPY flows/ flows/
# g++ only while installing: pydensecrf2 (the crf extra) builds from its sdist.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && python -m pip install --upgrade "pip>=24" \
    && python -m pip install -c constraints.txt '.[dev,crf]' \
    && apt-get purge -y --auto-remove g++ \
    && rm -rf build ./*.egg-info /var/lib/apt/lists/*
# Presets (relative paths: every entrypoint runs in /app) and the Prefect deployment file.
COPY configs/ configs/
COPY prefect.yaml ./
# ./data: FCN_DATA_DIR, the default local state; infra/k8s mounts a shared volume here.
RUN mkdir -p /app/data && chown 10001:10001 /app/data

USER 10001:10001
ENV HOME=/home/fcn \
    FCN_DATA_DIR=/app/data \
    RAY_USAGE_STATS_ENABLED=0
CMD ["fcn", "--help"]
