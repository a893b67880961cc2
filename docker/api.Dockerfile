# syntax=docker/dockerfile:1
#
# normcore API image: the FastAPI service and the store migration, on CPU-only PyTorch.
#
# The API imports normcore (job spec validation builds nothing but imports normcore.factory,
# which imports torch; checkpoint stats read tensors), so it needs torch, but never CUDA: the
# CPU wheel from the PyTorch CPU index keeps this image around 1 GB instead of 6+.
#
# Build from the repository root (the build context is filtered by .dockerignore):
#   docker build -f docker/api.Dockerfile -t normcore-api .
# docker-compose.yml builds it for the `api` and `migrate` services.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# --------------------------------------------------------------------------- build: a venv in /opt/venv
FROM ${PYTHON_IMAGE} AS build

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH

# Same torch release as the worker image's base, so a checkpoint's tensors read the same on both.
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

WORKDIR /src

# 1. The venv and torch, CPU build: the largest layer and the one that changes least.
RUN python -m venv /opt/venv \
 && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# 2. The project's other dependencies (the library's and the service extra's), read from
#    pyproject.toml alone so this layer is rebuilt only when they change. The constraint pins
#    the torch installed above: pip keeps the CPU wheel instead of pulling a CUDA build from PyPI.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; deps = p['dependencies'] + p['optional-dependencies']['service']; open('/tmp/requirements.txt', 'w').write(chr(10).join(deps) + chr(10))" \
 && python -c "from importlib.metadata import version; print('torch==' + version('torch'))" > /tmp/constraints.txt \
 && pip install --no-cache-dir --constraint /tmp/constraints.txt --requirement /tmp/requirements.txt

# 3. The project itself, without dependencies (they are all in place, torch untouched).
COPY README.md ./
COPY normcore/ normcore/
COPY service/ service/
RUN pip install --no-cache-dir --no-deps . \
 && pip check \
 && python -c "import torch, normcore.spec, service.api.app; assert torch.version.cuda is None, torch.__version__"

# --------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="normcore-api" \
      org.opencontainers.image.description="normcore training service: FastAPI API (CPU PyTorch)" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    NORMCORE_DATA_DIR=/var/lib/normcore \
    NORMCORE_ARTIFACT_DIR=/var/lib/normcore/artifacts \
    NORMCORE_DATA_ROOT=/var/lib/normcore/datasets \
    NORMCORE_HOST=0.0.0.0 \
    NORMCORE_PORT=8000 \
    NORMCORE_AUTH=true

# uid/gid 10001: not root, and no clash with users of the base image or typical host users.
# The state folders exist and belong to it, so fresh named volumes mounted there inherit that.
RUN groupadd --system --gid 10001 normcore \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/normcore \
      --shell /usr/sbin/nologin normcore \
 && mkdir -p /var/lib/normcore/artifacts /var/lib/normcore/datasets \
 && chown -R 10001:10001 /var/lib/normcore

COPY --from=build /opt/venv /opt/venv

USER 10001:10001
WORKDIR /var/lib/normcore
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# Binds every interface of the container; NORMCORE_AUTH=true above, and the settings refuse
# auth=false on a non-loopback host. Open SSE streams get 10 s to close on shutdown.
CMD ["uvicorn", "service.api.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--timeout-graceful-shutdown", "10"]
