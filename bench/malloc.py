"""The CPU member step a config runs, under each glibc malloc profile and emulated-device count,
side by side: speed and peak memory in one run (rat_jax.runtime: MALLOC_PROFILES).

    python bench/malloc.py [--json] [--models efficientnet_lite0] [--image 64] [--batch 48]
                           [--members 8] [--devices 8,2] [--profiles tuned,huge,system]
                           [--steps 6]

Defaults: the step of `configs/pacs.py:cpu` (EfficientNet-Lite0, 64 px, 16 images x 3 domains,
8 members) and of `configs/demo.py` with `--image 32 --batch 24`.
Each (model, devices, profile) runs in its own process, because glibc reads GLIBC_TUNABLES only
at process start. Per row: median and best seconds per step of all M members (after two warm-up
steps), member-steps/s, minor page faults and kernel CPU seconds per step, the process's peak RSS,
and `speed` = this row's member-steps/s over the first row's (the first profile on the first
device count: today's default when the defaults are listed first).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def child(a) -> dict:
    import resource

    import jax
    import numpy as np
    jax.config.update("jax_num_cpu_devices", a.devices)
    from rat_jax import runtime, trees
    runtime.enable_compilation_cache()  # compiled programs do not depend on the malloc profile
    from rat_jax.engine import members as members_lib
    from rat_jax.models import create_model

    model = create_model(a.models, 7)
    v = jax.jit(model.init)(jax.random.key(0), np.zeros((1, a.image, a.image, 3), np.float32))
    params = jax.tree.map(np.asarray, v["params"])
    m = a.members
    hp = members_lib.make_hparams(m, lr=5e-5, weight_decay=1e-4, dropout=0.1, seed=list(range(m)))
    rng = np.random.RandomState(0)
    batch = {"images": rng.randn(m, a.batch, a.image, a.image, 3).astype(np.float32),
             "labels": rng.randint(0, 7, (m, a.batch)).astype(np.int32)}
    engine = members_lib.MemberEngine(model, v["batch_stats"], m, members_lib.EngineConfig(
        batch_size=a.batch, devices=jax.devices()[:a.devices]))
    live = engine.start(members_lib.init_state(trees.stack([params] * m))["members"], hp)
    for _ in range(2):
        jax.block_until_ready(live.step(batch))
    r0, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        jax.block_until_ready(live.step(batch))
        times.append(time.perf_counter() - t0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    step = float(np.median(times))
    return {"model": a.models, "image": a.image, "batch": a.batch, "members": m,
            "devices": a.devices, "strategy": engine.strategy, "s_per_step": round(step, 3),
            "best_s": round(min(times), 3), "member_steps_per_s": round(m / step, 3),
            "page_faults_per_step": round((r1.ru_minflt - r0.ru_minflt) / a.steps),
            "sys_s_per_step": round((r1.ru_stime - r0.ru_stime) / a.steps, 3),
            "peak_rss_mb": r1.ru_maxrss // 1024}


def describe(row: dict) -> str:
    """One human-readable line of a row."""
    cells = [f"{row['model']} {row['image']}px b{row['batch']} M={row['members']}",
             f"devices={row['devices']:<2} {row['profile']:<7}",
             f"{row['member_steps_per_s']:7.3f} member-steps/s (x{row['speed']:.2f})",
             f"{row['s_per_step']:.2f} s/step", f"{row['page_faults_per_step']:>8} faults/step",
             f"sys {row['sys_s_per_step']} s", f"peak {row['peak_rss_mb']} MB"]
    return "  ".join(cells)


def child_env(profile: str) -> dict:
    """The environment a process started by rat_jax's entry points has under `profile`."""
    from rat_jax import runtime
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "RAT_JAX_MALLOC", runtime._REEXEC_MARK)}
    env["RAT_JAX_MALLOC"] = profile
    tunables = runtime.malloc_tunables(env)
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    return env


def main(argv=None):
    from rat_jax import runtime
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument("--models", default="efficientnet_lite0")
    p.add_argument("--image", type=int, default=64)
    p.add_argument("--batch", type=int, default=48, help="images per member step")
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--devices", default="8,2", help="emulated CPU device counts")
    p.add_argument("--profiles", default=",".join(runtime.MALLOC_PROFILES))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        a.devices = int(a.devices)
        print(json.dumps(child(a)), flush=True)
        return
    profiles = a.profiles.split(",")
    for prof in profiles:
        if prof not in runtime.MALLOC_PROFILES:
            p.error(f"--profiles: {prof!r} is not one of {tuple(runtime.MALLOC_PROFILES)}")
    base = None
    for arch in a.models.split(","):
        for devices in a.devices.split(","):
            for prof in profiles:
                cmd = [sys.executable, __file__, "--child", "--models", arch, "--image",
                       str(a.image), "--batch", str(a.batch), "--members", str(a.members),
                       "--devices", devices, "--steps", str(a.steps)]
                out = subprocess.run(cmd, env=child_env(prof), capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{arch} / {devices} devices / {prof} failed:\n{out.stderr[-3000:]}")
                row = dict(json.loads(out.stdout.strip().splitlines()[-1]), profile=prof)
                base = base or row["member_steps_per_s"]
                row["speed"] = round(row["member_steps_per_s"] / base, 3)
                print(json.dumps(row) if a.json else describe(row), flush=True)


if __name__ == "__main__":
    main()
