# syntax=docker/dockerfile:1
# indexer's container images, one target each (make image builds cpu, slim and cuda):
#   docker build --target cpu  -t indexer:cpu  .   builds and serving on CPUs (CPU torch)
#   docker build --target slim -t indexer:slim .   queries and serve without torch or timm
#   docker build --target cuda -t indexer:cuda .   builds on NVIDIA GPUs (CUDA torch)
#   docker build --target ray  -t indexer:ray  .   the cuda image with indexer[ray], for KubeRay
# Every image runs `indexer` as user 10001 from the venv /opt/indexer, installed from the wheel
# that the builder stage makes. tests/test_image.py checks this file without an engine.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# --- the wheel ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY indexer/ indexer/
RUN pip wheel --no-deps --no-cache-dir --disable-pip-version-check --wheel-dir /wheels .

# --- Python, the venv and the user, on Debian's slim Python image -------------------------------
FROM ${PYTHON_IMAGE} AS python-base
LABEL org.opencontainers.image.title="indexer" \
      org.opencontainers.image.description="Batch image embedding: timm -> Parquet shards -> FAISS"
ENV VIRTUAL_ENV=/opt/indexer \
    PATH=/opt/indexer/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/indexer \
 && useradd --create-home --uid 10001 --user-group indexer
WORKDIR /home/indexer

# --- slim: queries and `indexer serve` on the portable model (ONNX), no torch, no timm ---------
# the packages `make slim-check` installs, plus the service's; the package itself --no-deps
FROM python-base AS slim
ARG SLIM_PACKAGES="numpy pyarrow faiss-cpu pillow click tqdm onnxruntime starlette uvicorn httptools uvloop python-multipart"
RUN pip install ${SLIM_PACKAGES}
COPY --from=builder /wheels/ /tmp/wheels/
RUN pip install --no-deps /tmp/wheels/indexer-*.whl \
 && rm -rf /tmp/wheels \
 && if python -c "import torch" 2>/dev/null || python -c "import timm" 2>/dev/null; then \
      echo "torch or timm got into the slim image" >&2; exit 1; fi
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["indexer"]
CMD ["--help"]

# --- CUDA: Ubuntu's Python on NVIDIA's base image (the driver comes from the host) -------------
FROM ${CUDA_IMAGE} AS cuda-base
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
LABEL org.opencontainers.image.title="indexer" \
      org.opencontainers.image.description="Batch image embedding: timm -> Parquet shards -> FAISS"
ENV VIRTUAL_ENV=/opt/indexer \
    PATH=/opt/indexer/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/indexer \
 && useradd --create-home --uid 10001 --user-group indexer \
 && pip install --index-url ${TORCH_INDEX} torch torchvision
WORKDIR /home/indexer

# --- cuda: builds on GPUs; torch comes from PyTorch's CUDA index, pip keeps it ------------------
FROM cuda-base AS cuda
ARG EXTRAS=cloud
COPY --from=builder /wheels/ /tmp/wheels/
RUN pip install "$(echo /tmp/wheels/indexer-*.whl)${EXTRAS:+[$EXTRAS]}" \
 && rm -rf /tmp/wheels
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["indexer"]
CMD ["--help"]

# --- ray: the cuda image with indexer[ray] for jobs/kubernetes/rayjob.yaml (KubeRay) -----------
# KubeRay starts `ray` from a login shell (which may reset PATH) and probes with wget
FROM cuda-base AS ray
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/*
ARG EXTRAS=cloud,ray
COPY --from=builder /wheels/ /tmp/wheels/
RUN pip install "$(echo /tmp/wheels/indexer-*.whl)${EXTRAS:+[$EXTRAS]}" \
 && rm -rf /tmp/wheels \
 && ln -s /opt/indexer/bin/ray /opt/indexer/bin/indexer /usr/local/bin/
USER 10001:10001
ENTRYPOINT ["indexer"]
CMD ["--help"]

# --- cpu: builds and serving on CPUs; torch from PyTorch's CPU index (no CUDA libraries) -------
# last, so a plain `docker build .` builds it
FROM python-base AS cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url ${TORCH_INDEX} torch torchvision
ARG EXTRAS=cloud
COPY --from=builder /wheels/ /tmp/wheels/
RUN pip install "$(echo /tmp/wheels/indexer-*.whl)${EXTRAS:+[$EXTRAS]}" \
 && rm -rf /tmp/wheels
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["indexer"]
CMD ["--help"]
