"""python -m rat_jax.status --workdir DIR [--config configs/NAME.py[:VARIANT]] [--json]

What a run or sweep workdir holds, without JAX (nothing here imports it; no device is touched):
every members run the config implies (rat_jax.run_model.planned_runs) as done (its done.json),
partial (its step: the Orbax step folders under <run>/checkpoints/, else the last record of its
member_*/results.jsonl) or pending; each target's table; and the time left at the last measured
rate (the `step_time` of the newest record). The config is the workdir's config.json (written
when a run starts); before the first run, pass the config file with --config (no overrides).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

from absl import flags
from ml_collections import config_flags

from rat_jax import report, sweep
from rat_jax import runs as run_model


def load_config(workdir: pathlib.Path, config_file: str | None = None) -> dict:
    """The config of `workdir` as a plain dict: its config.json, else `config_file`
    ("path.py[:variant]", loaded by ml_collections' config_flags as rat_jax.main loads it)."""
    recorded = workdir / "config.json"
    if recorded.exists():
        return json.loads(recorded.read_text())["config"]
    if not config_file:
        raise SystemExit(f"rat_jax.status: {recorded} does not exist (no run has started in "
                         f"{workdir}); pass --config=configs/NAME.py[:VARIANT]")
    flag_values = flags.FlagValues()
    from rat_jax import runtime
    runtime.config_package_on_path(config_file)  # `from configs import common` from anywhere
    config_flags.DEFINE_config_file("config", flag_values=flag_values)
    flag_values(["rat_jax.status", f"--config={config_file}"])
    return flag_values.config.to_dict()


def _last_record(path: pathlib.Path) -> dict | None:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
    return None


def run_state(run: run_model.PlannedRun) -> dict:
    """{"state": done / partial / pending, "step": steps done (None when pending), ...} of one
    planned run, from its folder."""
    p = run.path
    out = {"stage": run.stage, "dataset": run.dataset, "name": run.name, "path": str(p),
           "members": run.members, "steps": run.steps, "state": "pending", "step": None,
           "checkpoint_step": None, "record_step": None, "step_time": None, "record_mtime": None}
    records = sorted(p.glob("member_*/results.jsonl"))
    if records:
        newest = max(records, key=lambda f: f.stat().st_mtime)
        last = _last_record(newest)
        if last is not None:
            out.update(record_step=int(last["step"]) + 1, step_time=last.get("step_time"),
                       record_mtime=newest.stat().st_mtime)
    if (p / "done.json").exists():
        return dict(out, state="done", step=run.steps)
    ckpts = [int(d.name) for d in (p / "checkpoints").glob("*") if d.is_dir() and d.name.isdigit()]
    if ckpts:
        out["checkpoint_step"] = max(ckpts) + 1  # checkpoint of step s: s + 1 steps done
    done = out["checkpoint_step"] or out["record_step"]
    if done is not None:
        out.update(state="partial", step=done)
    return out


def status(workdir: str | pathlib.Path, config_file: str | None = None) -> dict:
    """Every planned run's state, each target's table, the time left (a dict; `format` prints
    it)."""
    root = pathlib.Path(workdir).absolute()
    cfg = load_config(root, config_file)
    runs = [run_state(r) for r in run_model.planned_runs(cfg, root)]
    tables = {}
    for t, d in run_model.target_dirs(cfg, root).items():
        path = d / "results.json"
        tables[t] = report.read_rows(path) if path.exists() else None
    timed = [r for r in runs if r["step_time"]]
    rate = None
    if timed:
        last = max(timed, key=lambda r: r["record_mtime"])
        rate = {"member_steps_per_s": last["members"] / last["step_time"], "run": last["name"],
                "step": last["record_step"]}
    left = sum((r["steps"] - (r["step"] or 0)) * r["members"] for r in runs
               if r["state"] != "done")
    return {"workdir": str(root), "sweep": run_model.is_sweep(cfg), "targets": list(tables),
            "runs": runs, "tables": {t: "done" if rows is not None else "pending"
                                     for t, rows in tables.items()},
            "rows": tables, "member_steps_left": left, "rate": rate,
            "seconds_left": left / rate["member_steps_per_s"] if rate else None}


def format_status(st: dict) -> str:
    root = pathlib.Path(st["workdir"])
    kind = (f"sweep of {len(st['targets'])} targets ({', '.join(st['targets'])})"
            if st["sweep"] else f"target {st['targets'][0]}")
    lines = [f"rat_jax status: {root} ({kind})", "",
             "| stage | dataset | run | state | step | members |", "|---|---|---|---|---|---|"]
    for r in st["runs"]:
        try:
            where = str(pathlib.Path(r["path"]).relative_to(root))
        except ValueError:
            where = r["path"]
        step = "" if r["step"] is None else f"{r['step']}/{r['steps']}"
        if r["state"] == "partial":
            step += (" (checkpoint)" if r["checkpoint_step"] else " (last record)")
        lines.append(f"| {r['stage']} | {r['dataset']} | {where} | {r['state']} | {step} | "
                     f"{r['members']} |")
    counts = {s: sum(r["state"] == s for r in st["runs"]) for s in ("done", "partial", "pending")}
    lines += ["", f"Runs: {counts['done']} done, {counts['partial']} partial, "
                  f"{counts['pending']} pending (of {len(st['runs'])}); "
                  f"member-steps left: {st['member_steps_left']:,}."]
    if st["rate"]:
        lines.append(f"Time left at the last measured rate ({st['rate']['member_steps_per_s']:.3g}"
                     f" member-steps/s, {st['rate']['run']} at step {st['rate']['step']}): about "
                     f"{report.duration(st['seconds_left'])} (training steps only; evaluation, "
                     "selection and compilation not counted; other runs' rates differ).")
    else:
        lines.append("Time left: no rate measured yet (no member record in the workdir).")
    lines.append("Tables: " + ", ".join(f"{t} {s}" for t, s in st["tables"].items()) + ".")
    if st["sweep"]:
        lines += ["", report.combined_table(st["rows"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--config", default=None,
                   help="config file (NAME.py[:VARIANT]) when the workdir has no config.json yet")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    a = p.parse_args(argv)
    st = status(a.workdir, a.config)
    if a.json:
        print(json.dumps({k: v for k, v in st.items() if k != "rows"}, indent=1))
    else:
        print(format_status(st))
    return 0


if __name__ == "__main__":
    sys.exit(main())
