"""python -m rat_jax.records --workdir W --out DIR

DomainBed's record layout for a whole target or sweep workdir: `DIR/<run>/results.jsonl`, one
folder per member, which is what DomainBed's `collect_results --input_dir DIR` reads
(`reporting.load_records`: `input_dir/*/results.jsonl`). The records stay in the workdir: each
`results.jsonl` in DIR is a symbolic link to a member's file; no weights are copied.

Labels (`args.algorithm`, one of the keys DomainBed groups by) follow the official Model
Ratatouille code, where each sweep is its own input_dir (docs/protocol.md §1.7): the no-aux
members are `ERM` (MR's `_noaux` sweep); the aux-init members and the foundation-init members
are `Ratatouille` (the `_withaux` sweep holds the runs its init rule starts from ImageNet,
§1.4.5); the fusing members are `Fusing`. A foundation-init member belongs to both: its `ERM`
folder links its records, and its `Ratatouille` folder holds the same records with
`args.algorithm` set to "Ratatouille" (the only file this writes). rat_jax trains the
aux-init members for exactly the hparams seeds the init rule does not start from the
foundation, so the foundation-init members are the no-aux members whose hparams seed no
aux-init member of the same run has (none when the run has no aux-init member: no Ratatouille).

Only finished members runs (their `done.json`) are exported. Imports no JAX.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

from rat_jax import runs, status, sweep
from rat_jax.files import write_text_atomic

RESULTS = "results.jsonl"
COPY_LABEL = "Ratatouille"


def _first_record(path: pathlib.Path) -> dict:
    with open(path) as f:
        line = f.readline()
    if not line.strip():
        raise ValueError(f"{path} holds no record; rerun the workdir's config to finish it")
    return json.loads(line)


def _scored(path: pathlib.Path, test_envs) -> bool:
    """Whether some record holds every test env's in-split accuracy (lean records fill it at
    the best and last steps only; a run made without it has the keys nowhere)."""
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if all(rec.get(f"env{k}_in_acc") is not None for k in test_envs):
                    return True
    return False


def run_entries(run_dir: pathlib.Path, prefix: str) -> list[tuple[str, pathlib.Path, str]]:
    """(folder name, member results.jsonl, its label) of one finished members run: one entry per
    member, plus a `Ratatouille` entry for each foundation-init member."""
    members = sorted(run_dir.glob(f"member_*/{RESULTS}"),
                     key=lambda p: int(p.parent.name.split("_")[1]))
    args = {p: _first_record(p)["args"] for p in members}
    aux_h = {a["hparams_seed"] for a in args.values() if a["algorithm"] == COPY_LABEL}
    out = []
    for path, a in args.items():
        name = f"{prefix}_{path.parent.name}"
        out.append((f"{name}_{a['algorithm']}", path, a["algorithm"]))
        if aux_h and a["algorithm"] == "ERM" and a["hparams_seed"] not in aux_h:
            out.append((f"{name}_{COPY_LABEL}", path, COPY_LABEL))
    return out


def workdir_entries(workdir: str | os.PathLike) -> tuple[list, list[str]]:
    """Every entry of the workdir's finished target runs (a single target or a sweep's targets),
    and the names of the unfinished runs left out."""
    root = pathlib.Path(workdir).absolute()
    if not (root / "config.json").exists():
        raise ValueError(f"{root} has no config.json, so it is not a rat_jax workdir; pass the "
                         "--workdir a run or sweep wrote")
    cfg = status.load_config(root)
    entries, unfinished = [], []
    for target_dir in runs.target_dirs(cfg, root).values():
        for run_dir in sorted((target_dir / "target").glob("*")):
            if not run_dir.is_dir():
                continue
            if not (run_dir / "done.json").exists():
                unfinished.append(str(run_dir.relative_to(root)))
                continue
            entries += run_entries(run_dir, run_dir.name)
    return entries, unfinished


def _relabelled(path: pathlib.Path, algorithm: str) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            record["args"] = dict(record["args"], algorithm=algorithm)
            lines.append(json.dumps(record, sort_keys=True) + "\n")
    return "".join(lines)


def write_records(workdir: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write DIR/<run>/results.jsonl for every member of the workdir's finished target runs.
    Returns {"records": {algorithm: folders}, "unfinished": [runs left out], "unscored":
    [folders whose records lack the test env's in-split accuracy]}."""
    entries, unfinished = workdir_entries(workdir)
    out = pathlib.Path(out).absolute()
    names = {name for name, _, _ in entries}
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in names)
        if foreign:
            raise ValueError(f"--out {out} holds {foreign[:3]}, which are not records of "
                             f"{workdir}; pass a new or empty folder (DomainBed reads every "
                             "sub-folder of it)")
    counts: dict[str, int] = {}
    unscored = []
    for name, src, algorithm in entries:
        first = _first_record(src)
        if not _scored(src, first["args"]["test_envs"]):
            unscored.append(name)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / RESULTS
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        if algorithm == first["args"]["algorithm"]:
            dest.symlink_to(src.absolute())
        else:
            write_text_atomic(dest, _relabelled(src, algorithm))
        counts[algorithm] = counts.get(algorithm, 0) + 1
    return {"records": counts, "unfinished": unfinished, "unscored": unscored}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a run or sweep workdir")
    p.add_argument("--out", required=True, help="the records folder to write (DomainBed's "
                   "collect_results --input_dir)")
    a = p.parse_args(argv)
    try:
        res = write_records(a.workdir, a.out)
    except ValueError as err:
        raise SystemExit(f"rat_jax.records: {err}") from None
    total = sum(res["records"].values())
    print(f"{total} member records in {a.out}: " + ", ".join(
        f"{n} {alg}" for alg, n in sorted(res["records"].items())))
    if res["unfinished"]:
        print(f"left out, not finished: {', '.join(res['unfinished'])}")
    if res["unscored"]:
        print(f"warning: {len(res['unscored'])} folders' records hold no test-env "
              "env<k>_in_acc, which DomainBed's selection reports; rerun their config in a "
              "new workdir to record it")
    print(f"DomainBed: python -m domainbed.scripts.collect_results --input_dir {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
