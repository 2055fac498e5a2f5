"""Command-line flags generated from the job spec's fields.

Every leaf of :class:`~app_common.spec.JobSpec` (nested models flattened to dotted names) becomes
one flag named after the leaf (``training.batch_size`` -> ``--batch-size``), except the few in
:data:`ALIASES`, whose names users already type. A field added to the spec gets its flag, type,
choices and help text (the field's description and default) with no change here.

Flags only override: each defaults to None, and the spec (not argparse) validates the values,
so that every bad field is reported at once, named by field and flag.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from app_common.spec import JobSpec

# Dotted field -> the flag's name (without dashes) where it is not the field's leaf name.
ALIASES: dict[str, str] = {
    "dataset.name": "dataset",
    "dataset.path": "data_path",
    "dataset.id": "dataset_id",
    "architecture": "arch",
    "sparsity.target": "target_sparsity",
    "export.formats": "export",
}


@dataclass(frozen=True)
class SpecFlag:
    """One flag: ``field`` the dotted spec field it sets, ``dest`` its argparse name."""

    field: str
    dest: str
    kind: Literal["value", "list", "bool"]
    type: Callable[[str], Any] | None
    choices: tuple[Any, ...]
    help: str

    @property
    def option(self) -> str:
        return "--" + self.dest.replace("_", "-")

    def add_to(self, group: argparse._ArgumentGroup) -> None:
        if self.kind == "bool":
            group.add_argument(self.option, dest=self.dest, action=argparse.BooleanOptionalAction, default=None,
                               help=self.help)
        else:
            metavar = "A,B,..." if self.kind == "list" else None
            group.add_argument(self.option, dest=self.dest, type=self.type or str, default=None, metavar=metavar,
                               help=self.help)


def comma_list(item: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """An argparse type: ``"20,40"`` -> ``[20, 40]`` (spaces and empty items ignored)."""

    def parse(text: str) -> list[Any]:
        try:
            return [item(v) for v in text.replace(" ", "").split(",") if v]
        except ValueError:
            what = "integers" if item is int else "numbers" if item is float else "values"
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None

    parse.__name__ = f"comma-separated {getattr(item, '__name__', 'value')}"
    return parse


def _unwrap_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _scalar(annotation: Any, field: str) -> tuple[Callable[[str], Any] | None, tuple[Any, ...]]:
    """(argparse type, choices) of a scalar annotation."""
    if get_origin(annotation) is Literal:
        choices = get_args(annotation)
        kinds = {type(c) for c in choices}
        if len(kinds) != 1:
            raise TypeError(f"{field}: a Literal of mixed types has no flag type")
        return (None if kinds == {str} else kinds.pop()), choices
    if annotation in (int, float):
        return annotation, ()
    if annotation is str:
        return None, ()
    raise TypeError(f"{field}: no flag type for {annotation!r}; extend anytime_prune.spec_flags")


def _help(field: str, info: FieldInfo, choices: tuple[Any, ...], kind: str) -> str:
    parts = [info.description.rstrip(".")] if info.description else []
    if choices:
        parts.append("one of " + ", ".join(str(c) for c in choices))
    default = info.get_default(call_default_factory=True)
    if kind == "bool":
        parts.append(f"default {'on' if default else 'off'}")
    elif isinstance(default, list):
        parts.append(f"default {','.join(str(d) for d in default)}")
    elif default is not None:
        parts.append(f"default {default}")
    if kind == "list":
        parts.append("comma-separated")
    # The field's place in a spec file (--spec), and argparse %-formats help strings.
    return ("; ".join(parts) + f" [{field}]").replace("%", "%%")


def _walk(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, FieldInfo, Any]]:
    for name, info in model.model_fields.items():
        annotation = _unwrap_optional(info.annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _walk(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info, annotation


def spec_flags(model: type[BaseModel] = JobSpec, aliases: dict[str, str] | None = None) -> tuple[SpecFlag, ...]:
    """The flags of every leaf field of ``model``, in field order."""
    aliases = ALIASES if aliases is None else aliases
    flags: list[SpecFlag] = []
    for field, info, annotation in _walk(model, ""):
        dest = aliases.get(field, field.rpartition(".")[2])
        if get_origin(annotation) is list:
            item_type, choices = _scalar(_unwrap_optional(get_args(annotation)[0]), field)
            flags.append(SpecFlag(field, dest, "list", comma_list(item_type or str), choices,
                                  _help(field, info, choices, "list")))
        elif annotation is bool:
            flags.append(SpecFlag(field, dest, "bool", None, (), _help(field, info, (), "bool")))
        else:
            value_type, choices = _scalar(annotation, field)
            flags.append(SpecFlag(field, dest, "value", value_type, choices, _help(field, info, choices, "value")))
    seen: dict[str, str] = {}
    for flag in flags:
        if flag.dest in seen:
            raise ValueError(f"{seen[flag.dest]} and {flag.field} would both be {flag.option}: add an alias")
        seen[flag.dest] = flag.field
    missing = set(aliases) - set(seen.values())
    if missing:
        raise ValueError(f"aliases for fields the spec does not have: {sorted(missing)}")
    return tuple(flags)


SPEC_FLAGS = spec_flags()
FIELD_FLAGS: dict[str, str] = {f.field: f.option for f in SPEC_FLAGS}
