"""Download links of a job's files: the object store's presigned URL when it has them (the bytes
never pass through the API), else this API's HMAC-signed link to ``download_artifact`` (local
storage). One :class:`DownloadLinks` signs a whole listing at one time."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from urllib.parse import quote

from fastapi import Request

from api.deps import public_base
from api.schemas import ArtifactInfo, ArtifactPublic
from api.signing import signed_query
from app_common.settings import Settings
from app_common.storage import Storage, artifact_key


class DownloadLinks:
    def __init__(self, request: Request, storage: Storage, settings: Settings, secret: str, job_id: str):
        self.request, self.storage, self.secret, self.job_id = request, storage, secret, job_id
        self.base = public_base(request, settings)
        self.ttl = settings.download_url_ttl_s
        self.now = time.time()

    def __call__(self, name: str) -> tuple[str, datetime]:
        """The link to the job's file ``name`` (``megabatch-0003/...`` names included) and its expiry."""
        flat = name.replace("/", "-")  # the name a browser saves it under
        url = self.storage.presigned_get(artifact_key(self.job_id, name), expires_s=self.ttl, filename=flat)
        expires = int(self.now) + self.ttl
        if url is None:
            query, expires = signed_query(self.secret, self.job_id, name, self.ttl, now=self.now)
            path = self.request.app.url_path_for("download_artifact", job_id=self.job_id, name=quote(name, safe="/"))
            url = f"{self.base}{path}?{query}"
        return url, datetime.fromtimestamp(expires, UTC)

    def artifact(self, info: ArtifactInfo) -> ArtifactPublic:
        url, expires_at = self(info.name)
        return ArtifactPublic(**info.model_dump(), download_url=url, expires_at=expires_at)
