"""Bytes per member of the compiled member train step, from XLA's memory analysis (nothing is run).

    python bench/memory.py [--arch resnet50] [--image 224] [--batch 96] [--members 1,2]
                           [--remat none,dots,nothing] [--strategy map] [--json]

One device (the first), `--strategy` as the local strategy (`map` runs members one after another,
so activation memory does not grow with M; `vmap` keeps every member's activations live at once).
Per row: state = the step's arguments (params + Adam mu/nu + step/flags of M members, batch,
frozen BN statistics), temp = XLA's scratch (activations kept for backward, gradients),
total = arguments + outputs + temps - donated (aliased). The per-member cost is the slope of total
between the smallest and largest M. Add the best-so-far params (one more copy of the params per
member, kept on device by the training loop) for the loop's footprint; that line is printed too.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--classes", type=int, default=65)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--batch", type=int, default=96, help="images per member step (32 x 3 domains)")
    p.add_argument("--members", default="1,2")
    p.add_argument("--remat", default="none,dots,nothing")
    p.add_argument("--strategy", default="map")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)

    import jax
    import numpy as np

    from rat_jax import trees
    from rat_jax.engine import members as members_lib
    from rat_jax.models import create_model

    model = create_model(a.arch, a.classes)
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, a.image, a.image, 3), np.float32))
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])
    batch_stats = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["batch_stats"])
    param_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))
    counts = [int(m) for m in a.members.split(",")]
    rows = []
    for remat_name in a.remat.split(","):
        remat = False if remat_name == "none" else remat_name
        per_m = {}
        for m in counts:
            engine = members_lib.MemberEngine(model, batch_stats, m, members_lib.EngineConfig(
                batch_size=a.batch, devices=jax.devices()[:1], strategy=a.strategy, remat=remat))
            state = members_lib.init_state(trees.stack([params] * m))
            hp = members_lib.make_hparams(m)
            batch = {"images": np.zeros((m, a.batch, a.image, a.image, 3), np.float32),
                     "labels": np.zeros((m, a.batch), np.int32)}
            mem = engine.train_memory(engine.place(state), engine.place(hp), batch)
            total = (mem["argument_size_in_bytes"] + mem["output_size_in_bytes"]
                     + mem["temp_size_in_bytes"] - mem.get("alias_size_in_bytes", 0))
            per_m[m] = total
            row = {"arch": a.arch, "image": a.image, "batch": a.batch, "strategy": a.strategy,
                   "remat": remat_name, "members": m, "param_bytes": param_bytes,
                   "argument_bytes": mem["argument_size_in_bytes"],
                   "temp_bytes": mem["temp_size_in_bytes"], "total_bytes": total}
            rows.append(row)
            if a.json:
                print(json.dumps(row), flush=True)
        if len(counts) > 1:
            lo, hi = min(counts), max(counts)
            slope = (per_m[hi] - per_m[lo]) / (hi - lo)
            row = {"arch": a.arch, "remat": remat_name, "strategy": a.strategy,
                   "bytes_per_member": int(slope), "bytes_per_member_with_best": int(slope + param_bytes),
                   "fixed_bytes": int(per_m[lo] - lo * slope)}
            rows.append(row)
            if a.json:
                print(json.dumps(row), flush=True)
    if not a.json:
        gib = lambda b: f"{b / 2**30:.2f} GiB"
        print(f"{a.arch} @ {a.image} px, batch {a.batch} per member, strategy {a.strategy}, "
              f"params {param_bytes / 2**20:.1f} MiB")
        print("| remat | M | arguments | temps | total |")
        print("|---|---|---|---|---|")
        for r in rows:
            if "members" in r:
                print(f"| {r['remat']} | {r['members']} | {gib(r['argument_bytes'])} | "
                      f"{gib(r['temp_bytes'])} | {gib(r['total_bytes'])} |")
        for r in rows:
            if "bytes_per_member" in r:
                print(f"remat={r['remat']}: {gib(r['bytes_per_member'])} per added member "
                      f"({gib(r['bytes_per_member_with_best'])} with the loop's best params), "
                      f"{gib(r['fixed_bytes'])} fixed")


if __name__ == "__main__":
    from rat_jax import runtime
    runtime.reexec_with_malloc_tunables()  # the malloc settings rat_jax's entry points run with
    main()
