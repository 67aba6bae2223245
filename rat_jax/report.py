"""The paper's table from result rows: rows = methods, columns = test envs + average, mean ±
standard error over trials as DomainBed's collect_results computes it (`standard_error`);
written as results.md and results.json in the workdir."""
from __future__ import annotations

import json
import math
import os
import pathlib
from collections import defaultdict
from typing import Sequence

import numpy as np

from rat_jax.files import write_text_atomic

def duration(seconds: float | None) -> str:
    """A duration for people: '42 s', '17 min', '3.5 h', '2.1 days'; '—' when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


# (method, selection) in the order of the MR README table, with the test protocol of each row.
ROW_ORDER = [
    ("ERM (vanilla fine-tuning)", "ID val", "test env in-split (80%)"),
    ("Soups/DiWA", "Greedy", "full test env"),
    ("Soups/DiWA", "Uniform", "full test env"),
    ("Soups/DiWA†", "Uniform†", "full test env"),
    ("Inter-training", "ID val", "test env in-split (80%)"),
    ("Fusing", "ID val", "test env in-split (80%)"),
    ("Ratatouille", "Uniform", "full test env"),
    ("Ratatouille", "Greedy", "full test env"),
    ("Ratatouille†", "Uniform†", "full test env"),
    ("Ensemble of Ratatouille members", "Logits", "full test env"),
]
PROTOCOL = {(m, s): p for m, s, p in ROW_ORDER}
ROW_KEYS = ("method", "selection", "dataset", "test_env", "trial", "accuracy", "n_members")
# What ± means in the table: printed under it and stored as results.json["plus_minus"].
PLUS_MINUS = ("± : standard error over trials, std/√n with numpy's population std (ddof=0) and "
              "n = trials in the cell, as DomainBed's collect_results; no ± for a single value "
              "(one trial, † rows). Avg: mean of the env columns' means.")


def standard_error(values) -> float:
    """DomainBed's collect_results error (`format_mean`): np.std(x / √n), i.e. the population
    standard deviation (ddof=0) divided by √n, n = len(values)."""
    x = np.asarray(values, dtype=np.float64)
    return float(np.std(x / np.sqrt(len(x))))


def make_row(method, selection, dataset, test_env, trial, accuracy, n_members, **extra) -> dict:
    row = dict(method=method, selection=selection, dataset=dataset, test_env=int(test_env),
               trial=int(trial), accuracy=float(accuracy), n_members=int(n_members))
    row.update(extra)
    return row


def table(rows: Sequence[dict]) -> str:
    """Markdown table: accuracy in %, mean ± standard error over trials per test env, then the
    average; the line PLUS_MINUS under it says what ± is."""
    if not rows:
        return "(no results)"
    envs = sorted({r["test_env"] for r in rows})
    dataset = rows[0]["dataset"]
    cells: dict = defaultdict(list)
    for r in rows:
        cells[(r["method"], r["selection"], r["test_env"])].append(100.0 * r["accuracy"])
    methods = [(m, s) for m, s, _ in ROW_ORDER if any((m, s, e) in cells for e in envs)]
    methods += sorted({(r["method"], r["selection"]) for r in rows} - set(methods))
    head = ["Algorithm", "Selection"] + [f"{dataset} env {e}" for e in envs] + ["Avg", "Test protocol"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, s in methods:
        vals, means = [], []
        for e in envs:
            accs = cells.get((m, s, e), [])
            if accs:
                means.append(np.mean(accs))
                err = f" ± {standard_error(accs):.1f}" if len(accs) > 1 else ""
                vals.append(f"{np.mean(accs):.1f}{err}")
            else:
                vals.append("—")
        avg = f"{np.mean(means):.1f}" if len(means) == len(envs) else "—"
        lines.append("| " + " | ".join([m, s] + vals + [avg, PROTOCOL.get((m, s), "")]) + " |")
    return "\n".join(lines + ["", PLUS_MINUS])


def write(workdir: str | os.PathLike, rows: Sequence[dict], notes: str = "") -> str:
    """Write results.json ({"plus_minus": PLUS_MINUS, "rows": [per-trial rows]}) and results.md
    (the table); return the markdown."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    md = table(rows) + ("\n\n" + notes if notes else "") + "\n"
    write_text_atomic(workdir / "results.json",
                      json.dumps({"plus_minus": PLUS_MINUS, "rows": list(rows)}, indent=1))
    write_text_atomic(workdir / "results.md", md)
    return md


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a results.json ({"plus_minus": ..., "rows": [...]}, as `write` makes it)."""
    data = json.loads(pathlib.Path(path).read_text())
    if not isinstance(data, dict) or "rows" not in data:
        raise ValueError(f"{path} is not a rat_jax results.json (no 'rows'); rerun the selection "
                         "(python -m rat_jax.main with the same config and workdir) to rewrite it")
    return list(data["rows"])



# ---------------------------------------------------------------------------------------------
# The combined table of a sweep (rat_jax.sweep): one column per target dataset
# ---------------------------------------------------------------------------------------------
DATASET_PLUS_MINUS = (
    "A dataset's value is its target table's Avg (mean over its test envs of the per-env means "
    "over trials). ± : standard error over trials of the per-trial average over the test envs, "
    "std/√n with numpy's population std (ddof=0), as the 'Averages' table of DomainBed's "
    "collect_results; no ± for a single value (one trial, † rows). Avg: mean of the dataset "
    "columns; — : not done yet.")


def dataset_cell(rows: Sequence[dict], method: str, selection: str) -> dict | None:
    """One dataset's value for one (method, selection): {"mean", "stderr", "n_trials"} in %, or
    None when no trial has a row for every test env of `rows`. Per trial, the mean over the test
    envs; then the mean and standard error over trials (DomainBed's collect_results
    'Averages')."""
    envs = sorted({r["test_env"] for r in rows})
    by_trial: dict = defaultdict(dict)
    for r in rows:
        if (r["method"], r["selection"]) == (method, selection):
            by_trial[r["trial"]][r["test_env"]] = 100.0 * r["accuracy"]
    averages = [np.mean([accs[e] for e in envs]) for _, accs in sorted(by_trial.items())
                if envs and all(e in accs for e in envs)]
    if not averages:
        return None
    return {"mean": float(np.mean(averages)), "n_trials": len(averages),
            "stderr": standard_error(averages) if len(averages) > 1 else None}


def combined_cells(results: dict) -> list[dict]:
    """`results`: {dataset: its rows, or None while pending}, in column order. Every
    (method, selection, dataset) cell that has a value, as dicts with method, selection,
    dataset, mean, stderr, n_trials (mean and stderr in %)."""
    cells = []
    for dataset, rows in results.items():
        for m, s in _methods([r for rs in results.values() if rs for r in rs]):
            cell = dataset_cell(rows or [], m, s)
            if cell is not None:
                cells.append(dict(method=m, selection=s, dataset=dataset, **cell))
    return cells


def _methods(rows: Sequence[dict]) -> list[tuple]:
    present = {(r["method"], r["selection"]) for r in rows}
    ordered = [(m, s) for m, s, _ in ROW_ORDER if (m, s) in present]
    return ordered + sorted(present - set(ordered))


def combined_table(results: dict) -> str:
    """The paper's layout: rows = methods (ROW_ORDER), columns = the datasets of `results`
    ({dataset: rows or None}, in column order) and their average; a pending dataset's cells are
    "—". The line DATASET_PLUS_MINUS under it says what a cell and ± are."""
    datasets = list(results)
    all_rows = [r for rs in results.values() if rs for r in rs]
    methods = [(m, s) for m, s, _ in ROW_ORDER]
    methods += [k for k in _methods(all_rows) if k not in methods]
    cells = {(c["method"], c["selection"], c["dataset"]): c for c in combined_cells(results)}
    head = ["Algorithm", "Selection"] + datasets + ["Avg", "Test protocol"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, s in methods:
        vals, means = [], []
        for d in datasets:
            c = cells.get((m, s, d))
            if c is None:
                vals.append("—")
                continue
            means.append(c["mean"])
            vals.append(f"{c['mean']:.1f}" + (f" ± {c['stderr']:.1f}" if c["stderr"] is not None
                                              else ""))
        avg = f"{np.mean(means):.1f}" if datasets and len(means) == len(datasets) else "—"
        lines.append("| " + " | ".join([m, s] + vals + [avg, PROTOCOL.get((m, s), "")]) + " |")
    return "\n".join(lines + ["", DATASET_PLUS_MINUS])


def write_combined(root: str | os.PathLike, results: dict, notes: str = "") -> str:
    """Write a sweep's results.md (combined_table + notes) and results.json ({"plus_minus",
    "datasets", "pending", "cells", "rows": every target's per-trial rows}) under `root`; return
    the markdown. `read_rows` reads the rows back."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    md = combined_table(results) + ("\n\n" + notes if notes else "") + "\n"
    data = {"plus_minus": DATASET_PLUS_MINUS, "datasets": list(results),
            "pending": [d for d, rows in results.items() if rows is None],
            "cells": combined_cells(results),
            "rows": [r for rows in results.values() if rows for r in rows]}
    write_text_atomic(root / "results.json", json.dumps(data, indent=1))
    write_text_atomic(root / "results.md", md)
    return md
