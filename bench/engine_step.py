"""Time one MemberEngine train step for one layout: the quick probe behind the CPU defaults.

    python bench/engine_step.py ARCH SIZE MEMBERS [--devices D] [--batch B] [--strategy S]
                                [--data-parallel] [--steps N] [--cpu-ynn auto|on|off]
    python bench/engine_step.py resnet18 64 1 --cpu-ynn off     # YNNPACK dot fusions off

The measurement behind runtime.CPU_YNN_MAX_FLOPS (run with --cpu-ynn on and off) and the CPU
device count (--devices); docs/benchmarks.md holds the current numbers.

Prints one JSON line: the mesh, strategy, XLA_FLAGS, compile + first step seconds and
member-steps/s (best of --steps timed steps after the first). One layout per process, because the
emulated device count and XLA flags are fixed when JAX starts; compare layouts by running it
several times on an otherwise idle machine (bench/members.py interleaves rows for a shared one).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("arch")
    p.add_argument("size", type=int)
    p.add_argument("members", type=int)
    p.add_argument("--devices", type=int, default=0, help="emulated CPU devices (0 = default)")
    p.add_argument("--batch", type=int, default=96, help="images per member step")
    p.add_argument("--strategy", default=None)
    p.add_argument("--data-parallel", action="store_true", help="split a member over spare devices")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cpu-ynn", default="auto", choices=["auto", "on", "off"],
                   help="XLA:CPU YNNPACK dot fusions (rat_jax.runtime.cpu_compiler_options)")
    a = p.parse_args(argv)

    import jax
    from rat_jax import runtime
    runtime.configure_cpu_xla_flags(a.cpu_ynn)  # as runtime.setup (before JAX starts)
    jax.config.update("jax_num_cpu_devices", a.devices or runtime.DEFAULT_CPU_DEVICES)
    import numpy as np

    from rat_jax import trees
    from rat_jax.engine import members as members_lib
    from rat_jax.models import create_model

    model = create_model(a.arch, 7)
    v = jax.jit(model.init)(jax.random.key(0), np.zeros((1, a.size, a.size, 3), np.float32))
    params = jax.tree.map(np.asarray, v["params"])
    m = a.members
    eng = members_lib.MemberEngine(model, v["batch_stats"], m, members_lib.EngineConfig(
        batch_size=a.batch, strategy=a.strategy, data_parallel=a.data_parallel or None,
        cpu_ynn=a.cpu_ynn))
    # the live members train_members steps (MemberEngine.start)
    live = eng.start(members_lib.init_state(trees.stack([params] * m))["members"],
                     members_lib.make_hparams(m, lr=5e-5, seed=list(range(m))))
    rng = np.random.RandomState(0)
    batch = {"images": rng.randn(m, a.batch, a.size, a.size, 3).astype(np.float32),
             "labels": rng.randint(0, 7, (m, a.batch)).astype(np.int32)}
    t0 = time.perf_counter()
    jax.block_until_ready(live.step(batch))
    first = time.perf_counter() - t0
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        jax.block_until_ready(live.step(batch))
        times.append(time.perf_counter() - t0)
    print(json.dumps({"arch": a.arch, "size": a.size, "members": m, "batch": a.batch,
                      "devices": len(jax.devices()), "mesh": dict(eng.mesh.shape),
                      "strategy": eng.strategy, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                      "cpu_ynn": a.cpu_ynn, "compiler_options": eng.compiler_options,
                      "compile_and_first_step_s": round(first, 1),
                      "member_steps_per_s": round(m / min(times), 3)}), flush=True)


if __name__ == "__main__":
    from rat_jax import runtime
    runtime.reexec_with_malloc_tunables()  # the malloc settings rat_jax's entry points run with
    main()
