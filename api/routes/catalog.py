"""/api/v1/catalog: the names and limits this server accepts in a job spec."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import SettingsDep
from api.schemas import Catalog, Limits
from app_common import spec as S

router = APIRouter(tags=["catalog"])


@router.get("/catalog", operation_id="catalog", response_model=Catalog, summary="What a job spec may name")
@router.head("/catalog", include_in_schema=False)  # GET without the body (see api.routes.health)
def catalog(settings: SettingsDep) -> Catalog:
    devices = [d for d in S.DEVICES if settings.queue_for_device(d) is not None]
    return Catalog(
        datasets=list(S.DATASETS),
        datasets_with_path=list(S.DATASETS_WITH_PATH),
        architectures=list(S.ARCHITECTURES),
        methods=list(S.METHODS),
        pruners=list(S.PRUNERS),
        scopes=list(S.SCOPES),
        replays=list(S.REPLAYS),
        precisions=list(S.PRECISIONS),
        devices=devices,
        export_formats=list(S.EXPORT_FORMATS),
        augmentations=list(S.AUGMENTATIONS),
        queues=list(settings.queues),
        limits=Limits(
            max_epochs=settings.max_epochs,
            max_megabatches=settings.max_megabatches,
            max_concurrent_jobs_per_key=settings.max_concurrent_jobs_per_key,
            max_body_bytes=settings.max_body_bytes,
            download_url_ttl_s=settings.download_url_ttl_s,
            max_dataset_bytes=settings.max_dataset_bytes,
        ),
    )
