"""End to end: `python -m rat_jax.main --config=configs/demo.py:smoke` and its resume."""
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

from rat_jax import report

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPECTED = {(m, s) for m, s, _ in report.ROW_ORDER}


def _run(workdir, *extra):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "rat_jax.main", f"--config={REPO}/configs/demo.py:smoke",
           f"--workdir={workdir}", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _table(stdout):
    return "\n".join(l for l in stdout.splitlines() if l.startswith("|"))


def test_demo_smoke_end_to_end_then_resume_without_training(tmp_path):
    out1 = _run(tmp_path)
    rows = report.read_rows(tmp_path / "results.json")   # {"plus_minus", "rows"}
    got = {(r["method"], r["selection"]) for r in rows}
    assert got == EXPECTED, EXPECTED - got
    for r in rows:
        assert math.isfinite(r["accuracy"]) and 0.0 <= r["accuracy"] <= 1.0, r
        assert set(report.ROW_KEYS) <= set(r)
    dagger = [r for r in rows if r["selection"] == "Uniform†"]
    assert all(r["trial"] == -1 and r["n_members"] == 2 * 3 for r in dagger)
    assert re.search(r"Member runs trained by this invocation: [1-9]", out1)
    assert (tmp_path / "results.md").read_text().strip().startswith("| Algorithm")
    # Each stage left its fingerprint; the aux pool has a manifest with dataset identities.
    manifest = json.loads((tmp_path / "aux" / "glyphs_notest" / "manifest.json").read_text())
    assert len(manifest) == 2 and manifest[0]["identity"].startswith("glyphs:")

    # The diagnostics of the first trial: four PNGs and their numbers, consistent with the rows.
    plots = tmp_path / "plots"
    for name in ("interpolation", "soup_vs_members", "idval_vs_ood", "diversity"):
        data = (plots / f"test0_trial0_{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    diag = json.loads((plots / "test0_trial0_diagnostics.json").read_text())
    members = diag["members"]
    inits = {m["init"].split("/")[0] for m in members}
    assert inits == {"foundation", "aux:glyphs", "aux:textures"}, inits
    assert len(diag["soup_vs_members"]["uniform_ood"]) == len(members)
    uniform_row = next(r for r in rows if r["method"] == "Ratatouille"
                       and r["selection"] == "Uniform" and r["trial"] == 0)
    gate_off = not uniform_row.get("gate_excluded")
    # with nobody left out by the gate, the last point of the curve is the uniform soup's row
    if gate_off:
        assert math.isclose(diag["soup_vs_members"]["uniform_ood"][-1], uniform_row["accuracy"])
    for curve in diag["lmc"].values():
        assert len(curve["acc"]) == 11 and curve["barrier"] >= 0.0
    div = diag["diversity"]["disagreement"]
    assert all(div[i][i] == 0.0 for i in range(len(div)))
    # the LMC gate ran before each uniform soup and its barriers are in the row
    assert set(uniform_row["gate_barriers"]) == {str(m["member"]) for m in members}

    # Finished runs keep their results, not their resume checkpoints; the config is recorded.
    assert not list(tmp_path.rglob("checkpoints"))
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert recorded["config"]["target"]["name"] == "digits" and recorded["argv"]

    out2 = _run(tmp_path)
    assert "Member runs trained by this invocation: 0." in out2
    assert _table(out2) == _table(out1)


def _run_capture(workdir, *extra):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "rat_jax.main", f"--config={REPO}/configs/demo.py:smoke",
           f"--workdir={workdir}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500, cwd=REPO)


def test_rerun_with_another_config_names_the_changed_fields(tmp_path):
    base = ["--config.target.test_envs=(1,)", "--config.trials=(0,)", "--config.make_plots=False"]
    assert _run_capture(tmp_path, *base).returncode == 0
    res = _run_capture(tmp_path, *base, "--config.lmc_gate.threshold=0.2")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "fields that differ: lmc_gate.threshold (0.05 -> 0.2)" in res.stderr
    assert "Member runs trained by this invocation: 0." in res.stdout  # selection only


def test_config_override_and_bad_test_env_is_a_clear_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "rat_jax.main", f"--config={REPO}/configs/demo.py:smoke",
           f"--workdir={tmp_path}", "--config.target.test_envs=(7,)"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert res.returncode != 0
    assert "config.target.test_envs has 7" in res.stderr
