"""The model kept after every megabatch: its names in a run folder and in the object store.

With ``export.keep_every_megabatch`` (the default) the engine writes, after megabatch ``t``::

    megabatch-0003/model.sparse.safetensors   the sparse model (app_engine.sparse's format)
    megabatch-0003/manifest.json              its manifest: model info, that megabatch's metrics,
                                              density, the file's size and sha256

so ``load_model(run_dir / "megabatch-0003")`` (or ``load_model(run_dir, megabatch=3)``) rebuilds it.
Names are relative to the run folder, four digits at least (like the checkpoints). The worker
uploads both files as artifacts as soon as they are written, then rewrites the job's model index
(a :class:`ModelIndex` at ``app_common.storage.models_index_key``, read by
:func:`read_model_index`): the API lists the models of a running job from it.
Torch-free: the worker and the API share it (the engine spells the same names in app_engine.loading).
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app_common.jobs import ArtifactInfo
from app_common.storage import Storage, models_index_key

MODEL_NAME = "model.sparse.safetensors"
MANIFEST_NAME = "manifest.json"
FOLDER_PREFIX = "megabatch-"
# A megabatch's folder and the two files in it; nothing else (no "..", no hidden file) matches.
_ARTIFACT = re.compile(r"^megabatch-([0-9]{4,7})/(model\.sparse\.safetensors|manifest\.json)$")


def megabatch_folder(index: int) -> str:
    """``megabatch-0003`` for megabatch 3 (1-based)."""
    if index < 1:
        raise ValueError(f"megabatch index must be at least 1, got {index}")
    return f"{FOLDER_PREFIX}{index:04d}"


def model_name(index: int) -> str:
    """The kept model of megabatch ``index``, relative to the run folder."""
    return f"{megabatch_folder(index)}/{MODEL_NAME}"


def manifest_name(index: int) -> str:
    return f"{megabatch_folder(index)}/{MANIFEST_NAME}"


def megabatch_of(name: str) -> int | None:
    """The megabatch a kept file belongs to (``megabatch-0003/manifest.json`` -> 3), or None when
    ``name`` is not one of a megabatch's files."""
    match = _ARTIFACT.match(name)
    return int(match[1]) if match else None


def folder_index(folder: str) -> int | None:
    """``megabatch-0003`` -> 3; None for any other name."""
    match = re.fullmatch(r"megabatch-([0-9]{4,7})", folder)
    return int(match[1]) if match else None


class MegabatchModel(BaseModel):
    """One kept model: its metrics, the model file and every file written for it."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(ge=1, description="The megabatch (1-based).")
    density: float = Field(description="Fraction of the prunable weights kept (measured).")
    target_density: float = Field(description="The schedule's density for this megabatch.")
    test_accuracy: float
    name: str = Field(description="The model file, relative to the run folder.")
    bytes: int
    sha256: str
    files: list[ArtifactInfo] = Field(description="The model file and its manifest.")


class ModelIndex(BaseModel):
    """The store's list of a job's kept models (written by the worker after each upload)."""

    models: list[MegabatchModel] = Field(default_factory=list)

    def with_model(self, model: MegabatchModel) -> ModelIndex:
        """This index with ``model`` in place of any entry of its megabatch or a later one (a
        resumed run redoes the megabatches after its checkpoint)."""
        kept = [m for m in self.models if m.index < model.index]
        return ModelIndex(models=[*kept, model])

    def file(self, name: str) -> ArtifactInfo | None:
        """The kept file called ``name`` (a model or a manifest), if listed."""
        for model in self.models:
            for info in model.files:
                if info.name == name:
                    return info
        return None


# A pruner keeps a whole number of weights (per layer, with a layer-wise scope), so the measured
# density of a model pruned to 0.5 may be 0.50004: within this of its target, a model counts as
# having its target density when compared with a bound.
ROUNDING_TOLERANCE = 1e-3


def _density_for_bounds(model: MegabatchModel) -> float:
    if model.target_density < model.density <= model.target_density + ROUNDING_TOLERANCE:
        return model.target_density
    return model.density


def best_model(
    models: list[MegabatchModel], *, max_density: float | None = None, min_accuracy: float | None = None
) -> MegabatchModel | None:
    """The model to take from a run: with ``max_density``, the most accurate model whose density is
    at most that; with ``min_accuracy``, the sparsest whose test accuracy is at least that; with
    both, the most accurate of those within both bounds. Ties go to the sparser, then to the later
    megabatch. None when no model qualifies; at least one bound is required. A density above the
    schedule's target by rounding only (:data:`ROUNDING_TOLERANCE`) counts as the target."""
    if max_density is None and min_accuracy is None:
        raise ValueError("give max_density, min_accuracy or both")
    fits = [m for m in models if (max_density is None or _density_for_bounds(m) <= max_density)
            and (min_accuracy is None or m.test_accuracy >= min_accuracy)]
    if not fits:
        return None
    if max_density is not None:
        return max(fits, key=lambda m: (m.test_accuracy, -m.density, m.index))
    return max(fits, key=lambda m: (-m.density, m.test_accuracy, m.index))


def read_model_index(storage: Storage, job_id: str) -> ModelIndex:
    """The job's kept models as the store lists them (empty when it lists none yet). Raises
    :class:`~app_common.storage.StorageError` when the store cannot be read, ``ValueError`` when
    the index is damaged."""
    try:
        raw = b"".join(storage.iter_chunks(models_index_key(job_id)))
    except KeyError:  # ObjectNotFound: no model kept yet
        return ModelIndex()
    try:
        return ModelIndex.model_validate_json(raw)
    except ValidationError as exc:
        raise ValueError(f"job {job_id}: the stored model index is unreadable ({exc.error_count()} errors)") from None
