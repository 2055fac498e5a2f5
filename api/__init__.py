"""The HTTP API of the APP training service (FastAPI). Torch-free: it never imports torch, numpy,
``app_engine`` or ``worker``; jobs are queued by task name. Entry point: :func:`api.main.create_app`."""
