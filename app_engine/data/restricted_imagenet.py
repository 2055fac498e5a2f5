"""The paper's Restricted ImageNet: 14 superclasses of ImageNet, written as an image folder.

The APP paper's few-shot Restricted ImageNet experiments use the *balanced* variant of Restricted
ImageNet (the robustness library's ``RestrictedImageNetBalanced``; the original Restricted ImageNet
of Tsipras et al. 2019 has 9 uneven superclasses). Each of its 14 superclasses gathers five
neighbouring ImageNet-1k classes (four for monkeys): 69 WordNet ids in all. They are listed below by
WordNet id, so no class-index file is needed; the comment on each names the ImageNet-1k class
indices (0-based, in sorted-wnid order) they cover.

:func:`build_restricted_imagenet` reads an ImageNet-style folder the user has (``SRC/train/<wnid>/``
and, if present, ``SRC/val/<wnid>/``; other wnids are ignored) and writes
``DEST/train/<superclass>/`` (and ``DEST/test/<superclass>/`` from ``val``), which the
``imagefolder`` loader reads. Optionally it keeps ``per_class`` training images per superclass
(a seeded sample over all its wnids) and resizes every image: shorter side to ``size``, centre
crop to ``size`` x ``size``, saved as PNG (lossless, so the loader sees exactly these pixels).
Without ``size`` the original files are copied.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app_engine.data.base import DatasetError

log = logging.getLogger(__name__)

SUPERCLASSES: dict[str, tuple[str, ...]] = {
    # ImageNet-1k 10-14: brambling, goldfinch, house finch, junco, indigo bunting
    "bird": ("n01530575", "n01531178", "n01532829", "n01534433", "n01537544"),
    # 33-37: loggerhead, leatherback, mud turtle, terrapin, box turtle
    "turtle": ("n01664065", "n01665541", "n01667114", "n01667778", "n01669191"),
    # 42-46: agama, frilled lizard, alligator lizard, Gila monster, green lizard
    "lizard": ("n01687978", "n01688243", "n01689811", "n01692333", "n01693334"),
    # 72-76: black-and-gold garden spider, barn spider, garden spider, black widow, tarantula
    "spider": ("n01773157", "n01773549", "n01773797", "n01774384", "n01774750"),
    # 118-122: Dungeness, rock, fiddler and king crab, American lobster
    "crab": ("n01978287", "n01978455", "n01980166", "n01981276", "n01983481"),
    # 200-204: Tibetan, silky, soft-coated wheaten and West Highland white terrier, Lhasa
    "dog": ("n02097474", "n02097658", "n02098105", "n02098286", "n02098413"),
    # 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat
    "cat": ("n02123045", "n02123159", "n02123394", "n02123597", "n02124075"),
    # 286-290: cougar, lynx, leopard, snow leopard, jaguar
    "big_cat": ("n02125311", "n02127052", "n02128385", "n02128757", "n02128925"),
    # 302-306: ground, long-horned, leaf, dung and rhinoceros beetle
    "beetle": ("n02167151", "n02168699", "n02169497", "n02172182", "n02174001"),
    # 322-326: ringlet, monarch, cabbage, sulphur butterfly, lycaenid
    "butterfly": ("n02277742", "n02279972", "n02280649", "n02281406", "n02281787"),
    # 371-374: patas, baboon, macaque, langur
    "monkey": ("n02486261", "n02486410", "n02487347", "n02488291"),
    # 393-397: anemone fish, sturgeon, gar, lionfish, puffer
    "fish": ("n02607072", "n02640242", "n02641379", "n02643566", "n02655020"),
    # 948-952: Granny Smith, strawberry, orange, lemon, fig
    "fruit": ("n07742313", "n07745940", "n07747607", "n07749582", "n07753113"),
    # 992-996: agaric, gyromitra, stinkhorn, earthstar, hen-of-the-woods
    "fungus": ("n12998815", "n13037406", "n13040303", "n13044778", "n13052670"),
}
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
MANIFEST = "restricted_imagenet.json"


@dataclass
class BuildReport:
    """What was written: images per split and superclass, and the wnids the source lacked."""

    dest: Path
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> superclass -> images
    missing_wnids: dict[str, list[str]] = field(default_factory=dict)  # split -> wnids without a folder


def _images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _collect(split_dir: Path) -> tuple[dict[str, list[Path]], list[str]]:
    """Each superclass's image files under ``split_dir/<wnid>/`` (wnid order, then file order),
    and the member wnids that have no folder there."""
    files: dict[str, list[Path]] = {}
    missing: list[str] = []
    for name, wnids in SUPERCLASSES.items():
        files[name] = []
        for wnid in wnids:
            folder = split_dir / wnid
            if folder.is_dir():
                files[name].extend(_images(folder))
            else:
                missing.append(wnid)
    return files, missing


def _sample(files: list[Path], k: int | None, rng: np.random.Generator) -> list[Path]:
    if k is None or k >= len(files):
        return files
    keep = np.sort(rng.choice(len(files), size=k, replace=False))
    return [files[i] for i in keep]


def _write(src: Path, dest: Path, size: int | None) -> None:
    if size is None:
        shutil.copyfile(src, dest)
        return
    try:
        with Image.open(src) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale (>= size) when it can
            rgb = img.convert("RGB")
            ImageOps.fit(rgb, (size, size), method=Image.Resampling.BICUBIC).save(dest, format="PNG")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"{src}: unreadable image ({type(exc).__name__}: {exc})") from None


def _out_name(src: Path, size: int | None) -> str:
    # The wnid keeps names unique across the superclass's member classes.
    return f"{src.parent.name}_{src.stem}{'.png' if size is not None else src.suffix}"


def build_restricted_imagenet(
    src: Path | str,
    dest: Path | str,
    *,
    per_class: int | None = None,
    size: int | None = 64,
    seed: int = 0,
    workers: int | None = None,
) -> BuildReport:
    """Write the 14-superclass Restricted ImageNet from ``src`` into the new folder ``dest``.

    ``per_class`` training images are kept per superclass (all when None; the test split, from
    ``src/val``, is always whole). Raises :class:`DatasetError` naming the problem: ``src`` without
    ``train/``, ``dest`` already there, a superclass with no images, an unreadable image. ``dest``
    is built in a temporary folder beside it and renamed into place, so it never exists half-written.
    """
    src, dest = Path(src).expanduser(), Path(dest).expanduser()
    if per_class is not None and per_class < 1:
        raise DatasetError(f"per_class: must be at least 1, got {per_class}")
    if size is not None and size < 8:
        raise DatasetError(f"size: must be at least 8 pixels, got {size}")
    if not (src / "train").is_dir():
        raise DatasetError(f"{src}/train: missing folder (expected an ImageNet-style {src}/train/<wnid>/*.JPEG)")
    if dest.exists():
        raise DatasetError(f"{dest}: already exists; give a new folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    report = BuildReport(dest=dest)
    rng = np.random.default_rng(seed)
    jobs: list[tuple[Path, Path]] = []
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for split, out_split in (("train", "train"), ("val", "test")):
            if not (src / split).is_dir():
                continue
            files, missing = _collect(src / split)
            empty = [name for name, found in files.items() if not found]
            if empty:
                raise DatasetError(
                    f"{src / split}: no images for superclass(es) {', '.join(empty)} "
                    f"(their wnids: {', '.join(w for n in empty for w in SUPERCLASSES[n])})"
                )
            report.missing_wnids[out_split] = missing
            report.counts[out_split] = {}
            for name, found in files.items():
                chosen = _sample(found, per_class, rng) if split == "train" else found
                (work / out_split / name).mkdir(parents=True)
                jobs += [(f, work / out_split / name / _out_name(f, size)) for f in chosen]
                report.counts[out_split][name] = len(chosen)
        # Pillow releases the GIL while it decodes and resizes: threads use every core.
        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            for _ in pool.map(lambda job: _write(job[0], job[1], size), jobs):
                pass
        (work / MANIFEST).write_text(json.dumps(
            {"source": str(src), "per_class": per_class, "size": size, "seed": seed,
             "superclasses": SUPERCLASSES, "counts": report.counts, "missing_wnids": report.missing_wnids},
            indent=2,
        ))
        os.rename(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("restricted imagenet: %s", {split: sum(c.values()) for split, c in report.counts.items()})
    return report


def wnids() -> Iterable[str]:
    """Every member wnid, superclass by superclass."""
    return (w for members in SUPERCLASSES.values() for w in members)
