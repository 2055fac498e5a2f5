"""bench/bench_train.py: it runs both sides and reports them, and both sides do the same work.

No timing is asserted here (speed is what the script itself reports, on a quiet machine); these
tests check that the numbers are produced and consistent, and that the comparison is like for like.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from app_engine.train import resolve_runtime

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_train.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the module executes.
    sys.modules["bench_train"] = module
    spec.loader.exec_module(module)
    return module


def test_script_prints_both_rates_and_their_ratio(tmp_path: Path, bench: ModuleType) -> None:
    out = tmp_path / "bench.json"
    args = ["--arch", "cnn_small", "--size", "8", "--samples", "160", "--epochs", "1", "--repeats", "2",
            "--workers", "1", "--json", str(out)]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    row = r"^(conventional|engine)\s+(?:fp32|bf16)\s+(?:nchw|nhwc)\s+([0-9.]+)\s+([0-9.]+)$"
    rows = {side: (float(median), float(best)) for side, median, best in re.findall(row, proc.stdout, re.MULTILINE)}
    assert set(rows) == {"conventional", "engine"}, proc.stdout
    found = re.search(r"^ratio engine/conventional: ([0-9.]+)x$", proc.stdout, re.MULTILINE)
    assert found is not None, proc.stdout
    ratio = float(found.group(1))
    found_best = re.search(r"^ratio of the fastest runs: ([0-9.]+)x$", proc.stdout, re.MULTILINE)
    assert found_best is not None, proc.stdout

    result = json.loads(out.read_text())
    assert result["train_images"] == 144 and result["val_images"] == 16
    # The engine runs in the precision and layout its runtime picks for this machine.
    rt = resolve_runtime("cpu", "auto")
    assert result["precision"] == {"conventional": "fp32", "engine": rt.precision}
    assert result["layout"] == {"conventional": "nchw", "engine": "nhwc" if rt.channels_last else "nchw"}
    rate = result["images_per_s"]
    best = result["best_images_per_s"]
    for side in ("conventional", "engine"):
        # Two timed runs of 144 images: the median rate is over their mean time, the best over the shorter.
        seconds = result["seconds"][side]
        assert len(seconds) == 2
        assert rate[side] == pytest.approx(144 / (sum(seconds) / 2))
        assert best[side] == pytest.approx(144 / min(seconds))
        assert rows[side] == (pytest.approx(rate[side], abs=0.051), pytest.approx(best[side], abs=0.051))
    assert result["ratio"] == pytest.approx(rate["engine"] / rate["conventional"])
    assert ratio == pytest.approx(result["ratio"], abs=0.0051)
    assert result["ratio_best"] == pytest.approx(best["engine"] / best["conventional"])
    assert float(found_best.group(1)) == pytest.approx(result["ratio_best"], abs=0.0051)
    assert result["machine"]["torch"] == torch.__version__
    assert result["machine"]["cpu_features"] == bench.cpu_features()


def test_problem_is_fixed_split_and_at_the_benchmark_density(bench: ModuleType) -> None:
    a = bench.make_problem("cnn_small", 8, 100, seed=3)
    b = bench.make_problem("cnn_small", 8, 100, seed=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.train_idx, b.train_idx)
    assert a.x.dtype == torch.uint8 and tuple(a.x.shape) == (100, 3, 8, 8)
    assert sorted(torch.cat([a.train_idx, a.val_idx]).tolist()) == list(range(100))
    assert len(a.val_idx) == 10
    kept = sum(int(m.sum()) for m in a.masks.values())
    total = sum(m.numel() for m in a.masks.values())
    assert kept == round(bench.DENSITY * total)


def test_conventional_preprocessing_equals_the_models_own_normalisation(bench: ModuleType) -> None:
    # The conventional model drops its Normalize layer because its transforms normalise: the two
    # must compute the same function, or the sides would not train the same network.
    problem = bench.make_problem("cnn_small", 8, 32, seed=0)
    model = bench.build_model("cnn_small", 8)
    model.load_state_dict(problem.init_state)
    model.eval()
    conventional = copy.deepcopy(model)
    conventional.normalize = bench._Identity()
    transform = bench.Compose([bench.ToTensor(), bench.Normalize(bench.MEAN, bench.STD)])
    x = problem.x[:8]
    with torch.no_grad():
        expected = model(x)
        got = conventional(torch.stack([transform(img) for img in x]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_random_crop_and_flip_match_the_engines_augmentation(bench: ModuleType) -> None:
    # Every per-sample crop is one of the (2p+1)^2 windows of the zero-padded image, possibly
    # mirrored, with p = H/8 as in app_engine.train.augment; over many draws all offsets occur.
    img = torch.arange(3 * 16 * 16, dtype=torch.int64).reshape(3, 16, 16).to(torch.uint8)
    pad = 2
    padded = torch.nn.functional.pad(img, (pad, pad, pad, pad))
    windows = {
        (top, left): padded[:, top : top + 16, left : left + 16]
        for top in range(2 * pad + 1)
        for left in range(2 * pad + 1)
    }
    crop_flip = bench.Compose([bench.RandomCrop(16, pad), bench.RandomHorizontalFlip()])
    seen, flipped = set(), 0
    torch.manual_seed(0)
    for _ in range(400):
        out = crop_flip(img)
        match = [(k, False) for k, w in windows.items() if torch.equal(out, w)]
        match += [(k, True) for k, w in windows.items() if torch.equal(out, w.flip(-1))]
        assert match, "a crop that is no window of the padded image"
        seen.add(match[0][0])
        flipped += match[0][1]
    assert seen == set(windows)
    assert 150 < flipped < 250


def test_step_script_times_the_variants_in_turns(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "bench" / "bench_step.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["eager", "foreach", "nchw", "--arch", "cnn_small", "--size", "8", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^  (\w+)\s+min\s+([0-9.]+)\s+p25\s+([0-9.]+)\s+median\s+([0-9.]+)(.*)$", out, re.MULTILINE)
    assert [r[0] for r in rows] == ["eager", "foreach", "nchw"], out
    for _, fastest, p25, median, _rest in rows:
        assert 0 < float(fastest) <= float(median) and float(p25) <= float(median)
    # Every variant but the first is compared with the first.
    assert "speed-up" not in rows[0][4] and all("speed-up over eager" in r[4] for r in rows[1:])
