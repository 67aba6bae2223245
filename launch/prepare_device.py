"""Prepare an offline accelerator bundle (run where pip can download): the wheels of setup.py's
install_requires that the accelerator's image lacks (and their own missing requirements), and the
largest PACS subset that keeps the whole bundle under --max-mb, in one git-ignored folder
(default `device_carry/`) that travels with the working tree.

    python launch/prepare_device.py --max-mb 60 [--data ../shared/datasets/PACS]
    # then, on the accelerator machine (device_carry carried): bash launch/device_session.sh

What the image holds: --have (a file with one package name per line, or a comma-separated list;
default launch/device_image.txt, the image's package list from the device documentation).
Wheels are for --python-version (default 3.12) on manylinux x86_64 (pure-Python ones for any).
Data: `data/PACS/<domain>/<class>/`: the first --per-class files (sorted by name) of every class
of every domain, copied unchanged; --per-class 0 (default) picks the most that fit, at most 40.
The subset is a different dataset identity from PACS (its numbers are not PACS's): it serves the
input-path rows, the augmentation comparison and a timing run, not a result.
"""
from __future__ import annotations

import argparse
import ast
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_HAVE = REPO / "launch" / "device_image.txt"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
MAX_PER_CLASS = 40
PYTHON_VERSION = "3.12"  # the device's Python (--python-version)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def install_requires(setup_py: pathlib.Path = REPO / "setup.py") -> list[str]:
    """setup.py's INSTALL_REQUIRES list (read, not executed)."""
    for node in ast.walk(ast.parse(setup_py.read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "INSTALL_REQUIRES"
                                                for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise SystemExit(f"{setup_py}: no INSTALL_REQUIRES list")


def read_have(spec: str) -> set[str]:
    """Canonical names from a file (one per line, # comments) or a comma-separated list."""
    path = pathlib.Path(spec)
    if path.is_file():
        names = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    elif "," in spec or re.fullmatch(r"[A-Za-z0-9_.\-]+", spec):
        names = spec.split(",")
    else:
        raise SystemExit(f"--have {spec}: not a file and not a comma-separated list of names")
    return {canonical(n) for n in names if n.strip()}


def missing(requirements, have: set[str]) -> list[str]:
    """The requirements (strings) whose package is not in `have`, markers evaluated for the
    device (Linux x86_64, --python-version) and `extra` requirements left out."""
    from packaging.requirements import Requirement
    out = []
    for text in requirements:
        req = Requirement(text)
        env = dict(python_version=PYTHON_VERSION, python_full_version=PYTHON_VERSION + ".0",
                   sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
                   os_name="posix", implementation_name="cpython", extra="")
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        if canonical(req.name) not in have:
            out.append(str(req).split(";")[0].strip())
    return out



def wheel_requires(wheel: pathlib.Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8", "replace")
    return [line.split(":", 1)[1].strip() for line in text.splitlines()
            if line.startswith("Requires-Dist:")]


def wheel_name(wheel: pathlib.Path) -> str:
    return canonical(wheel.name.split("-")[0])


def download(specs: list[str], folder: pathlib.Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", PYTHON_VERSION, "--implementation", "cp", "-d", str(folder)]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    subprocess.run(cmd + specs, check=True)


def fetch_wheels(have: set[str], folder: pathlib.Path, fetch=download) -> list[str]:
    """Wheels of what setup.py needs and `have` lacks, then of what those wheels need and `have`
    lacks, until nothing is missing; the names fetched."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = missing(install_requires(), have)
    while todo:
        fetch(todo, folder)
        got = {wheel_name(w) for w in folder.glob("*.whl")}
        needs = [r for w in folder.glob("*.whl") for r in wheel_requires(w)]
        todo = [r for r in missing(needs, have | got)]
        todo = list(dict.fromkeys(todo))
        if any(canonical(re.split(r"[<>=!~ \[]", r)[0]) in got for r in todo):
            raise SystemExit(f"wheels in {folder} do not cover their own requirements: {todo}")
    return sorted(wheel_name(w) for w in folder.glob("*.whl"))


def class_files(data: pathlib.Path) -> list[list[pathlib.Path]]:
    """Every <domain>/<class>/ folder's files, sorted by name."""
    domains = sorted(p for p in data.iterdir() if p.is_dir()) if data.is_dir() else []
    if not domains:
        raise SystemExit(f"--data {data}: no domain folders (expected DomainBed's PACS layout "
                         "<domain>/<class>/<image>); pass the PACS folder")
    return [sorted(f for f in c.iterdir() if f.is_file())
            for d in domains for c in sorted(p for p in d.iterdir() if p.is_dir())]


def fitting_per_class(classes, budget_bytes: float, cap: int = MAX_PER_CLASS) -> int:
    """The most files per class (<= cap) whose first-k copies fit `budget_bytes`."""
    best, total = 0, 0
    for k in range(1, cap + 1):
        total += sum(files[k - 1].stat().st_size for files in classes if len(files) >= k)
        if total > budget_bytes:
            break
        best = k
    return best


def copy_subset(data: pathlib.Path, out: pathlib.Path, per_class: int) -> int:
    """The first `per_class` files of every <domain>/<class>/ of `data` under `out`; the count."""
    n = 0
    for files in class_files(data):
        for f in files[:per_class]:
            target = out / f.parent.parent.name / f.parent.name / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
            n += 1
    return n


def folder_mb(path: pathlib.Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2 ** 20


def default_data() -> str:
    root = os.environ.get("DOMAINBED_DATA")
    return str(pathlib.Path(root) / "PACS") if root else str(REPO.parent / "shared" / "datasets"
                                                             / "PACS")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-mb", type=float, required=True,
                   help="size limit of the whole bundle in MiB (what the device may carry)")
    p.add_argument("--data", "--pacs", default=default_data(), help="DomainBed's PACS folder")
    p.add_argument("--per-class", "--per_class", type=int, default=0,
                   help="files per class (0: the most that fit, at most 40)")
    p.add_argument("--have", default=str(DEFAULT_HAVE),
                   help="packages the device image holds: a file or a comma-separated list")
    p.add_argument("--python-version", default=PYTHON_VERSION, help="the device's Python")
    p.add_argument("--out", default=str(REPO / "device_carry"))
    p.add_argument("--no-wheels", "--no_wheels", action="store_true", help="only the data")
    a = p.parse_args(argv)
    if a.max_mb <= 0:
        p.error(f"--max-mb {a.max_mb}: give the bundle's size limit in MiB (> 0)")
    return a


def main(argv=None) -> int:
    global PYTHON_VERSION
    a = parse_args(argv)
    PYTHON_VERSION = a.python_version
    out, data = pathlib.Path(a.out), pathlib.Path(a.data)
    classes = class_files(data)  # fails early on a bad --data
    if out.exists():
        shutil.rmtree(out)
    wheels = [] if a.no_wheels else fetch_wheels(read_have(a.have), out / "wheels")
    left = a.max_mb * 2 ** 20 - (folder_mb(out) * 2 ** 20 if out.exists() else 0)
    per_class = a.per_class or fitting_per_class(classes, left * 0.98)
    if per_class < 1:
        print(f"--max-mb {a.max_mb}: the wheels leave no room for data", file=sys.stderr)
        return 1
    n = copy_subset(data, out / "data" / "PACS", per_class)
    mb = folder_mb(out)
    print(f"{out}: wheels {', '.join(wheels) or '(none)'}; {n} PACS images ({per_class} per "
          f"class); {mb:.1f} MiB in all (limit {a.max_mb:g})")
    if mb > a.max_mb:
        print(f"more than --max-mb {a.max_mb:g} MiB: lower --per-class", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
