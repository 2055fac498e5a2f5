"""`anytime-prune run` and `anytime-prune compare`: the engine from the command line."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import logging
import os
import statistics
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from anytime_prune.spec_flags import FIELD_FLAGS, SPEC_FLAGS, comma_list
from app_common.events import EpochEnded, Event, MegabatchEnded, MegabatchMetrics, RunEnded, RunStarted
from app_common.spec import JobSpec, SpecError

log = logging.getLogger("anytime_prune")

# The top-level modules of pyproject's `engine` extra (a test keeps the two in step): `run` and
# `compare` check for them before loading the engine, so that a client-only install gets one line
# naming the extra instead of torch's import traceback.
ENGINE_MODULES = ("torch", "numpy", "safetensors", "sklearn", "PIL", "matplotlib", "tqdm")
ENGINE_EXTRA_HINT = "pip install 'anytime-prune[engine]'"

# `compare` varies these itself (--methods, --megabatches as a list, --seeds).
COMPARE_OWN_FIELDS = frozenset({"method", "stream.megabatches", "training.seed"})
# ...and takes these as comma lists too: each one given with several values is an axis of the grid
# of runs (every combination, times every method and seed), a column of the table.
GRID_FIELDS = ("sparsity.target", "sparsity.tau", "sparsity.pruner", "sparsity.scope", "stream.replay")

def add_spec_flags(p: argparse.ArgumentParser, *, compare: bool = False) -> None:
    """``--spec`` and a flag per job-spec field (generated: :mod:`anytime_prune.spec_flags`);
    every default is None, so only the flags given override the spec file."""
    g = p.add_argument_group("job spec (overrides --spec)")
    g.add_argument("--spec", type=Path, help="JSON job spec (the HTTP API's body); flags override it")
    for flag in SPEC_FLAGS:
        if compare and flag.field in GRID_FIELDS:
            g.add_argument(flag.option, dest=flag.dest, type=comma_list(flag.type or str), default=None,
                           metavar="A,B,...", help=f"{flag.help} (a comma list is an axis of the grid)")
        elif not (compare and flag.field in COMPARE_OWN_FIELDS):
            flag.add_to(g)


def spec_dict_from_args(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The spec file's dict with the given flags written over it (``overrides``: by flag dest)."""
    data: dict[str, Any] = {}
    if args.spec is not None:
        try:
            data = json.loads(Path(args.spec).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"error: --spec {args.spec}: {exc}") from None
        if not isinstance(data, dict):
            raise SystemExit(f"error: --spec {args.spec}: expected a JSON object")
    values = {flag.dest: getattr(args, flag.dest, None) for flag in SPEC_FLAGS}
    values.update(overrides or {})
    fields = {flag.dest: flag.field for flag in SPEC_FLAGS}
    for dest, value in values.items():
        if value is None:
            continue
        *parents, leaf = fields[dest].split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SystemExit(f"error: --spec: field '{part}' must be an object")
        node[leaf] = value
    # A flag for one form of the target replaces the other form given in the spec file.
    if getattr(args, "target_sparsity", None) is not None:
        data.get("sparsity", {}).pop("tau", None)
    elif getattr(args, "tau", None) is not None:
        data.get("sparsity", {}).pop("target", None)
    return data


def build_spec(data: dict[str, Any]) -> JobSpec:
    try:
        return JobSpec.from_dict(data)
    except SpecError as exc:
        lines = [
            f"  {e.field}{' (' + FIELD_FLAGS[e.field] + ')' if e.field in FIELD_FLAGS else ''}: {e.reason}"
            for e in exc.errors
        ]
        raise SystemExit("error: invalid job spec:\n" + "\n".join(lines)) from None


class ConsoleProgress:
    """Progress bar on a terminal, plain log lines otherwise (a run callback).

    ``megabatch_lines`` prints a line per finished megabatch; a local run leaves that to the
    engine's own log, a remote job (``watch``) has no other source of it.
    """

    def __init__(self, label: str = "", stream: Any = None, *, megabatch_lines: bool = True):
        self.megabatch_lines = megabatch_lines
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.label = label
        self.bar: Any = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            total = event.megabatches * event.epochs
            done = event.resumed_after * event.epochs
            if event.resumed_after:
                log.info("%sresuming after megabatch %d", self.label, event.resumed_after)
            log.info("%s%d megabatches x %d epochs on %s (%s)", self.label, event.megabatches, event.epochs,
                     event.device, event.precision)
            if self.tty:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=done, desc=self.label.strip() or "epochs", unit="ep",
                                file=self.stream, dynamic_ncols=True)
        elif isinstance(event, EpochEnded):
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix(mb=f"{event.megabatch}", val=f"{event.val_accuracy:.3f}")
            else:
                log.debug("megabatch %d epoch %d/%d: loss %.4f val %.4f", event.megabatch, event.epoch,
                          event.epochs, event.train_loss, event.val_accuracy)
        elif isinstance(event, MegabatchEnded) and self.megabatch_lines:
            m = event.metrics
            line = (f"{self.label}megabatch {m.index}/{event.megabatches}: test acc {m.test_accuracy:.4f}, "
                    f"density {m.density:.4f}, gap {m.generalization_gap:+.2f} pp")
            if self.bar is not None:
                self.bar.write(line)
            else:
                log.info("%s", line)
        elif isinstance(event, RunEnded) and self.bar is not None:
            self.bar.close()


def megabatch_metrics(result: dict[str, Any]) -> list[MegabatchMetrics]:
    """The per-megabatch metrics of a result.json (or of a job's ``result``)."""
    return [MegabatchMetrics.from_dict(m) for m in result["megabatches"]]


def megabatch_table(result: dict[str, Any]) -> str:
    head = (f"{'mb':>3} {'density':>8} {'target':>8} {'test acc':>9} {'errors':>7} {'val acc':>8} "
            f"{'train acc':>9} {'gap pp':>7} {'img/s':>8}")
    rows = [head, "-" * len(head)]
    for m in megabatch_metrics(result):
        rows.append(
            f"{m.index:>3} {m.density:>8.4f} {m.target_density:>8.4f} {m.test_accuracy:>9.4f} "
            f"{m.test_errors:>7d} {m.val_accuracy:>8.4f} {m.train_accuracy:>9.4f} "
            f"{m.generalization_gap:>7.2f} {m.images_per_s:>8.0f}"
        )
    fta = result["final_test_accuracy"]
    rows.append(
        f"CER {result['cer']} errors (normalised {result['cer_normalized']:.4f}); final test accuracy "
        f"{fta if fta is None else format(fta, '.4f')}; final density {result['final_density']:.4f}"
    )
    return "\n".join(rows)



@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Bad data or settings (a missing dataset file, a folder of another run, a megabatch size
    the data cannot fill) end the command with their message, not a traceback."""
    try:
        yield
    except ValueError as exc:  # DatasetError, CheckpointError and the engine's config errors
        log.debug("run failed", exc_info=True)
        raise SystemExit(f"error: {exc}") from None


def _logs_above_the_bar() -> contextlib.AbstractContextManager[Any]:
    """On a terminal, print log records through tqdm so they do not tear the progress bar."""
    if not sys.stderr.isatty():
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    redirect: contextlib.AbstractContextManager[Any] = logging_redirect_tqdm()
    return redirect


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # an import hook refused it, or a half-installed module
        return False


def require_engine(command: str) -> None:
    """Exit with one line naming the extra to install when the engine's packages are missing.
    A package that is installed but fails to import still raises: that is a real error."""
    missing = [m for m in ("app_engine", *ENGINE_MODULES) if not _importable(m)]
    if missing:
        raise SystemExit(f"error: `anytime-prune {command}` needs the training engine, and "
                         f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
                         f"{ENGINE_EXTRA_HINT}")


def cmd_run(args: argparse.Namespace) -> int:
    require_engine("run")
    spec = build_spec(spec_dict_from_args(args))
    from app_engine.runner import run

    out = Path(args.out)
    with _user_errors(), _logs_above_the_bar():
        outcome = run(spec, out, callbacks=[ConsoleProgress(megabatch_lines=False)], data_options=_data_options())
    print(megabatch_table(outcome.result))
    print(f"wrote {out / 'result.json'}")
    return 0


def _data_options() -> Any:
    """Where image folders larger than memory go (app_engine.data.disk_cache): the cap in
    APP_DATA_MEMORY_CAP_BYTES, the folder APP_CACHE_DIR (default ~/.cache/anytime-prune)."""
    from app_engine.data import DataOptions

    with _user_errors():
        return DataOptions.from_env(os.environ)


def _mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cmd_compare(args: argparse.Namespace) -> int:
    require_engine("compare")
    from app_engine.report import plot_compare, plot_layer_density
    from app_engine.runner import run

    out = Path(args.out)
    # The grid: every given grid flag is an axis (one value: fixed for all runs; several: varied).
    dest_of = {flag.field: flag.dest for flag in SPEC_FLAGS}
    given = [(dest_of[f], getattr(args, dest_of[f])) for f in GRID_FIELDS]
    axes = [(dest, values) for dest, values in given if values is not None]
    varied = [dest for dest, values in axes if len(values) > 1]
    rows: list[dict[str, Any]] = []
    for n in args.megabatches:
        for combo in itertools.product(*(values for _, values in axes)):
            cell = dict(zip((dest for dest, _ in axes), combo, strict=True))
            shown = {dest: cell[dest] for dest in varied}
            folder = out / f"N{n}" / "_".join(f"{dest}-{value}" for dest, value in shown.items())
            runs: dict[str, list[list[dict[str, Any]]]] = {}
            for method in args.methods:
                for seed in args.seeds:
                    overrides = {**cell, "method": method, "megabatches": n, "seed": seed}
                    spec = build_spec(spec_dict_from_args(args, overrides))
                    label = " ".join([f"N={n}", *(f"{d}={v}" for d, v in shown.items()), method, f"seed {seed}"])
                    with _user_errors(), _logs_above_the_bar():
                        outcome = run(spec, folder / method / f"seed-{seed}",
                                      callbacks=[ConsoleProgress(f"[{label}] ", megabatch_lines=False)],
                                      data_options=_data_options())
                    r = outcome.result
                    runs.setdefault(method, []).append(r["megabatches"])
                    rows.append({"megabatches": n, **shown, "method": method, "seed": seed,
                                 "final_test_accuracy": r["final_test_accuracy"], "cer": r["cer"],
                                 "cer_normalized": r["cer_normalized"],
                                 "generalization_gap": megabatch_metrics(r)[-1].generalization_gap,
                                 "final_density": r["final_density"]})
            suffix = "".join(f"-{dest}-{value}" for dest, value in shown.items())
            title = " ".join([f"N={n}", *(f"{d}={v}" for d, v in shown.items())])
            plot_compare(runs, out / f"compare-N{n}{suffix}.png", title=title)
            plot_layer_density(runs, out / f"layers-N{n}{suffix}.png", title=title)
    summary = summarise(rows, varied)
    (out / "compare.json").write_text(json.dumps({"axes": varied, "runs": rows, "summary": summary}, indent=2) + "\n")
    table = compare_table(summary, varied)
    (out / "compare.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out / 'compare.json'}, {out / 'compare.md'} and the plots compare-N*.png (accuracy and "
          "density per megabatch) and layers-N*.png (final density per layer)")
    return 0


def summarise(rows: list[dict[str, Any]], axes: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Mean and spread over seeds of each grid cell (N, the varied ``axes``, method), in run order."""
    keys = ("final_test_accuracy", "cer", "generalization_gap", "final_density")
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["megabatches"], *(r[a] for a in axes), r["method"]), []).append(r)
    summary = []
    for (n, *cell, method), group in groups.items():
        entry: dict[str, Any] = {"megabatches": n, **dict(zip(axes, cell, strict=True)), "method": method,
                                 "seeds": [g["seed"] for g in group]}
        for key in keys:
            mean, spread = _mean_spread([float(g[key]) for g in group])
            entry[key] = {"mean": mean, "std": spread}
        summary.append(entry)
    return summary


def _mean_pm(stats: dict[str, float], fmt: str) -> str:
    return f"{format(stats['mean'], fmt)} ± {format(stats['std'], fmt)}"


def compare_table(summary: list[dict[str, Any]], axes: Sequence[str] = ()) -> str:
    """The paper-style table: a row per grid cell, mean ± spread over its seeds."""
    names = [FLAG_NAMES.get(a, a) for a in axes]
    head = "| N | " + "".join(f"{n} | " for n in names) + \
        "method | seeds | final test accuracy | CER (errors) | gen. gap (pp) | final density |"
    lines = [head, "|---|" + "---|" * len(axes) + "---|---|---|---|---|---|"]
    for s in summary:
        cells = "".join(f"{s[a]} | " for a in axes)
        lines.append(
            f"| {s['megabatches']} | {cells}{s['method']} | {len(s['seeds'])} | "
            f"{_mean_pm(s['final_test_accuracy'], '.4f')} | "
            f"{_mean_pm(s['cer'], '.1f')} | {_mean_pm(s['generalization_gap'], '.2f')} | "
            f"{_mean_pm(s['final_density'], '.4f')} |"
        )
    return "\n".join(lines)


# Table headings of the grid axes (the flags' dests read oddly there).
FLAG_NAMES = {"target_sparsity": "target sparsity", "tau": "tau", "pruner": "pruner", "scope": "scope",
              "replay": "replay"}


def add_engine_commands(sub: Any) -> None:
    p = sub.add_parser("run", help="run one job with the engine (no service)")
    add_spec_flags(p)
    p.add_argument("--out", required=True, help="output folder (re-running into it resumes)")
    p.set_defaults(func=cmd_run)

    c = sub.add_parser(
        "compare",
        help="run a grid (methods x N x seeds x any of target sparsity, tau, pruner, scope, replay given as "
        "comma lists) on the same data; the paper-style table and the anytime plots",
    )
    add_spec_flags(c, compare=True)
    c.add_argument("--methods", type=comma_list(str), default=["app", "osp", "dense"])
    c.add_argument("--seeds", type=comma_list(int), default=[1, 2, 3])
    c.add_argument("--megabatches", type=comma_list(int), default=[8], help="one or more stream lengths, e.g. 4,8")
    c.add_argument("--out", required=True)
    c.set_defaults(func=cmd_compare)
