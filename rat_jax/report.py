"""The paper's table from result rows: rows = methods, columns = test envs + average,
mean ± std over trials; written as results.md and results.json in the workdir."""
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


def make_row(method, selection, dataset, test_env, trial, accuracy, n_members, **extra) -> dict:
    row = dict(method=method, selection=selection, dataset=dataset, test_env=int(test_env),
               trial=int(trial), accuracy=float(accuracy), n_members=int(n_members))
    row.update(extra)
    return row


def table(rows: Sequence[dict]) -> str:
    """Markdown table: accuracy in %, mean ± std over trials per test env, then the average."""
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
                sd = f" ± {np.std(accs):.1f}" if len(accs) > 1 else ""
                vals.append(f"{np.mean(accs):.1f}{sd}")
            else:
                vals.append("—")
        avg = f"{np.mean(means):.1f}" if len(means) == len(envs) else "—"
        lines.append("| " + " | ".join([m, s] + vals + [avg, PROTOCOL.get((m, s), "")]) + " |")
    return "\n".join(lines)


def write(workdir: str | os.PathLike, rows: Sequence[dict], notes: str = "") -> str:
    """Write results.json (list of rows) and results.md (the table); return the markdown."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    md = table(rows) + ("\n\n" + notes if notes else "") + "\n"
    write_text_atomic(workdir / "results.json", json.dumps(list(rows), indent=1))
    write_text_atomic(workdir / "results.md", md)
    return md

