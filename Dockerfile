# syntax=docker/dockerfile:1
# Two images from one file:
#   serve (default): the API and the worker - fastapi, onnxruntime, redis; NO torch.
#   train:           the offline trainer (torch CPU) that writes a bundle into /models.
# docker compose builds both (see docker-compose.yml).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md* ./
COPY app ./app
COPY training ./training

# -- training stage: torch (CPU build) + everything ---------------------------------------------
FROM base AS train
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[train,serve]"
VOLUME ["/models"]
CMD ["sh", "-c", "test -f /models/demo/manifest.json || synthehr train --preset demo --out /models/demo"]

# -- serving stage (last, so a plain `docker build .` gives it): only the serve extra ------------
FROM base AS serve
RUN pip install ".[serve]" \
    && useradd --system --no-create-home synthehr \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"
USER synthehr
ENV SYNTHEHR_BUNDLE=/models/demo \
    SYNTHEHR_JSON_LOGS=true
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"]
CMD ["synthehr", "serve", "--host", "0.0.0.0", "--port", "8000"]
