"""The dataset record: an uploaded dataset as the store keeps it, typed.

A dataset is created by an API key (its owner; no other key ever sees it), uploaded once, then
validated off the training queue by the control worker:

    uploading -> validating -> ready | invalid

``uploading`` takes the bytes (a streamed PUT through the API, or a presigned POST to the store
followed by ``complete``); ``validating`` waits for the control worker, which unpacks the file
with the engine's loaders and records ``ready`` with :class:`DatasetInfo` or ``invalid`` with the
reason. Jobs may name only a ``ready`` dataset. The API's public schema is derived from
:class:`DatasetState` (``api.schemas.DatasetPublic`` adds links and upload targets).
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from app_common.jobs import Timestamp
from app_common.spec import DATASET_ID_PATTERN, DATASETS_WITH_PATH

DatasetStatus = Literal["uploading", "validating", "ready", "invalid"]
DATASET_STATUSES: tuple[str, ...] = get_args(DatasetStatus)
UPLOADING, VALIDATING, READY, INVALID = DATASET_STATUSES

# The loaders' registry names of the datasets that read files.
DatasetFormat = Literal["npz", "cifar10", "cifar100", "imagefolder"]
DATASET_FORMATS: tuple[str, ...] = get_args(DatasetFormat)
if set(DATASET_FORMATS) != set(DATASETS_WITH_PATH):  # one list of file datasets, checked at import
    raise RuntimeError("app_common.datasets.DatasetFormat and app_common.spec.DATASETS_WITH_PATH disagree")

SHA256_PATTERN = r"^[0-9a-f]{64}$"
_DATASET_ID = re.compile(DATASET_ID_PATTERN)


def is_dataset_id(value: str) -> bool:
    return bool(_DATASET_ID.match(value))


class DatasetInfo(BaseModel):
    """What validation found in a ``ready`` dataset (the engine loader's view of it)."""

    model_config = ConfigDict(frozen=True)

    train_samples: int = Field(ge=0)
    test_samples: int = Field(ge=0)
    num_classes: int = Field(ge=1)
    classes: list[str]
    input_shape: list[int] = Field(description="Shape of one sample, e.g. [3, 32, 32].")


class DatasetState(BaseModel):
    """A dataset without its owner: what the API shows and the store keeps."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(pattern=DATASET_ID_PATTERN)
    name: str = Field(min_length=1, max_length=200, description="A label for people; not unique.")
    format: DatasetFormat = Field(description="The loader that reads it (its registry name).")
    status: DatasetStatus
    sha256: str = Field(pattern=SHA256_PATTERN, description="Of the uploaded file, as declared at creation.")
    bytes: int = Field(ge=1, description="Size of the uploaded file, as declared at creation.")
    created_at: Timestamp
    updated_at: Timestamp
    error: str | None = Field(description="Why the dataset is invalid; null otherwise.")
    info: DatasetInfo | None = Field(description="What validation found; null until ready.")


class DatasetRecord(DatasetState):
    """A dataset as stored: each field is one field of the Redis hash of the dataset."""

    owner: str


# The hash fields, in the model's order (the store reads and writes exactly these).
DATASET_FIELDS: tuple[str, ...] = tuple(DatasetRecord.model_fields)
