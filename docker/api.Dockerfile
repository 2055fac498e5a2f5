# syntax=docker/dockerfile:1
# The HTTP API: FastAPI + uvicorn, no torch (the API sends jobs to workers by task name and never
# imports the engine), so the image is small and starts in a second.
#   docker build -f docker/api.Dockerfile -t anytime-prune-api .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first: this layer is rebuilt only when the list changes.
COPY docker/requirements-api.txt /tmp/requirements-api.txt
RUN pip install -r /tmp/requirements-api.txt

# Only the torch-free packages. --no-deps: the project's core dependencies include torch, which
# this image must not have; the list above is what the API needs.
COPY pyproject.toml README.md ./
COPY app_common ./app_common
COPY api ./api
COPY anytime_prune ./anytime_prune
RUN pip install --no-deps . \
    && python -c "import api.main, anytime_prune.cli, sys; assert 'torch' not in sys.modules" \
    && useradd --create-home --uid 10001 app \
    && mkdir -p /data/artifacts /data/datasets \
    && chown -R app:app /data

USER app
ENV APP_ARTIFACTS_DIR=/data/artifacts \
    APP_DATA_DIR=/data/datasets
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
# Behind a reverse proxy, X-Forwarded-* set the scheme and host of the download links (or set
# APP_PUBLIC_BASE_URL).
CMD ["anytime-prune", "api", "--host", "0.0.0.0", "--port", "8000", "--forwarded-allow-ips", "*"]
