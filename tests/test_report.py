"""Tests for app_engine.report: the run and comparison plots are real, readable images.

The megabatch metrics follow the APP schedule (density 0.8 ** s_t) with a rising accuracy and a
shrinking generalisation gap, the shapes a run produces. What is checked is that each curve reaches
the image (its colour, in which panel, which way it goes), not how matplotlib draws it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app_engine.report import _final_layers, _spread, plot_compare, plot_layer_density, plot_run, render_run

TAU = 4.5
N = 8
# Matplotlib's default colour cycle: C0 (the run curves and the first method), C1 (the second).
C0 = (31, 119, 180)
C1 = (255, 127, 14)


def schedule(n: int = N, tau: float = TAU) -> list[float]:
    return [float(0.8**s) for s in np.linspace(1.0, tau, n)]


def megabatches(seed: int, n: int = N, offset: float = 0.0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for t, density in enumerate(schedule(n), start=1):
        acc = min(1.0, 0.5 + 0.4 * (1 - np.exp(-t / 3)) + offset + rng.normal(0, 0.01))
        out.append(
            {
                "index": t,
                "test_accuracy": acc,
                "density": density,
                "generalization_gap": 8.0 * np.exp(-t / 4) + rng.normal(0, 0.5),
            }
        )
    return out


def open_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def colour_pixels(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> np.ndarray:
    return np.all(np.abs(pixels.astype(int) - np.array(rgb)) <= tol, axis=-1)


def test_plot_run_writes_a_png_with_three_curves(tmp_path: Path) -> None:
    path = plot_run(megabatches(1), tmp_path / "report.png", title="resnet20 / app / digits")
    assert path == tmp_path / "report.png"
    assert path.stat().st_size > 20_000
    pixels = open_png(path)
    h, w, _ = pixels.shape
    assert w > 2 * h  # three panels side by side
    curve = colour_pixels(pixels, C0)
    assert curve.sum() > 500
    # Each third of the width (one panel each) holds part of the curves.
    thirds = [curve[:, i * w // 3 : (i + 1) * w // 3].sum() for i in range(3)]
    assert all(count > 100 for count in thirds), thirds
    # The density falls along the schedule: in the middle panel the curve starts high, ends low.
    cols = np.nonzero(curve[:, w // 3 : 2 * w // 3].any(axis=0))[0]
    rows_first = np.nonzero(curve[:, w // 3 + cols[0]])[0]
    rows_last = np.nonzero(curve[:, w // 3 + cols[-1]])[0]
    assert rows_first.mean() < rows_last.mean()  # image rows grow downwards


def test_plot_run_without_data_draws_empty_panels(tmp_path: Path) -> None:
    pixels = open_png(plot_run([], tmp_path / "empty.png"))
    assert colour_pixels(pixels, C0).sum() == 0
    # Missing values leave gaps instead of failing: a run of the dense method has no gap data.
    partial = [
        {"index": i, "test_accuracy": 0.5 + 0.05 * i, "density": 1.0, "generalization_gap": None} for i in (1, 2, 3)
    ]
    pixels = open_png(plot_run(partial, tmp_path / "partial.png"))
    w = pixels.shape[1]
    curve = colour_pixels(pixels, C0)
    assert curve[:, : w // 3].sum() > 100
    assert curve[:, 2 * w // 3 :].sum() == 0


def test_plot_run_checks_its_input_and_writes_svg(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="index"):
        plot_run([{"test_accuracy": 0.5}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="report.jpg"):
        plot_run(megabatches(1), tmp_path / "report.jpg")
    svg = plot_run(megabatches(1), tmp_path / "report.svg").read_text()
    assert "<svg" in svg and "megabatch" in svg
    # Same metrics, same bytes: the image carries no date or version.
    assert render_run(megabatches(2)) == render_run(megabatches(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.svg"]  # no temporary files left


def test_spread_is_mean_and_range_over_the_seeds() -> None:
    seeds = [megabatches(s) for s in (1, 2, 3)]
    seeds[2] = seeds[2][:5]  # a stopped run: indices 6..8 come from two seeds
    xs, mean, low, high = _spread(seeds, "test_accuracy", 100.0)
    assert xs == list(range(1, N + 1))
    for i, t in enumerate(xs):
        values = [100.0 * run[t - 1]["test_accuracy"] for run in seeds if len(run) >= t]
        assert len(values) == (3 if t <= 5 else 2)
        assert mean[i] == pytest.approx(float(np.mean(values)))
        assert (low[i], high[i]) == (min(values), max(values))


def test_plot_compare_draws_each_method(tmp_path: Path) -> None:
    runs = {
        "app": [megabatches(s, offset=0.03) for s in (1, 2, 3)],
        "dense": [
            [dict(mb, density=1.0) for mb in megabatches(s, offset=-0.03)] for s in (4, 5, 6)
        ],
    }
    path = plot_compare(runs, tmp_path / "compare.png", title="app vs dense")
    pixels = open_png(path)
    assert path.stat().st_size > 20_000
    w = pixels.shape[1]
    for colour in (C0, C1):
        curve = colour_pixels(pixels, colour)
        assert curve[:, : w // 2].sum() > 100 and curve[:, w // 2 :].sum() > 100
    # The min-max bands are the method colours at alpha 0.2 over white.
    band = tuple(int(round(255 - 0.2 * (255 - c))) for c in C0)
    assert colour_pixels(pixels, band, tol=4).sum() > 200  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one method"):
        plot_compare({}, tmp_path / "none.png")


def test_layer_density_plot_averages_each_layer_over_the_seeds(tmp_path: Path) -> None:
    def run(layers: dict[str, float]) -> list[dict[str, Any]]:
        return [dict(mb, layer_density=layers) for mb in megabatches(1, n=2)]

    runs = {
        "app": [run({"conv1.weight": 0.2, "conv2.weight": 0.6}), run({"conv1.weight": 0.4, "conv2.weight": 0.5})],
        "dense": [run({"conv1.weight": 1.0, "conv2.weight": 1.0})],
    }
    assert _final_layers(runs["app"]) == pytest.approx({"conv1.weight": 0.3, "conv2.weight": 0.55})
    pixels = open_png(plot_layer_density(runs, tmp_path / "layers.png", title="per layer"))
    for colour in (C0, C1):  # a line per method
        assert colour_pixels(pixels, colour).sum() > 50
    with pytest.raises(ValueError, match="at least one method"):
        plot_layer_density({}, tmp_path / "none.png")
