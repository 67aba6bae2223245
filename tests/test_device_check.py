"""launch/device_check.py stays runnable: its --tiny mode on CPU (resnet_tiny, 32 px), its table."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "device_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path, *extra):
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--json", str(out), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())["rows"]


def _check(stdout, rows, members, strategies):
    parity = [r for r in rows if r["section"] == "parity"]
    assert [r["run"] for r in parity] == ["jax float32 highest", "jax bfloat16"]  # CPU: no TF32 row
    fp32, bf16 = parity
    assert fp32["max_rel"] < 1e-4 and bf16["max_rel"] < 5e-2 and bf16["top1_agree"] >= 0.75
    thr = [r for r in rows if r["section"] == "throughput"]
    assert {(r["members"], r["strategy"]) for r in thr} == {
        (m, s) for m in members for s in ["one by one"] + (strategies if m > 1 else [])}
    for r in thr:
        assert r["status"] == "ok", r
        assert r["images_per_s"] > 0 and r["xla_gib_per_member"] > 0
        assert r["vs_one_by_one"] > 0
    assert "| members | strategy | images/s |" in stdout and "Parity: resnet_tiny @ 32 px" in stdout
    feed = {r["mode"]: r for r in rows if r["section"] == "feed"}
    assert sorted(feed) == ["device", "host"] and all(r["img_per_s"] > 0 for r in feed.values())
    # uint8 windows + parameters against float32 images: fewer bytes per image
    assert feed["device"]["bytes_per_image"] < feed["host"]["bytes_per_image"] / 2  # 40-px canvas
    assert feed["device"]["device_finish_ms_per_image"] > 0
    assert f"Recommended local strategy on this device: {strategies[0]}" in stdout or (
        "Recommended local strategy on this device:" in stdout and len(strategies) > 1)


def test_tiny_on_cpu_one_strategy(tmp_path):
    """Parity rows, the one-by-one rows and one stacked strategy (three compiles)."""
    stdout, rows = _run(tmp_path, "--members", "1,2", "--strategies", "vmap")
    _check(stdout, rows, [1, 2], ["vmap"])


@pytest.mark.slow
def test_tiny_on_cpu_full(tmp_path):
    """`--tiny` as documented: M in {1, 2}, strategies map and vmap."""
    stdout, rows = _run(tmp_path)
    _check(stdout, rows, [1, 2], ["map", "vmap"])


def test_table_marks_oom_and_skipped_rows():
    dc = _load()
    rows = [dict(section="parity", arch="resnet50", image=224, weights="w", run="jax bfloat16",
                 reference="torch float32 (CPU)", max_abs=0.1, max_rel=0.01, top1_agree=1.0),
            dict(section="throughput", arch="resnet50", image=224, batch=32, dtype="bfloat16",
                 members=16, strategy="vmap", device="H200", status="OOM"),
            dict(section="throughput", arch="resnet50", image=224, batch=32, dtype="bfloat16",
                 members=16, strategy="map", device="H200", status="ok", step_s=0.5,
                 compile_s=30.0, images_per_s=1024.0, vs_one_by_one=1.2,
                 xla_gib_per_member=1.5, device_peak_gib=None),
            dict(section="throughput", arch="resnet50", image=224, batch=32, dtype="bfloat16",
                 members=16, strategy="loop", device="H200", status="skipped")]
    text = dc.table(rows, "header")
    assert "| 16 | vmap | OOM |" in text and "| 16 | loop | skipped |" in text
    assert "| 16 | map | 1024.0 | 1.20 | 500.0 | 30.0 | 1.50 | - |" in text
    args = dc.parse_args([])
    assert (args.arch, args.image, args.members) == ("resnet50", 224, "1,4,8,16")
    assert args.strategies == "loop,map,vmap"  # every local strategy on an accelerator
    assert args.parity_archs == "resnet50,efficientnet_lite0"
    # the recommendation: most images/s at the largest member count that ran
    assert dc.recommend(rows) == "map" and "Recommended local strategy on this device: map" in text
