"""launch/device_check.py stays runnable: its --tiny mode on CPU prints every row kind and writes
the JSON and the table; its row runner, plan and table."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from conftest import load_script

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "device_check.py"


def _load():
    return load_script(SCRIPT)


def _run(tmp_path, *extra):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONUNBUFFERED"] = "1"
    # the suite's persistent compilation cache (tests/conftest.py), not a new one per run: the
    # rows after the first compile what the last run compiled (the first row always compiles)
    cache = jax.config.jax_compilation_cache_dir
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out), "--work",
                           str(tmp_path / "work"), "--cache-dir", cache, *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["device_check.json", "device_check.md"]
    rows = json.loads((out / "device_check.json").read_text())["rows"]
    for r in rows:
        assert r["status"] == "ok", r
    return proc.stdout, rows


def _check_kinds(stdout, rows, kinds):
    assert [k for k in dict.fromkeys(r["kind"] for r in rows)] == kinds
    names = [r["name"] for r in rows if r["kind"] == "input"]
    assert [n[:3] for n in names] == ["(a)", "(b)", "(c)"]
    for r in rows:  # each row printed as measured, and in the final table
        assert f"{r['kind']:10s} {r['name']}: {r['value']}" in stdout
        assert f"| {r['kind']} | {r['name']} | {r['value']} |" in stdout
    by = {r["kind"]: r for r in reversed(rows)}  # the first row of each kind
    assert by["step"]["images_per_s"] > 0 and by["step"]["batch"] == 6
    assert by["augment"]["max_abs"] == 0 and by["augment"]["crops"] >= 64
    assert by["members"]["within"] and by["loader"]["images_per_s"] > 0
    assert by["eval"]["seconds"] > 0 and by["checkpoint"]["mb"] > 0
    # uint8 windows + parameters: fewer bytes than the float32 images of (a)
    b = next(r for r in rows if r["name"].startswith("(b)"))  # 5 kB vs 12 kB
    assert b["bytes_per_image"] < 32 * 32 * 3 * 4 / 2


def test_tiny_on_cpu_row_kinds(tmp_path):
    """Every row kind but parity and e2e (the slow test runs them), one dtype and strategy."""
    stdout, rows = _run(tmp_path, "--dtypes", "float32", "--strategies", "loop",
                        "--domainnet-batch", "0", "--parity-archs", "", "--e2e-steps", "0")
    _check_kinds(stdout, rows, ["step", "input", "loader", "eval", "checkpoint", "augment",
                                "members"])
    steps = [(r["members"], r["strategy"], r["dtype"]) for r in rows if r["kind"] == "step"]
    assert steps == [(2, "loop", "float32"), (1, "loop", "float32")]


@pytest.mark.slow
def test_tiny_on_cpu_full(tmp_path):
    """`--tiny` as documented: both dtypes and strategies, the DomainNet-shaped row, parity and
    the target-only run."""
    stdout, rows = _run(tmp_path)
    _check_kinds(stdout, rows, ["step", "input", "loader", "eval", "checkpoint", "augment",
                                "members", "parity", "e2e"])
    steps = [r for r in rows if r["kind"] == "step"]
    assert (steps[0]["members"], steps[0]["strategy"], steps[0]["dtype"]) == (2, "map",
                                                                              "bfloat16")
    assert steps[-1]["classes"] == 345 and steps[-1]["batch"] == 10
    assert {(r["strategy"], r["dtype"]) for r in steps if r["members"] == 2} >= {
        ("map", "float32"), ("loop", "bfloat16")}
    e2e = rows[-1]
    assert e2e["kind"] == "e2e" and e2e["seconds_per_member_step"] > 0 and e2e["members"] == 2
    assert not str(e2e["log"]).startswith(str(tmp_path / "out"))


def test_rows_fail_and_skip_one_by_one(tmp_path, capsys):
    dc = _load()
    check = dc.Check("header", budget=100.0, out=str(tmp_path))

    def boom():
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate\nmore")
    check.row("step", "oom", boom)
    check.row("step", "bad", lambda: 1 / 0)
    check.row("step", "too long", lambda: {"value": "x"}, need=90.0, keep=20.0)
    check.row("eval", "fine", lambda: {"value": "1.00 s", "detail": "d"})
    status = [r["status"] for r in check.rows]
    assert status[0] == "OOM" and status[1] == "error: ZeroDivisionError: division by zero"
    assert status[2].startswith("skipped (needs ~90 s,") and status[3] == "ok"
    printed = capsys.readouterr().out
    assert "step       oom: OOM" in printed and "eval       fine: 1.00 s  (d)" in printed
    saved = json.loads((tmp_path / "device_check.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["oom", "bad", "too long", "fine"]
    assert "| step | oom | OOM |  |" in (tmp_path / "device_check.md").read_text()


def test_plan_defaults_reference_first():
    dc = _load()
    args = dc.parse_args([])
    assert (args.arch, args.image, args.batch) == ("resnet50", 224, 96)
    assert args.budget + 25 < 7 * 60 and args.e2e_steps == 150
    shapes = dc.step_shapes(args)
    assert [(s.members, s.strategy, s.dtype, s.batch, s.classes) for s in shapes] == [
        (7, "map", "bfloat16", 96, 7), (1, "map", "bfloat16", 96, 7),
        (7, "map", "float32", 96, 7), (1, "map", "float32", 96, 7),
        (7, "loop", "bfloat16", 96, 7), (7, "loop", "float32", 96, 7),
        (7, "map", "bfloat16", 160, 345)]
    rows = [dict(kind="step", status="ok", members=7, strategy="map", dtype="bfloat16",
                 classes=7, images_per_s=900.0),
            dict(kind="step", status="ok", members=7, strategy="loop", dtype="bfloat16",
                 classes=7, images_per_s=1000.0),
            dict(kind="step", status="ok", members=7, strategy="map", dtype="bfloat16",
                 classes=345, images_per_s=2000.0)]
    assert dc.recommend(rows) == "loop bfloat16 (M=7, 1000 img/s)"
    with pytest.raises(SystemExit, match="--members, --strategies and --dtypes"):
        dc.step_shapes(dc.parse_args(["--dtypes", ""]))
