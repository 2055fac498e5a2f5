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

# Dependencies first, resolved from pyproject.toml alone (the project built without its code), so
# this layer is rebuilt only when the dependencies change.
COPY pyproject.toml README.md ./
RUN pip install ".[api,s3]" && pip uninstall --yes anytime-prune

# The torch-free packages, installed normally with the api and s3 extras. The build fails if torch or
# numpy got into the image, or if the API or the CLI client pulls the engine in on import.
COPY app_common ./app_common
COPY api ./api
COPY anytime_prune ./anytime_prune
RUN pip install ".[api,s3]" \
    && python -c "import importlib.util as u; bad = [m for m in ('torch', 'numpy') if u.find_spec(m)]; assert not bad, bad" \
    && python -c "import api.main, anytime_prune.cli, sys; assert 'torch' not in sys.modules" \
    && python -c "import boto3, app_common.storage.s3" \
    && useradd --create-home --uid 10001 app \
    && mkdir -p /data/work /data/storage /data/datasets \
    && chown -R app:app /data

USER app
# Local folders (with APP_STORAGE_URL=s3://... the API keeps no files; without it, storage is
# the local object store of a one-host setup).
ENV APP_ARTIFACTS_DIR=/data/work \
    APP_STORAGE_DIR=/data/storage \
    APP_DATA_DIR=/data/datasets
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
# Behind a reverse proxy, X-Forwarded-* set the scheme and host of the download links (or set
# APP_PUBLIC_BASE_URL).
CMD ["anytime-prune", "api", "--host", "0.0.0.0", "--port", "8000", "--forwarded-allow-ips", "*"]
