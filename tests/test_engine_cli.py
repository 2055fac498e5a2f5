"""`anytime-prune run` / `compare` argument handling and the compare output."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from anytime_prune.cli import build_parser, main
from anytime_prune.engine_cli import spec_dict_from_args


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
