"""One jitted member train step under glibc's default malloc and under rat_jax's malloc settings,
side by side (rat_jax.runtime: MALLOC_TUNABLES, apply_mallopt).

    python bench/malloc.py [--json] [--models resnet_tiny,efficientnet_lite0,resnet18]
                           [--image 64] [--batch 96] [--steps 6]

Each (model, mode) runs in its own process, because glibc reads GLIBC_TUNABLES only at start:
  system   glibc's defaults (RAT_JAX_MALLOC=system, no GLIBC_TUNABLES)
  mallopt  what a process started without the tunables gets from runtime.setup() (apply_mallopt)
  tuned    GLIBC_TUNABLES=runtime.malloc_tunables(): what rat_jax's entry points run with
Per row: median and best ms per step over --steps timed steps (after two warm-up steps, one device),
minor page faults, kernel and user CPU seconds per step, peak RSS, and `speedup` = the system
row's median time over this row's.
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
MODES = ("system", "mallopt", "tuned")


def child(arch: str, size: int, batch: int, steps: int, mode: str) -> dict:
    import resource

    from rat_jax import runtime
    if mode == "mallopt":
        runtime.apply_mallopt()
    import jax
    import jax.numpy as jnp
    import numpy as np
    jax.config.update("jax_num_cpu_devices", 1)
    from rat_jax import trees
    from rat_jax.engine import members as members_lib
    from rat_jax.engine import step as step_lib
    from rat_jax.models import create_model

    model = create_model(arch, 7)
    v = jax.jit(model.init)(jax.random.key(0), np.zeros((1, size, size, 3), np.float32))
    member = jax.tree.map(jnp.array, step_lib.init_member(jax.tree.map(np.asarray, v["params"])))
    hp = trees.take(members_lib.make_hparams(1, lr=5e-5, weight_decay=1e-4, dropout=0.1,
                                             seed=[0]), 0)
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(batch, size, size, 3).astype(np.float32))
    y = jnp.asarray(rng.randint(0, 7, (batch,)).astype(np.int32))
    step = jax.jit(lambda b, m, h, xx, yy: step_lib.train_step(model, b, m, h, xx, yy),
                   donate_argnums=(1,))
    for _ in range(2):
        member, out = step(v["batch_stats"], member, hp, x, y)
        jax.block_until_ready(out)
    r0, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(steps):
        t0 = time.perf_counter()
        member, out = step(v["batch_stats"], member, hp, x, y)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"model": arch, "image": size, "batch": batch, "mode": mode,
            "ms_per_step": round(1e3 * float(np.median(times)), 1),
            "best_ms": round(1e3 * min(times), 1),
            "page_faults_per_step": round((r1.ru_minflt - r0.ru_minflt) / steps),
            "sys_s_per_step": round((r1.ru_stime - r0.ru_stime) / steps, 3),
            "user_s_per_step": round((r1.ru_utime - r0.ru_utime) / steps, 3),
            "peak_rss_mb": r1.ru_maxrss // 1024,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def child_env(mode: str) -> dict:
    from rat_jax import runtime
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RAT_JAX_MALLOC")}
    if mode == "system":
        env["RAT_JAX_MALLOC"] = "system"
    elif mode == "tuned":
        env["GLIBC_TUNABLES"] = runtime.malloc_tunables(env) or ""
    return env


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument("--models", default="resnet_tiny,efficientnet_lite0,resnet18")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--image", type=int, default=64)
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        arch, mode = a.child.split(":")
        print(json.dumps(child(arch, a.image, a.batch, a.steps, mode)), flush=True)
        return
    for mode in a.modes.split(","):
        if mode not in MODES:
            p.error(f"--modes: {mode!r} is not one of {MODES}")
    for arch in a.models.split(","):
        base = None
        for mode in a.modes.split(","):
            cmd = [sys.executable, __file__, "--child", f"{arch}:{mode}", "--image", str(a.image),
                   "--batch", str(a.batch), "--steps", str(a.steps)]
            out = subprocess.run(cmd, env=child_env(mode), capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{arch} / {mode} failed:\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            base = base or row["ms_per_step"]
            row["speedup"] = round(base / row["ms_per_step"], 2)
            if a.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"{arch:<19} {mode:<8} {row['ms_per_step']:8.1f} ms/step (best "
                      f"{row['best_ms']:.1f})  x{row['speedup']:.2f}  "
                      f"{row['page_faults_per_step']:>7} faults/step  sys {row['sys_s_per_step']}"
                      f" s  user {row['user_s_per_step']} s  peak {row['peak_rss_mb']} MB",
                      flush=True)


if __name__ == "__main__":
    main()
