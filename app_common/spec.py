"""The job spec: the one schema for what a user asks the engine to do.

The HTTP API validates request bodies with these models (and publishes them in its OpenAPI
document); the command line builds them from flags or reads them from a JSON file; the engine
takes a validated :class:`JobSpec` as its configuration. Defaults live here and nowhere else.

The names in the ``Literal`` types are the registry keys of the engine (a test checks that the
engine's registries and these lists agree), so the spec can be validated without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DatasetName = Literal["digits", "cifar10", "cifar100", "imagefolder", "npz", "synthetic"]
ArchitectureName = Literal[
    "mlp", "cnn_small", "resnet20", "resnet20_a", "resnet32", "resnet56", "resnet18", "resnet34", "resnet50",
    "vgg16_bn", "resnet18_imagenet", "resnet50_imagenet",
]
MethodName = Literal["app", "osp", "dense"]
PrunerName = Literal["snip", "magnitude", "random", "grasp", "synflow"]
ScopeName = Literal["global", "local"]
ReplayName = Literal["full", "none", "previous", "buffer"]
PrecisionName = Literal["auto", "fp32", "bf16"]
DeviceName = Literal["auto", "cpu", "cuda"]
ExportFormat = Literal["safetensors", "sparse", "onnx"]
AugmentName = Literal["auto", "none", "crop", "crop_flip"]
ScoreSource = Literal["current", "cumulative", "first"]

# The same names as tuples, derived from the types above (one list each, in wire order).
DATASETS: tuple[str, ...] = get_args(DatasetName)
ARCHITECTURES: tuple[str, ...] = get_args(ArchitectureName)
METHODS: tuple[str, ...] = get_args(MethodName)
PRUNERS: tuple[str, ...] = get_args(PrunerName)
SCOPES: tuple[str, ...] = get_args(ScopeName)
REPLAYS: tuple[str, ...] = get_args(ReplayName)
PRECISIONS: tuple[str, ...] = get_args(PrecisionName)
DEVICES: tuple[str, ...] = get_args(DeviceName)
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)
AUGMENTATIONS: tuple[str, ...] = get_args(AugmentName)
SCORE_SOURCES: tuple[str, ...] = get_args(ScoreSource)
# Datasets that read files and therefore need ``dataset.path`` (or ``dataset.id``: an upload).
DATASETS_WITH_PATH = ("cifar10", "cifar100", "imagefolder", "npz")
# Uploaded datasets' ids (app_common.datasets) are uuid4 hex.
DATASET_ID_PATTERN = r"^[0-9a-f]{32}$"

# The paper's schedule keeps 0.8 ** s of the prunable weights at sparsity level s.
KEEP_BASE = 0.8
DEFAULT_TAU = 4.5


def tau_from_sparsity(target_sparsity: float) -> float:
    """The paper's sparsity level tau for a fraction ``target_sparsity`` of weights removed."""
    return math.log(1.0 - target_sparsity) / math.log(KEEP_BASE)


def sparsity_from_tau(tau: float) -> float:
    return 1.0 - float(KEEP_BASE**tau)


class _Strict(BaseModel):
    # strict: "3", true and 3.0 are not integers, nor "0.1" a number (the schema says so); specs
    # are built from JSON or typed Python values (the CLI's flags parse to their types first).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DatasetSpec(_Strict):
    # As in SparsitySpec: path and id are never both given (a null counts as absent).
    model_config = ConfigDict(json_schema_extra={"not": {
        "required": ["path", "id"],
        "properties": {"path": {"type": "string"}, "id": {"type": "string"}},
    }})

    name: DatasetName = Field("digits", description="Registry name of the dataset.")
    path: str | None = Field(
        None,
        description="File or folder under the server's data folder (cifar10, cifar100, imagefolder, npz "
        "need it or dataset.id).",
        max_length=4096,
    )
    id: str | None = Field(
        None,
        pattern=DATASET_ID_PATTERN,
        description="An uploaded dataset (POST /api/v1/datasets) instead of a path; name defaults to its format.",
    )
    few_shot: int | None = Field(
        None, ge=1, le=100_000, description="Keep only this many training samples per class (seeded)."
    )
    image_size: int = Field(32, ge=8, le=512, description="Side length images are resized to (imagefolder).")
    synthetic_samples: int = Field(
        2000, ge=20, le=200_000, description="Training samples of the synthetic dataset (tests, demos)."
    )

    @model_validator(mode="after")
    def _path_needed(self) -> DatasetSpec:
        if self.path is not None and self.id is not None:
            raise ValueError("give either dataset.path or dataset.id, not both")
        if self.id is not None:
            # Without a name the service fills in the upload's format, so only a given one is checked.
            if "name" in self.model_fields_set and self.name not in DATASETS_WITH_PATH:
                raise ValueError(
                    f"dataset.name '{self.name}' reads no files: an uploaded dataset is one of "
                    f"{', '.join(DATASETS_WITH_PATH)}"
                )
        elif self.name in DATASETS_WITH_PATH and not self.path:
            raise ValueError(f"dataset '{self.name}' reads files: dataset.path or dataset.id is required")
        return self


class SparsitySpec(_Strict):
    # The schema says what the validator below enforces: target and tau are never both numbers
    # (a null counts as absent, so a job's stored spec, which has both keys, is valid).
    model_config = ConfigDict(json_schema_extra={"not": {
        "required": ["target", "tau"],
        "properties": {"target": {"type": "number"}, "tau": {"type": "number"}},
    }})

    target: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="Target sparsity: fraction of prunable weights removed at the end of the stream.",
    )
    tau: float | None = Field(
        None, ge=0.0, le=100.0, description="The paper's sparsity level: density 0.8**tau at the end."
    )
    pruner: PrunerName = "snip"
    scope: ScopeName = "global"
    score_fraction: float = Field(
        0.2, gt=0.0, le=1.0, description="Share of a megabatch's size used to score weights."
    )
    score_source: ScoreSource = Field(
        "current",
        description="Samples the pruner scores on: 'current' (the first k of the current megabatch), "
        "'cumulative' (a seeded sample of k of all data seen so far) or 'first' (the first k of megabatch 1 "
        "at every pruning step, the reference's choice); k = score_fraction * megabatch size.",
    )
    score_batch_size: int | None = Field(
        None,
        ge=1,
        le=65_536,
        description="Batch size of the scoring passes (default: training.batch_size; the reference used 100).",
    )

    @model_validator(mode="after")
    def _one_target(self) -> SparsitySpec:
        if self.target is not None and self.tau is not None:
            raise ValueError("give either sparsity.target or sparsity.tau, not both")
        return self

    @property
    def resolved_tau(self) -> float:
        if self.tau is not None:
            return self.tau
        if self.target is not None:
            return tau_from_sparsity(self.target) if self.target > 0 else 0.0
        return DEFAULT_TAU

    @property
    def target_density(self) -> float:
        if self.target is not None:
            return 1.0 - self.target
        return float(KEEP_BASE**self.resolved_tau)


class StreamSpec(_Strict):
    megabatches: int = Field(8, ge=1, le=1000, description="Stream length N.")
    megabatch_size: int | None = Field(
        None, ge=2, description="Samples per megabatch (default: the training pool divided by N)."
    )
    replay: ReplayName = "full"
    buffer_size: int = Field(2000, ge=1, le=10_000_000, description="Reservoir size for replay 'buffer'.")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of each megabatch held out for validation.")


class TrainingSpec(_Strict):
    epochs: int = Field(50, ge=1, le=10_000, description="Epochs per megabatch.")
    batch_size: int = Field(64, ge=1, le=65_536)
    lr: float = Field(0.1, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    milestones: list[int] | None = Field(
        None, description="Epochs at which the LR is multiplied by gamma (default: 40% and 80% of epochs)."
    )
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    warmup_epochs: int = Field(0, ge=0, le=1000)
    augment: AugmentName = Field("auto", description="auto: crop+flip for CIFAR and image folders, none otherwise.")
    precision: PrecisionName = Field(
        "auto",
        description="auto: bf16 autocast on CUDA GPUs with bf16 and on CPUs with native bf16 (AVX512-BF16 or AMX), "
        "fp32 otherwise. Use fp32 to replicate the paper's numbers.",
    )
    momentum_carry: bool = Field(
        False,
        description="Keep the SGD momentum from one megabatch to the next, as the reference does "
        "(default: a fresh optimizer each megabatch).",
    )
    decay_norms_and_biases: bool = Field(
        False,
        description="Apply weight decay to every parameter, as the reference does "
        "(default: biases and normalisation parameters are exempt).",
    )
    seed: int = Field(1, ge=0, le=2**31 - 1)
    device: DeviceName = "auto"

    @model_validator(mode="after")
    def _check(self) -> TrainingSpec:
        if self.milestones is not None:
            if any(m < 1 for m in self.milestones):
                raise ValueError("training.milestones must be positive epoch numbers")
            if list(self.milestones) != sorted(set(self.milestones)):
                raise ValueError("training.milestones must be strictly increasing")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ValueError("training.warmup_epochs must be smaller than training.epochs")
        return self

    @property
    def resolved_milestones(self) -> list[int]:
        if self.milestones is not None:
            return list(self.milestones)
        return sorted({max(1, round(self.epochs * 0.4)), max(1, round(self.epochs * 0.8))})


def _default_formats() -> list[ExportFormat]:
    return ["safetensors", "sparse"]


class ExportSpec(_Strict):
    formats: list[ExportFormat] = Field(default_factory=_default_formats)
    keep_every_megabatch: bool = Field(
        True,
        description="Keep the sparse model of every megabatch (megabatch-0003/model.sparse.safetensors and its "
        "manifest), not only the final one.",
    )


class JobSpec(_Strict):
    """Everything that defines a run. Two equal specs give the same run (same seed, same data)."""

    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    architecture: ArchitectureName = "cnn_small"
    method: MethodName = "app"
    sparsity: SparsitySpec = Field(default_factory=SparsitySpec)
    stream: StreamSpec = Field(default_factory=StreamSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self, length: int = 16) -> str:
        """A stable hash of the spec (hex, ``length`` digits of its sha256): the engine refuses to
        resume a different run into a folder, the API matches Idempotency-Key retries with it."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:length]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        """Validate ``data``; raises :class:`SpecError` naming every bad field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SpecError.from_validation(exc) from None


class FieldError(BaseModel):
    """One bad field and why (listed by SpecError and by the API's problem documents)."""

    field: str = Field(description="Dotted path of the bad field, e.g. sparsity.target.")
    reason: str


class SpecError(ValueError):
    """An invalid job spec. ``errors`` lists each bad field with the reason."""

    def __init__(self, errors: list[FieldError]):
        self.errors = errors
        super().__init__("; ".join(f"{e.field}: {e.reason}" for e in errors))

    @classmethod
    def from_validation(cls, exc: ValidationError) -> SpecError:
        return cls(field_errors(exc.errors()))


# Where a FastAPI request error happened: the first item of its location.
_REQUEST_PARTS = frozenset({"body", "query", "path", "header", "cookie"})
_DOTTED = re.compile(r"\b([a-z_]+(?:\.[a-z_]+)+)\b")


def field_errors(errors: Iterable[Mapping[str, Any]], *, request: bool = False) -> list[FieldError]:
    """Flatten pydantic errors (``ValidationError.errors()``) into dotted field names and reasons.

    A spec's error at ``("sparsity", "target")`` is ``sparsity.target``; a model-level validator
    reports on the model (``sparsity``) with a reason that names the field.

    With ``request``, the locations are FastAPI's, starting with where in the request:
    ``("body", "sparsity", "target")`` -> ``sparsity.target``; ``("query", "limit")`` -> ``limit``;
    a JSON syntax error ``("body", 12)`` -> ``body``. A model-level error in the body names the
    first dotted field in its message below the model ("give either sparsity.target or
    sparsity.tau" -> ``sparsity.target``), which tells an API client which field to fix.
    """
    out = []
    for err in errors:
        loc = tuple(err.get("loc", ()))
        kind = str(err.get("type", ""))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if request:
            field = _request_field(loc, msg, kind)
        else:
            field = ".".join(str(p) for p in loc) or "body"
        out.append(FieldError(field=field, reason=_reason(loc, msg, kind, err.get("ctx"))))
    return out


def _request_field(loc: tuple[Any, ...], message: str, kind: str) -> str:
    if not loc or kind == "json_invalid" or str(loc[0]) not in _REQUEST_PARTS:
        return "body"
    where, rest = str(loc[0]), [str(p) for p in loc[1:]]
    dotted = ".".join(rest)
    if where != "body":
        return dotted or where
    for candidate in _DOTTED.findall(message):
        if not dotted or candidate.startswith(dotted + "."):
            return str(candidate)
    return dotted or "body"


def _reason(loc: tuple[Any, ...], msg: str, kind: str, ctx: Any) -> str:
    if kind == "json_invalid":
        return f"malformed JSON: {(ctx or {}).get('error', msg)}"
    if kind == "missing" and loc == ("body",):
        return "a JSON object is required"
    return msg
