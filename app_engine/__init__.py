"""The APP engine: anytime progressive pruning on a stream of megabatches (pure PyTorch).

Entry point: :func:`app_engine.runner.run`. The engine knows nothing of HTTP, Celery or Redis.
"""

__version__ = "0.1.0"
