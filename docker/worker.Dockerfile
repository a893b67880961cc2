# syntax=docker/dockerfile:1
#
# normcore worker image: `python -m worker` (Celery) on the official CUDA PyTorch image.
#
# torch comes from the base image and is never replaced: the project's other dependencies (the
# library's, the service extra's and the onnx extra's, since the worker builds ONNX exports) are
# installed under a constraint that pins the base's exact torch build, then the project itself with --no-deps. The base's Python is conda's (3.11 in the upstream Dockerfile; the project
# needs >= 3.11, checked below).
#
# Build from the repository root (the build context is filtered by .dockerignore):
#   docker build -f docker/worker.Dockerfile -t normcore-worker .
# docker-compose.yml builds it for the `worker-gpu*` and `worker-cpu` services.

ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime

# --------------------------------------------------------------------------- base
FROM ${BASE_IMAGE} AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# --------------------------------------------------------------------------- build: a venv in /opt/venv
# --system-site-packages: the venv sees the base's torch (and its CUDA libraries) and adds ours.
FROM base AS build

WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import sys; assert sys.version_info >= (3, 11), sys.version" \
 && python -m venv --system-site-packages /opt/venv \
 && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; deps = p['dependencies'] + p['optional-dependencies']['service'] + p['optional-dependencies']['onnx']; open('/tmp/requirements.txt', 'w').write(chr(10).join(deps) + chr(10))" \
 && python -c "from importlib.metadata import version; print('torch==' + version('torch'))" > /tmp/constraints.txt \
 && /opt/venv/bin/pip install --no-cache-dir --constraint /tmp/constraints.txt --requirement /tmp/requirements.txt

COPY README.md ./
COPY normcore/ normcore/
COPY service/ service/
COPY worker/ worker/
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps . \
 && /opt/venv/bin/python -c "import sys, torch; from importlib.metadata import version; pin = open('/tmp/constraints.txt').read().split('==')[1].strip(); assert version('torch') == pin, (version('torch'), pin); assert torch.version.cuda, 'torch in the worker image must be a CUDA build'" \
 && /opt/venv/bin/python -c "import normcore.spec, worker.runner, service.store, onnx, onnxscript, onnxruntime"

# --------------------------------------------------------------------------- runtime
FROM base AS runtime

LABEL org.opencontainers.image.title="normcore-worker" \
      org.opencontainers.image.description="normcore training service: Celery worker (CUDA PyTorch)" \
      org.opencontainers.image.licenses="Apache-2.0"

# procps: pgrep for the HEALTHCHECK. Package versions are not pinned: the Ubuntu archive drops
# old ones, and the base image tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends procps \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 normcore \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/normcore \
      --shell /usr/sbin/nologin normcore \
 && mkdir -p /var/lib/normcore/artifacts /var/lib/normcore/datasets \
 && chown -R 10001:10001 /var/lib/normcore

COPY --from=build /opt/venv /opt/venv

# No REMAP_SIGTERM: `docker stop` sends SIGTERM, which Celery turns into a warm shutdown; the
# worker relays it to the training child (which stops after its current step, SIGKILL after
# NORMCORE_CANCEL_GRACE_SECONDS) and the job's lease lets a reaper re-queue it. SIGQUIT (what
# REMAP_SIGTERM=SIGQUIT would make of SIGTERM) is this worker's cold shutdown: it kills the child
# at once. See docs/cluster.md.
ENV PATH=/opt/venv/bin:$PATH \
    NORMCORE_DATA_DIR=/var/lib/normcore \
    NORMCORE_ARTIFACT_DIR=/var/lib/normcore/artifacts \
    NORMCORE_DATA_ROOT=/var/lib/normcore/datasets

USER 10001:10001
WORKDIR /var/lib/normcore

# The worker has no health command of its own, and it answers no Celery control message while a
# job runs (solo pool), so `celery inspect ping` would mark every busy worker unhealthy. This is a
# process check: the Celery process is up (a dead broker or store shows in the API's /readyz).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["pgrep", "-f", "python -m worker"]

CMD ["python", "-m", "worker", "--queues", "gpu,cpu", "--concurrency", "1"]
