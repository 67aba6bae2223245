"""The paper's table from result rows: rows = methods, columns = test envs + average, mean ±
standard error over trials as DomainBed's collect_results computes it (`standard_error`);
written as results.md and results.json in the workdir."""
from __future__ import annotations

import json
import os
import pathlib
from collections import defaultdict
from typing import Sequence

import numpy as np

from rat_jax.files import write_text_atomic

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
    """The rows of a results.json: the current {"plus_minus", "rows"} object, or the plain list
    of rows that earlier versions wrote (their tables' ± was numpy's std, not a standard error)."""
    data = json.loads(pathlib.Path(path).read_text())
    return list(data["rows"] if isinstance(data, dict) else data)

