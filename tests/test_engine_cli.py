"""`anytime-prune run` / `compare` argument handling and the compare output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image

from anytime_prune.cli import build_parser, main
from anytime_prune.engine_cli import ENGINE_MODULES, spec_dict_from_args


def parse(argv: list[str]):
    return build_parser().parse_args(argv)


def test_flags_override_the_spec_file(tmp_path):
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps({
        "dataset": {"name": "digits"},
        "architecture": "mlp",
        "sparsity": {"tau": 2.0, "pruner": "magnitude"},
        "training": {"epochs": 9, "lr": 0.05},
    }))
    args = parse(["run", "--spec", str(spec_file), "--epochs", "2", "--target-sparsity", "0.5",
                  "--milestones", "1,2", "--out", str(tmp_path / "o")])
    data = spec_dict_from_args(args)
    assert data["training"] == {"epochs": 2, "lr": 0.05, "milestones": [1, 2]}
    # A target flag replaces the spec file's tau rather than clashing with it.
    assert data["sparsity"] == {"target": 0.5, "pruner": "magnitude"}
    assert data["architecture"] == "mlp"


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--arch", "resnet9000"], "architecture (--arch)"),
        (["--target-sparsity", "1.5"], "sparsity.target (--target-sparsity)"),
        (["--dataset", "npz"], "dataset"),
        (["--epochs", "0"], "training.epochs (--epochs)"),
        (["--replay", "sometimes"], "stream.replay (--replay)"),
    ],
)
def test_bad_flags_name_the_field_and_flag(tmp_path, argv, needle):
    with pytest.raises(SystemExit) as exc:
        main(["run", *argv, "--out", str(tmp_path / "o")])
    assert needle in str(exc.value)


def test_unreadable_spec_file_is_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit) as exc:
        main(["run", "--spec", str(bad), "--out", str(tmp_path / "o")])
    assert str(bad) in str(exc.value)


def test_compare_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main([
        "compare", "--dataset", "digits", "--arch", "mlp", "--methods", "app,dense", "--seeds", "1,2",
        "--megabatches", "2", "--target-sparsity", "0.5", "--epochs", "1", "--out", str(out),
    ])
    assert code == 0
    report = json.loads((out / "compare.json").read_text())
    assert len(report["runs"]) == 4
    by_method = {s["method"]: s for s in report["summary"]}
    assert set(by_method) == {"app", "dense"}
    assert by_method["dense"]["final_density"]["mean"] == pytest.approx(1.0)
    assert by_method["app"]["final_density"]["mean"] == pytest.approx(0.5, abs=0.002)
    accs = [r["final_test_accuracy"] for r in report["runs"] if r["method"] == "app"]
    assert by_method["app"]["final_test_accuracy"]["mean"] == pytest.approx(sum(accs) / 2)
    table = (out / "compare.md").read_text()
    assert "| 2 | app | 2 |" in table and "| 2 | dense | 2 |" in table
    with Image.open(out / "compare-N2.png") as img:
        assert img.size[0] > 200
    with Image.open(out / "layers-N2.png") as img:  # final density per layer, a line per method
        assert img.size[0] > 200
    assert "compare.json" in capsys.readouterr().out


def test_missing_dataset_file_is_an_error_message_not_a_traceback(tmp_path):
    missing = tmp_path / "nowhere.npz"
    with pytest.raises(SystemExit) as exc:
        main(["run", "--dataset", "npz", "--data-path", str(missing), "--out", str(tmp_path / "o")])
    assert str(exc.value).startswith("error: ") and str(missing) in str(exc.value)


def test_megabatch_size_the_data_cannot_fill_names_the_field(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--dataset", "digits", "--megabatches", "2", "--megabatch-size", "5000",
              "--out", str(tmp_path / "o")])
    assert "stream.megabatch_size" in str(exc.value)


# --- without the engine extra -------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]

# Loaded by every Python started with this folder on PYTHONPATH: importing torch then fails as it
# does where the `engine` extra is not installed, and each refused import is logged to a file, so
# the tests below can tell that the block was really in the way.
BLOCKER = '''
import os, sys

class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "torch":
            with open(os.environ["BLOCKED_LOG"], "a") as log:
                log.write(name + "\\n")
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoTorch())
'''


def run_without_torch(tmp_path: Path, *argv: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    blocked = tmp_path / "blocked.log"
    blocked.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), BLOCKED_LOG=str(blocked),
               ANYTIME_PRUNE_HOME=str(tmp_path / "home"))
    proc = subprocess.run([sys.executable, "-m", "anytime_prune.cli", *argv], env=env, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    return proc, (blocked.read_text().split() if blocked.exists() else [])


@pytest.mark.parametrize("command", [["run"], ["compare", "--methods", "app"]])
def test_engine_commands_without_torch_name_the_extra_in_one_line(tmp_path: Path, command: list[str]) -> None:
    proc, blocked = run_without_torch(tmp_path, *command, "--dataset", "digits", "--out", str(tmp_path / "o"))
    assert "torch" in blocked, "the blocker was never consulted: the test proves nothing"
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"error: `anytime-prune {command[0]}` needs the training engine")
    assert "torch" in lines[0] and lines[0].endswith("pip install 'anytime-prune[engine]'")
    assert not (tmp_path / "o").exists()


def test_client_verbs_work_without_torch(tmp_path: Path) -> None:
    proc, _ = run_without_torch(tmp_path, "submit", "--help")
    assert proc.returncode == 0 and "--target-sparsity" in proc.stdout, proc.stderr
    # No service at this address: the client verb runs, fails cleanly, and never needed torch.
    proc, blocked = run_without_torch(tmp_path, "status", "0" * 32, "--url", "http://127.0.0.1:9", "--timeout", "2")
    assert proc.returncode == 4 and "unreachable" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert blocked == []


def test_engine_modules_are_the_engine_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = {canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"]["engine"]}
    distributions = metadata.packages_distributions()
    provided = {canonicalize_name(d) for m in ENGINE_MODULES for d in distributions.get(m, [])}
    assert provided == extra


def test_compare_sweeps_a_grid_of_pruners_and_sparsities(tmp_path, capsys):
    """Comma lists of spec flags are grid axes: every combination x method x seed runs, and the
    table has a row per cell with the axes as columns."""
    out = tmp_path / "grid"
    code = main([
        "compare", "--dataset", "digits", "--arch", "mlp", "--methods", "app", "--seeds", "1",
        "--megabatches", "2", "--epochs", "1", "--pruner", "snip,magnitude", "--target-sparsity", "0.5,0.8",
        "--scope", "global", "--out", str(out),
    ])
    assert code == 0
    report = json.loads((out / "compare.json").read_text())
    assert report["axes"] == ["target_sparsity", "pruner"]  # scope has one value: fixed, not an axis
    cells = [(r["target_sparsity"], r["pruner"]) for r in report["runs"]]
    assert cells == [(0.5, "snip"), (0.5, "magnitude"), (0.8, "snip"), (0.8, "magnitude")]
    for s in report["summary"]:  # the schedule ends at each cell's own target
        assert s["final_density"]["mean"] == pytest.approx(1 - s["target_sparsity"], abs=0.002)
    table = (out / "compare.md").read_text().splitlines()
    assert table[0].startswith("| N | target sparsity | pruner | method | seeds |")
    assert "| 2 | 0.8 | magnitude | app | 1 |" in "\n".join(table)
    assert len(table) == 2 + 4
    for cell in ("target_sparsity-0.5-pruner-snip", "target_sparsity-0.8-pruner-magnitude"):
        for plot in ("compare", "layers"):
            with Image.open(out / f"{plot}-N2-{cell}.png") as img:
                assert img.size[0] > 200
