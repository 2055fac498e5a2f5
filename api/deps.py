"""Dependencies: the settings, store, object storage and queue built once in :func:`api.main.create_app` and kept
on ``app.state``, and the caller's identity from the bearer key."""

from __future__ import annotations

from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.errors import ApiProblem
from app_common.settings import Settings
from app_common.storage import Storage
from app_common.store import JobStore

# The owner of every job when authentication is switched off (a laptop, CI).
ANONYMOUS = "anonymous"

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key created with `anytime-prune keys create`, sent as `Authorization: Bearer <key>`.",
)


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_store(request: Request) -> JobStore:
    store: JobStore = request.app.state.store
    return store


def get_celery(request: Request) -> Celery:
    celery_app: Celery = request.app.state.celery
    return celery_app


def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


def get_signing_secret(request: Request) -> str:
    secret: str = request.app.state.signing_secret
    return secret


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
SecretDep = Annotated[str, Depends(get_signing_secret)]
StorageDep = Annotated[Storage, Depends(get_storage)]


def get_owner(
    settings: SettingsDep,
    store: StoreDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The key id of the caller; 401 without a valid key (unless auth is disabled)."""
    if not settings.auth_enabled:
        return ANONYMOUS
    challenge = {"WWW-Authenticate": 'Bearer realm="anytime-prune"'}
    if credentials is None or not credentials.credentials:
        raise ApiProblem(401, "an API key is required: Authorization: Bearer <key>", slug="unauthorized",
                         headers=challenge)
    owner = store.owner_for_secret(credentials.credentials) if len(credentials.credentials) <= 512 else None
    if owner is None:
        challenge["WWW-Authenticate"] += ', error="invalid_token"'
        raise ApiProblem(401, "unknown or revoked API key", slug="unauthorized", headers=challenge)
    return owner


OwnerDep = Annotated[str, Depends(get_owner)]


def public_base(request: Request, settings: Settings) -> str:
    """The scheme and host of absolute links: ``APP_PUBLIC_BASE_URL``, else the request's own."""
    return settings.public_base_url or str(request.base_url).rstrip("/")
