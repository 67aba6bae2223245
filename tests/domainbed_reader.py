"""A small stand-in of DomainBed's record reader (facebookresearch/DomainBed), for tests.

It mirrors, function by function:
- `domainbed/lib/reporting.py`: `load_records` (every `input_dir/*/results.jsonl`, in
  `os.listdir` order) and `get_grouped_records` (groups by trial_seed, dataset, algorithm,
  test env);
- `domainbed/model_selection.py`: `get_test_records` and `IIDAccuracySelectionMethod`
  (training-domain validation: per run, i.e. per `args.hparams_seed`, the record with the best
  mean of the train envs' `env{i}_out_acc`; then the run with the best such value; its test
  env's `env{k}_in_acc`), through `SelectionMethod.hparams_accs` and `sweep_acc`;
- `domainbed/scripts/collect_results.py`: `format_mean` and the per-dataset tables of
  `print_results_tables` (one row per algorithm, one column per test env, then Avg).
What differs: records are plain dicts and lists instead of DomainBed's `Q` query class; the
environments of a dataset are counted from its records (DomainBed looks them up in
`domainbed/datasets.py`, which does not know rat_jax's embedded datasets), and the algorithm
rows are in first-seen order (DomainBed puts its `ALGORITHMS` first).
"""
from __future__ import annotations

import collections
import itertools
import json
import os

import numpy as np


def load_records(path):
    records = []
    for subdir in os.listdir(path):
        results_path = os.path.join(path, subdir, "results.jsonl")
        try:
            with open(results_path, "r") as f:
                for line in f:
                    records.append(json.loads(line[:-1]))
        except IOError:
            pass
    return records


def get_grouped_records(records):
    result = collections.defaultdict(list)
    for r in records:
        for test_env in r["args"]["test_envs"]:
            group = (r["args"]["trial_seed"], r["args"]["dataset"], r["args"]["algorithm"],
                     test_env)
            result[group].append(r)
    return [{"trial_seed": t, "dataset": d, "algorithm": a, "test_env": e, "records": r}
            for (t, d, a, e), r in result.items()]


def get_test_records(records):
    return [r for r in records if len(r["args"]["test_envs"]) == 1]


class IIDAccuracySelectionMethod:
    name = "training-domain validation"

    @classmethod
    def _step_acc(cls, record):
        test_env = record["args"]["test_envs"][0]
        val_env_keys = []
        for i in itertools.count():
            if f"env{i}_out_acc" not in record:
                break
            if i != test_env:
                val_env_keys.append(f"env{i}_out_acc")
        return {"val_acc": np.mean([record[key] for key in val_env_keys]),
                "test_acc": record[f"env{test_env}_in_acc"]}

    @classmethod
    def run_acc(cls, run_records):
        test_records = get_test_records(run_records)
        if not test_records:
            return None
        return max((cls._step_acc(r) for r in test_records), key=lambda x: x["val_acc"])

    @classmethod
    def hparams_accs(cls, records):
        by_seed = collections.defaultdict(list)
        for r in records:
            by_seed[r["args"]["hparams_seed"]].append(r)
        accs = [(cls.run_acc(rs), rs) for rs in by_seed.values()]
        accs = [x for x in accs if x[0] is not None]
        return sorted(accs, key=lambda x: x[0]["val_acc"])[::-1]

    @classmethod
    def sweep_acc(cls, records):
        accs = cls.hparams_accs(records)
        return accs[0][0]["test_acc"] if accs else None


def format_mean(data):
    if len(data) == 0:
        return None, None, "X"
    mean = 100 * np.mean(list(data))
    err = 100 * np.std(list(data) / np.sqrt(len(data)))
    return mean, err, "{:.1f} +/- {:.1f}".format(mean, err)


def results_tables(records, selection_method):
    """`print_results_tables`' per-dataset tables as text, and the grouped records with their
    `sweep_acc`."""
    grouped = [dict(g, sweep_acc=selection_method.sweep_acc(g["records"]))
               for g in get_grouped_records(records)]
    grouped = [g for g in grouped if g["sweep_acc"] is not None]
    alg_names = list(dict.fromkeys(r["args"]["algorithm"] for r in records))
    lines = []
    for dataset in sorted({r["args"]["dataset"] for r in records}):
        n_envs = max(int(k[3:].split("_")[0]) + 1 for r in records
                     if r["args"]["dataset"] == dataset for k in r if k.endswith("_out_acc"))
        lines += [f"-------- Dataset: {dataset}, model selection method: {selection_method.name}",
                  "Algorithm | " + " | ".join(f"env{e}" for e in range(n_envs)) + " | Avg"]
        for algorithm in alg_names:
            means, cells = [], []
            for test_env in range(n_envs):
                accs = [g["sweep_acc"] for g in grouped if (g["dataset"], g["algorithm"],
                        g["test_env"]) == (dataset, algorithm, test_env)]
                mean, _, cell = format_mean(accs)
                means.append(mean)
                cells.append(cell)
            avg = "X" if None in means else "{:.1f}".format(sum(means) / len(means))
            lines.append(" | ".join([algorithm, *cells, avg]))
    return "\n".join(lines), grouped
