# syntax=docker/dockerfile:1
# A worker: Celery + the APP engine on a CUDA PyTorch base. One worker runs one job at a time:
# run one container per GPU (docker compose gives each a GPU reservation). The same image runs
# the control worker, so it has the extras of both: webhooks (the control worker signs and sends
# the jobs' webhooks) and mlflow (training workers log each job to MLFLOW_TRACKING_URI when set).
#   docker build -f docker/worker.Dockerfile -t anytime-prune-worker .
# The base's torch (CUDA 12.4 build) satisfies the project's torch range and is kept as it is.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY app_common ./app_common
COPY app_engine ./app_engine
COPY worker ./worker
COPY anytime_prune ./anytime_prune
# Pin torch to the version already installed, so resolving the project's dependencies can never
# replace the CUDA build with a CPU wheel from PyPI.
RUN python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > /tmp/keep-torch.txt \
    && pip install --constraint /tmp/keep-torch.txt ".[worker,s3,webhooks,mlflow]" \
    && python -c "import torch, worker.celery_app, app_engine.runner; print('torch', torch.__version__)" \
    && python -c "import boto3, app_common.storage.s3" \
    && python -c "import standardwebhooks, worker.courier, mlflow" \
    && useradd --create-home --uid 10001 app \
    && mkdir -p /data/work /data/cache /data/storage /data/datasets \
    && chown -R app:app /data

# The same uid as the API image. A worker needs only REDIS_URL and the storage settings
# (APP_STORAGE_URL, AWS_*): its folders below are its own, on any host.
USER app
ENV APP_ARTIFACTS_DIR=/data/work \
    APP_CACHE_DIR=/data/cache \
    APP_STORAGE_DIR=/data/storage \
    APP_DATA_DIR=/data/datasets
# One worker process per GPU the container is given (docker run --gpus all ...): pinned, named
# gpu<i>@host, restarted if one dies.
CMD ["anytime-prune", "worker", "--queue", "gpu", "--gpus", "all"]
