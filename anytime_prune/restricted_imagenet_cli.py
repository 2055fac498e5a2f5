"""`anytime-prune build-restricted-imagenet SRC DEST`: the paper's 14-superclass Restricted ImageNet
as an image folder (:mod:`app_engine.data.restricted_imagenet`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from anytime_prune.engine_cli import require_engine


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def cmd_build_restricted_imagenet(args: argparse.Namespace) -> int:
    require_engine("build-restricted-imagenet")
    from app_engine.data import DatasetError
    from app_engine.data.restricted_imagenet import build_restricted_imagenet

    try:
        report = build_restricted_imagenet(
            args.src, args.dest, per_class=args.per_class, size=args.size or None, seed=args.seed
        )
    except DatasetError as exc:
        raise SystemExit(f"error: {exc}") from None
    for split, counts in report.counts.items():
        print(f"{split}: {sum(counts.values())} images, " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        missing = report.missing_wnids.get(split)
        if missing:
            print(f"  ({len(missing)} member wnids had no folder: {', '.join(missing)})")
    if "test" not in report.counts:
        print(f"no {Path(args.src) / 'val'}/<wnid>/ folders: the imagefolder loader will hold out 20 % of train")
    print(f"wrote {report.dest}: train it with --dataset imagefolder --data-path {report.dest} "
          f"--image-size {args.size or '<side>'}")
    return 0


def add_restricted_imagenet_command(sub: Any) -> None:
    p = sub.add_parser(
        "build-restricted-imagenet",
        help="write the paper's few-shot Restricted ImageNet (14 superclasses) from an ImageNet folder you have",
        description="Reads SRC/train/<wnid>/ (and SRC/val/<wnid>/ if present) of an ImageNet-1k copy and writes "
        "DEST/train/<superclass>/ (and DEST/test/<superclass>/), an imagefolder dataset with the 14 superclasses "
        "of the balanced Restricted ImageNet (69 ImageNet classes).",
    )
    p.add_argument("src", type=Path, help="ImageNet-style folder: SRC/train/<wnid>/*.JPEG, optional SRC/val/<wnid>/")
    p.add_argument("dest", type=Path, help="new output folder (must not exist)")
    p.add_argument("--per-class", type=_positive, default=None, metavar="K",
                   help="training images per superclass, a seeded sample over its wnids (default: all)")
    p.add_argument("--size", type=_positive, default=64, metavar="PX",
                   help="resize (shorter side, then centre crop) to PX x PX and save as PNG; 0 copies the "
                   "original files (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --per-class sample (default 0)")
    p.set_defaults(func=cmd_build_restricted_imagenet)
