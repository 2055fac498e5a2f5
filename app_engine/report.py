"""Plots of the anytime curves: one run, or several methods over seeds; and the final density per layer.

Matplotlib is used through ``Figure`` + ``FigureCanvasAgg`` directly, never pyplot: no global
figure registry, no backend switch, safe in a worker process and in threads. Each plot exists as a
``render_*`` function returning the image bytes and a ``plot_*`` function writing them atomically;
the format (png, svg or pdf) follows the file suffix.

Megabatch entries are :class:`~app_common.events.MegabatchMetrics` or the dicts of ``result.json``'s
``megabatches`` list (the same fields, e.g. read back from a file); the fields read here are
``index`` (1-based), ``test_accuracy`` (fraction in [0, 1]), ``density`` (fraction of prunable
weights kept), ``layer_density`` (layer name -> fraction kept) and ``generalization_gap``
(percentage points). A missing or ``None`` value leaves a
gap in that curve.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from app_common.events import MegabatchMetrics
from app_engine.files import write_atomic

logger = logging.getLogger(__name__)

FORMATS = ("png", "svg", "pdf")
DPI = 120
Megabatch = MegabatchMetrics | Mapping[str, Any]
Megabatches = Sequence[Megabatch]


def _field(mb: Megabatch, key: str) -> Any:
    if isinstance(mb, MegabatchMetrics):
        return getattr(mb, key, None)
    return mb.get(key)


def _format_of(path: Path) -> str:
    fmt = path.suffix.lower().removeprefix(".") or "png"
    if fmt not in FORMATS:
        raise ValueError(f"{path.name}: plots are written as {', '.join(FORMATS)}, not {fmt!r}")
    return fmt


def _to_bytes(fig: Figure, fmt: str) -> bytes:
    FigureCanvasAgg(fig)  # attaches itself to the figure
    buf = io.BytesIO()
    # No "Software"/date entries: the same metrics give the same bytes (and sha256).
    metadata: dict[str, Any] = {"Software": None} if fmt == "png" else {"Date": None} if fmt == "svg" else {}
    fig.savefig(buf, format=fmt, dpi=DPI, metadata=metadata)
    return buf.getvalue()


def _series(megabatches: Megabatches, key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    """(index, value * scale) for the entries that have a finite ``key``."""
    xs, ys = [], []
    for pos, mb in enumerate(megabatches):
        index = _field(mb, "index")
        if index is None:
            raise ValueError(f"megabatch entry {pos} has no 'index'")
        value = _field(mb, key)
        if value is None or not math.isfinite(float(value)):
            continue
        xs.append(int(index))
        ys.append(float(value) * scale)
    return xs, ys


# (metrics key, axis label, scale to the plotted unit)
_RUN_PANELS = (
    ("test_accuracy", "test accuracy (%)", 100.0),
    ("density", "density (fraction kept)", 1.0),
    ("generalization_gap", "generalisation gap (pp)", 1.0),
)


def _style_axis(ax: Axes, label: str, key: str) -> None:
    ax.set_xlabel("megabatch")
    ax.set_ylabel(label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if key == "density":
        ax.set_ylim(0.0, 1.05)
    if key == "generalization_gap":
        ax.axhline(0.0, color="0.6", linewidth=0.8)


def render_run(megabatches: Megabatches, *, title: str | None = None, fmt: str = "png") -> bytes:
    """The three anytime curves of one run (test accuracy, density, generalisation gap) as image bytes."""
    fig = Figure(figsize=(12.0, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (key, label, scale) in zip(axes, _RUN_PANELS, strict=True):
        xs, ys = _series(megabatches, key, scale)
        if xs:
            ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.6, color="tab:blue")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
        _style_axis(ax, label, key)
        ax.set_title(label.split(" (")[0])
    if title:
        fig.suptitle(title)
    return _to_bytes(fig, fmt)


def plot_run(megabatches: Megabatches, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Write :func:`render_run`'s figure to ``path`` (format from the suffix); returns the path."""
    path = Path(path)
    write_atomic(path, render_run(megabatches, title=title, fmt=_format_of(path)))
    logger.info("wrote %s", path)
    return path


def _spread(
    seeds: Sequence[Megabatches], key: str, scale: float
) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per megabatch index over the seeds that reached it: (index, mean, min, max).

    Seeds may differ in length (a stopped run); each index averages the seeds that have it.
    """
    by_index: dict[int, list[float]] = {}
    for megabatches in seeds:
        for x, y in zip(*_series(megabatches, key, scale), strict=True):
            by_index.setdefault(x, []).append(y)
    xs = sorted(by_index)
    means = [sum(by_index[x]) / len(by_index[x]) for x in xs]
    return xs, means, [min(by_index[x]) for x in xs], [max(by_index[x]) for x in xs]


def render_compare(
    runs: Mapping[str, Sequence[Megabatches]], *, title: str | None = None, fmt: str = "png"
) -> bytes:
    """Test accuracy and density per megabatch for each method: mean over seeds, min-max band."""
    if not runs:
        raise ValueError("plot_compare needs at least one method")
    fig = Figure(figsize=(9.0, 3.6), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = _RUN_PANELS[:2]
    for i, (method, seeds) in enumerate(runs.items()):
        color = f"C{i % 10}"
        for ax, (key, _, scale) in zip(axes, panels, strict=True):
            xs, mean, low, high = _spread(seeds, key, scale)
            if not xs:
                continue
            ax.plot(xs, mean, marker="o", markersize=4, linewidth=1.6, color=color, label=f"{method} (n={len(seeds)})")
            ax.fill_between(xs, low, high, color=color, alpha=0.2, linewidth=0)
    for ax, (key, label, _) in zip(axes, panels, strict=True):
        _style_axis(ax, label, key)
        ax.set_title(f"{label.split(' (')[0]}: mean, min-max over seeds")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return _to_bytes(fig, fmt)


def plot_compare(
    runs: Mapping[str, Sequence[Megabatches]], path: str | os.PathLike[str], *, title: str | None = None
) -> Path:
    """Write :func:`render_compare`'s figure for ``runs`` (method -> per-seed megabatch lists) to ``path``."""
    path = Path(path)
    write_atomic(path, render_compare(runs, title=title, fmt=_format_of(path)))
    logger.info("wrote %s", path)
    return path


def _final_layers(seeds: Sequence[Megabatches]) -> dict[str, float]:
    """Mean over seeds of each layer's density after the last megabatch (layers in model order)."""
    totals: dict[str, list[float]] = {}
    for megabatches in seeds:
        if not megabatches:
            continue
        layers = _field(megabatches[-1], "layer_density") or {}
        for name, value in layers.items():
            totals.setdefault(name, []).append(float(value))
    return {name: sum(values) / len(values) for name, values in totals.items()}


def render_layer_density(
    runs: Mapping[str, Sequence[Megabatches]], *, title: str | None = None, fmt: str = "png"
) -> bytes:
    """Final density of every prunable layer, one line per method (mean over seeds): where each
    method left its weights. Layers in model order along x, named on the axis."""
    if not runs:
        raise ValueError("plot_layer_density needs at least one method")
    finals = {method: _final_layers(seeds) for method, seeds in runs.items()}
    layers = list(dict.fromkeys(name for final in finals.values() for name in final))
    fig = Figure(figsize=(max(6.0, 1.5 + 0.28 * len(layers)), 4.8), layout="constrained")
    ax = fig.subplots()
    for i, (method, final) in enumerate(finals.items()):
        xs = [x for x, name in enumerate(layers) if name in final]
        ax.plot(xs, [final[layers[x]] for x in xs], marker="o", markersize=4, linewidth=1.4,
                color=f"C{i % 10}", label=f"{method} (n={len(runs[method])})")
    if not layers:
        ax.text(0.5, 0.5, "no per-layer densities", ha="center", va="center", transform=ax.transAxes, color="0.5")
    ax.set_xticks(range(len(layers)), [name.removesuffix(".weight") for name in layers], rotation=90,
                  fontsize="x-small")
    ax.set_xlabel("prunable layer")
    ax.set_ylabel("final density (fraction kept)")
    ax.set_ylim(0.0, 1.05)
    ax.grid(True, alpha=0.3)
    ax.set_title("density per layer after the last megabatch: mean over seeds")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return _to_bytes(fig, fmt)


def plot_layer_density(
    runs: Mapping[str, Sequence[Megabatches]], path: str | os.PathLike[str], *, title: str | None = None
) -> Path:
    """Write :func:`render_layer_density`'s figure for ``runs`` (method -> per-seed megabatch lists) to ``path``."""
    path = Path(path)
    write_atomic(path, render_layer_density(runs, title=title, fmt=_format_of(path)))
    logger.info("wrote %s", path)
    return path
