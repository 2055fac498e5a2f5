"""/api/v1/jobs/{id}/models: the model kept after every megabatch, listed and chosen.

"Anytime" means a usable model after every megabatch: with ``export.keep_every_megabatch`` (on by
default) the worker stores each megabatch's sparse model and manifest as soon as they are written
and lists them in the job's model index (app_common.megabatch_models), so a running job's models
are listed too, and a failed or cancelled job keeps the ones it made. Download links are signed
like the job's artifacts (the store's presigned links, or this API's HMAC links).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from api.deps import OwnerDep, SecretDep, SettingsDep, StorageDep, StoreDep
from api.errors import ApiProblem, problem_responses, validation_problem
from api.links import DownloadLinks
from api.routes.jobs import owned_job
from api.schemas import ArtifactPublic
from app_common.megabatch_models import MegabatchModel, ModelIndex, best_model, read_model_index
from app_common.spec import FieldError
from app_common.storage import Storage, StorageError

log = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["models"])


class ModelPublic(BaseModel):
    """One kept model with its metrics and signed, expiring download links."""

    index: int = Field(description="The megabatch after which it was kept (1-based).")
    density: float = Field(description="Fraction of the prunable weights kept (measured).")
    target_density: float = Field(description="The schedule's density for this megabatch.")
    test_accuracy: float
    name: str = Field(description="The model file, relative to the run folder (megabatch-0003/...).")
    bytes: int
    sha256: str
    download_url: str = Field(description="Signed, expiring link to the model file; works without the API key.")
    expires_at: datetime
    files: list[ArtifactPublic] = Field(
        description="The model file and its manifest.json, each with a link: the manifest lets load_model "
        "rebuild the model from a folder holding both."
    )


class _Links(DownloadLinks):
    """The download links of a job's kept models."""

    def model(self, model: MegabatchModel) -> ModelPublic:
        files = [self.artifact(info) for info in model.files]
        own = next((f for f in files if f.name == model.name), None)
        url, expires_at = (own.download_url, own.expires_at) if own is not None else self(model.name)
        fields = model.model_dump(exclude={"files"})
        return ModelPublic(**fields, download_url=url, expires_at=expires_at, files=files)


def stored_models(storage: Storage, job_id: str) -> ModelIndex:
    """The job's model index; a store that cannot be read (or a damaged index) is a 503."""
    try:
        return read_model_index(storage, job_id)
    except (StorageError, ValueError) as exc:  # unreachable, or damaged (the next megabatch rewrites it)
        log.warning("job %s: could not read its model index: %s", job_id, exc)
        raise ApiProblem(503, "the object store is unavailable", slug="storage-unavailable",
                         headers={"Retry-After": "2"}) from None


@router.get(
    "/{job_id}/models",
    operation_id="job_models",
    response_model=list[ModelPublic],
    summary="The model kept after each megabatch, with metrics and download links",
    responses=problem_responses(401, 404, 503),
    description="Listed as soon as each is stored, while the job runs too; empty when the job keeps none "
    "(`export.keep_every_megabatch` false) or has finished no megabatch yet. Links are signed and expire "
    "(`expires_at`).",
)
def job_models(
    job_id: str,
    request: Request,
    owner: OwnerDep,
    store: StoreDep,
    storage: StorageDep,
    settings: SettingsDep,
    secret: SecretDep,
) -> list[ModelPublic]:
    owned_job(store, job_id, owner)
    links = _Links(request, storage, settings, secret, job_id)
    return [links.model(m) for m in stored_models(storage, job_id).models]


@router.get(
    "/{job_id}/models/best",
    operation_id="best_job_model",
    response_model=ModelPublic,
    summary="The kept model that suits a density or accuracy bound",
    responses=problem_responses(401, 404, 422, 503),
    description="`max_density`: the most accurate model with at most that density. `min_accuracy`: the sparsest "
    "model with at least that test accuracy. Both: the most accurate model within both. At least one is "
    "required; 404 `no-model-qualifies` when no kept model meets them.",
)
def best_job_model(
    job_id: str,
    request: Request,
    owner: OwnerDep,
    store: StoreDep,
    storage: StorageDep,
    settings: SettingsDep,
    secret: SecretDep,
    max_density: Annotated[float | None, Query(ge=0.0, le=1.0, description="Largest density accepted.")] = None,
    min_accuracy: Annotated[
        float | None, Query(ge=0.0, le=1.0, description="Smallest test accuracy accepted.")
    ] = None,
) -> ModelPublic:
    if max_density is None and min_accuracy is None:
        reason = "give max_density, min_accuracy or both"
        raise validation_problem([FieldError(field="max_density", reason=reason),
                                  FieldError(field="min_accuracy", reason=reason)])
    owned_job(store, job_id, owner)
    index = stored_models(storage, job_id)
    chosen = best_model(index.models, max_density=max_density, min_accuracy=min_accuracy)
    if chosen is None:
        bounds = " and ".join(b for b in (
            f"density at most {max_density}" if max_density is not None else "",
            f"test accuracy at least {min_accuracy}" if min_accuracy is not None else "",
        ) if b)
        # Densities are measured (kept weights / prunable weights): a target of 0.5 may give 0.50001.
        kept = (f" (the sparsest has density {min(m.density for m in index.models):.6g}, the most accurate "
                f"test accuracy {max(m.test_accuracy for m in index.models):.6g})") if index.models else ""
        raise ApiProblem(404, f"none of the {len(index.models)} kept models of job {job_id} has {bounds}{kept}",
                         slug="no-model-qualifies")
    return _Links(request, storage, settings, secret, job_id).model(chosen)
