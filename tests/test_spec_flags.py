"""The engine CLI's flags, generated from the job spec's fields (anytime_prune.spec_flags)."""

from __future__ import annotations

import argparse
from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field

from anytime_prune.cli import build_parser
from anytime_prune.engine_cli import add_spec_flags, spec_dict_from_args
from anytime_prune.spec_flags import FIELD_FLAGS, SPEC_FLAGS, spec_flags
from app_common.spec import JobSpec

# The flags users typed before the flags were generated: each must keep meaning the same field.
TODAYS_FLAGS = {
    "dataset.name": "--dataset", "dataset.path": "--data-path", "dataset.few_shot": "--few-shot",
    "dataset.image_size": "--image-size", "architecture": "--arch", "method": "--method",
    "sparsity.target": "--target-sparsity", "sparsity.tau": "--tau", "sparsity.pruner": "--pruner",
    "sparsity.scope": "--scope", "sparsity.score_fraction": "--score-fraction",
    "sparsity.score_source": "--score-source", "stream.megabatches": "--megabatches",
    "stream.megabatch_size": "--megabatch-size", "stream.replay": "--replay", "stream.buffer_size": "--buffer-size",
    "stream.val_fraction": "--val-fraction", "training.epochs": "--epochs", "training.batch_size": "--batch-size",
    "training.lr": "--lr", "training.momentum": "--momentum", "training.weight_decay": "--weight-decay",
    "training.milestones": "--milestones", "training.gamma": "--gamma", "training.warmup_epochs": "--warmup-epochs",
    "training.augment": "--augment", "training.precision": "--precision", "training.seed": "--seed",
    "training.device": "--device", "export.formats": "--export",
    # The issue names it: an uploaded dataset by its id.
    "dataset.id": "--dataset-id",
}


def leaf_fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name, info in model.model_fields.items():
        nested = [a for a in (info.annotation, *getattr(info.annotation, "__args__", ()))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        out |= leaf_fields(nested[0], f"{prefix}{name}.") if nested else {prefix + name}
    return out


def test_every_spec_field_has_a_flag() -> None:
    assert set(FIELD_FLAGS) == leaf_fields(JobSpec)
    for verb in ("run", "submit"):
        args = build_parser().parse_args([verb, "--out", "o"] if verb == "run" else [verb])
        assert {f.dest for f in SPEC_FLAGS} <= set(vars(args)), verb


def test_todays_flag_names_are_kept() -> None:
    for field, flag in TODAYS_FLAGS.items():
        assert FIELD_FLAGS[field] == flag


def test_submit_names_an_uploaded_dataset_with_or_without_its_format() -> None:
    from anytime_prune.engine_cli import build_spec

    dataset_id = "ab" * 16
    for extra, expected in (([], {"id": dataset_id}), (["--dataset", "npz"], {"name": "npz", "id": dataset_id})):
        args = build_parser().parse_args(["submit", "--dataset-id", dataset_id, *extra])
        data = spec_dict_from_args(args)
        assert data["dataset"] == expected
        spec = build_spec(data)  # valid as sent: the service fills in the name from the upload
        assert spec.dataset.id == dataset_id
    with pytest.raises(SystemExit, match=r"dataset.id \(--dataset-id\)"):
        build_spec(spec_dict_from_args(build_parser().parse_args(["submit", "--dataset-id", "not-hex"])))


def parser_for(compare: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_spec_flags(p, compare=compare)
    return p


def test_each_kind_parses_into_a_valid_spec() -> None:
    args = parser_for().parse_args([
        "--dataset", "synthetic", "--arch", "mlp", "--few-shot", "3", "--lr", "0.05", "--export", "safetensors, onnx",
        "--milestones", "20,40", "--epochs", "50", "--tau", "2", "--score-source", "cumulative",
    ])
    data = spec_dict_from_args(args)
    assert data == {
        "dataset": {"name": "synthetic", "few_shot": 3}, "architecture": "mlp",
        "sparsity": {"tau": 2.0, "score_source": "cumulative"},
        "training": {"lr": 0.05, "milestones": [20, 40], "epochs": 50}, "export": {"formats": ["safetensors", "onnx"]},
    }
    spec = JobSpec.from_dict(data)
    assert spec.training.milestones == [20, 40] and spec.export.formats == ["safetensors", "onnx"]
    # Flags not given stay None: the spec's defaults apply.
    assert parser_for().parse_args([]).batch_size is None


def test_bad_values_fail_with_the_flag_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parser_for().parse_args(["--milestones", "20,x"])
    assert "--milestones" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser_for().parse_args(["--epochs", "many"])


def test_compare_has_its_own_list_flags() -> None:
    args = build_parser().parse_args(["compare", "--methods", "app,osp", "--seeds", "1,2", "--megabatches", "4,8",
                                      "--epochs", "2", "--out", "x"])
    assert (args.methods, args.seeds, args.megabatches, args.epochs) == (["app", "osp"], [1, 2], [4, 8], 2)
    # compare varies these itself: no single-value flag for them.
    assert not {"method", "seed"} & set(vars(args))
    assert not {"method", "seed", "megabatches"} & set(vars(parser_for(compare=True).parse_args([])))


def test_help_shows_description_choices_default_and_field() -> None:
    helps = {f.field: f.help for f in SPEC_FLAGS}
    assert helps["training.epochs"] == "Epochs per megabatch; default 50 [training.epochs]"
    assert "one of app, osp, dense; default app" in helps["method"]
    assert "default safetensors,sparse" in helps["export.formats"]
    assert "40%% and 80%%" in helps["training.milestones"]  # escaped for argparse
    parser_for().format_help()  # renders


# --- a spec grown later: its new fields get flags with no change to the CLI ---------------------


class _Inner(BaseModel):
    carry: bool = Field(False, description="Keep it across megabatches.")
    sizes: list[int] | None = None
    mode: Literal["fast", "slow"] = "fast"
    level: Literal[1, 2, 3] = 2
    ratio: float = Field(0.5, description="How much (50% by default).")


class _Grown(BaseModel):
    inner: _Inner = Field(default_factory=_Inner)
    name: str | None = None


def test_new_fields_of_every_kind_get_flags() -> None:
    flags = {f.field: f for f in spec_flags(_Grown, aliases={"name": "job_name"})}
    assert {f: flag.option for f, flag in flags.items()} == {
        "inner.carry": "--carry", "inner.sizes": "--sizes", "inner.mode": "--mode", "inner.level": "--level",
        "inner.ratio": "--ratio", "name": "--job-name",
    }
    assert flags["inner.mode"].choices == ("fast", "slow") and flags["inner.level"].choices == (1, 2, 3)
    assert flags["inner.carry"].help == "Keep it across megabatches; default off [inner.carry]"

    p = argparse.ArgumentParser()
    group = p.add_argument_group("g")
    for flag in flags.values():
        flag.add_to(group)
    args = p.parse_args(["--no-carry", "--sizes", "1,2", "--level", "3", "--ratio", "0.25", "--job-name", "x"])
    assert (args.carry, args.sizes, args.level, args.ratio, args.job_name, args.mode) == (False, [1, 2], 3, 0.25,
                                                                                          "x", None)
    assert p.parse_args(["--carry"]).carry is True and p.parse_args([]).carry is None
    assert "(50%% by default)" not in p.format_help() and "(50% by default)" in p.format_help()


def test_clashing_names_unknown_types_and_stale_aliases_fail_loudly() -> None:
    class Clash(BaseModel):
        a: _Inner = Field(default_factory=_Inner)
        b: _Inner = Field(default_factory=_Inner)

    with pytest.raises(ValueError, match="a.carry and b.carry would both be --carry"):
        spec_flags(Clash, aliases={})

    class Odd(BaseModel):
        blob: dict[str, Any] = Field(default_factory=dict)

    with pytest.raises(TypeError, match="blob"):
        spec_flags(Odd, aliases={})
    with pytest.raises(ValueError, match="gone"):
        spec_flags(_Grown, aliases={"gone": "x"})
