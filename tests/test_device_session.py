"""launch/prepare_device.py + launch/device_session.sh: the offline accelerator session, rehearsed
on CPU (DEVICE_SESSION_TINY=1) with a PACS subset prepared the way the real session's is."""
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import PACS_ROOT

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_prepare_copies_the_first_files_of_every_class(tmp_path):
    if not os.path.isdir(PACS_ROOT):
        pytest.skip(f"PACS not found at {PACS_ROOT}")
    out = tmp_path / "carry"
    res = subprocess.run([sys.executable, str(REPO / "launch" / "prepare_device.py"), "--pacs",
                          str(PACS_ROOT), "--per_class", "3", "--out", str(out), "--no_wheels"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    files = sorted(p for p in (out / "data" / "PACS").rglob("*") if p.is_file())
    assert len(files) == 4 * 7 * 3 and "84 PACS images" in res.stdout
    for f in files:  # unchanged copies of the first files (by name) of their class
        src = pathlib.Path(PACS_ROOT) / f.relative_to(out / "data" / "PACS")
        assert src.read_bytes() == f.read_bytes()
        assert src.name in sorted(p.name for p in src.parent.iterdir())[:3]


@pytest.mark.slow
def test_device_session_rehearsal_on_cpu(tmp_path):
    if not os.path.isdir(PACS_ROOT):
        pytest.skip(f"PACS not found at {PACS_ROOT}")
    carry = tmp_path / "carry"
    subprocess.run([sys.executable, str(REPO / "launch" / "prepare_device.py"), "--pacs",
                    str(PACS_ROOT), "--per_class", "6", "--out", str(carry), "--no_wheels"],
                   check=True, capture_output=True, timeout=300)
    env = dict(os.environ, DEVICE_SESSION_TINY="1", PYTHON=sys.executable, CARRY=str(carry),
               OUT=str(tmp_path / "out"))
    res = subprocess.run(["bash", str(REPO / "launch" / "device_session.sh")], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "| members | strategy | images/s |" in res.stdout          # device_check's table
    assert "Ratatouille | Greedy" in res.stdout                         # gpu_quick's table
    assert (tmp_path / "out" / "device_check.json").exists()
