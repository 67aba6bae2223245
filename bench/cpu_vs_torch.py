"""rat_jax's default members path against a plain PyTorch training loop on the same CPU, side by side.

    python bench/cpu_vs_torch.py [--json] [--rows resnet18@64,resnet50@64,efficientnet_lite0@64,efficientnet_lite0@32,resnet18@224]
                                 [--members 1,8] [--batch 96] [--seconds 10]

Per row: member-steps/s of MemberEngine's defaults (CPU device emulation, auto conv paths,
default local strategy) training M members, and of torch doing the same network + Adam step with
frozen BN for M members one after another (torch.set_num_threads = cores). ratio = rat_jax / torch.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="resnet18@64,resnet50@64,efficientnet_lite0@64,efficientnet_lite0@32,resnet18@224")
    p.add_argument("--members", default="1,8")
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--devices", type=int, default=0,
                   help="emulated CPU devices (0 = rat_jax's default, runtime.DEFAULT_CPU_DEVICES)")
    p.add_argument("--cpu-ynn", default="auto", choices=["auto", "on", "off"],
                   help="XLA:CPU YNNPACK dot fusions (rat_jax.runtime.cpu_compiler_options)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)

    import jax
    from rat_jax import runtime
    runtime.configure_cpu_xla_flags(a.cpu_ynn)  # as runtime.setup (before JAX starts)
    jax.config.update("jax_num_cpu_devices", a.devices or runtime.DEFAULT_CPU_DEVICES)
    import numpy as np
    import torch

    import members as member_bench  # bench/members.py: Runner, measure, torch_step
    from rat_jax import trees
    from rat_jax.engine import members as members_lib
    from rat_jax.models import create_model

    torch.set_num_threads(os.cpu_count() or 1)
    for spec in a.rows.split(","):
        arch, size = spec.split("@")
        size = int(size)
        model = create_model(arch, 7)
        v = jax.jit(model.init)(jax.random.key(0), np.zeros((1, size, size, 3), np.float32))
        params = jax.tree.map(np.asarray, v["params"])
        targs = argparse.Namespace(image=size)
        torch_one = member_bench.torch_step(arch, 7, a.batch, targs)
        for m in (int(x) for x in a.members.split(",")):
            engine = members_lib.MemberEngine(model, v["batch_stats"], m, members_lib.EngineConfig(
                batch_size=a.batch, cpu_ynn=a.cpu_ynn))
            # the live members train_members steps (MemberEngine.start)
            live = engine.start(members_lib.init_state(trees.stack([params] * m))["members"],
                                members_lib.make_hparams(m, lr=5e-5, seed=list(range(m))))
            rng = np.random.RandomState(0)
            batch = {"images": rng.randn(m, a.batch, size, size, 3).astype(np.float32),
                     "labels": rng.randint(0, 7, (m, a.batch)).astype(np.int32)}

            def jax_call(live=live):
                jax.block_until_ready(live.step(batch)["loss"])

            def torch_call():
                for _ in range(m):
                    torch_one()
            rows = [member_bench.Runner({"impl": "rat_jax"}, jax_call, m),
                    member_bench.Runner({"impl": "torch"}, torch_call, m)]
            member_bench.measure(rows, a.rounds, a.seconds)
            jx, tr = max(rows[0].rates), max(rows[1].rates)
            row = {"model": arch, "size": size, "members": m, "batch": a.batch,
                   "rat_jax_member_steps_per_s": round(jx, 4), "torch_member_steps_per_s": round(tr, 4),
                   "ratio": round(jx / tr, 3), "mesh": dict(engine.mesh.shape),
                   "strategy": engine.strategy}
            print(json.dumps(row) if a.json else
                  f"{arch:>18} @{size:<4} M={m:<2} rat_jax {jx:8.3f}  torch {tr:8.3f}  "
                  f"ratio {jx / tr:5.2f}  mesh {dict(engine.mesh.shape)} {engine.strategy}", flush=True)


if __name__ == "__main__":
    from rat_jax import runtime
    runtime.reexec_with_malloc_tunables()  # the malloc settings rat_jax's entry points run with
    main()
