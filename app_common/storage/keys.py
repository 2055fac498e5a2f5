"""Where each kind of file lives in the object store (the only place keys are spelled)."""

from __future__ import annotations


def dataset_key(dataset_id: str) -> str:
    """The uploaded file of a dataset, exactly as the client sent it."""
    return f"datasets/{dataset_id}/content"


def job_prefix(job_id: str) -> str:
    """Everything of one job (deleted with the job)."""
    return f"jobs/{job_id}/"


def job_work_prefix(job_id: str) -> str:
    """The engine's run folder mirrored: checkpoints and their commit record, so that a worker
    on any host resumes the job."""
    return f"jobs/{job_id}/work/"


def artifact_key(job_id: str, name: str) -> str:
    """One exported file of a job: ``name`` is a plain file name, or a megabatch's kept file
    (``megabatch-0003/model.sparse.safetensors``, see app_common.megabatch_models)."""
    return f"jobs/{job_id}/artifacts/{name}"


def models_index_key(job_id: str) -> str:
    """The list of a job's kept megabatch models (app_common.megabatch_models.ModelIndex)."""
    return f"jobs/{job_id}/models.json"
