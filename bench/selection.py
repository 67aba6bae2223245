"""Evaluation + selection of one member group, before and after the engine path.

    python bench/selection.py [--arch efficientnet_lite0] [--image 32] [--members 8]
                              [--n 512] [--batch 64] [--devices 8] [--repeat 2]

What the selection stage computes for one group of M members (rat_jax.selection): the best-ID-val
member's accuracy on the test env's in split, the LMC gate (each member's 5 interpolation points
with the running soup, threshold 0.05) on the ID-val selection set, the uniform soup on the full
test env, the greedy soup (one candidate per member on the selection set, then the full test env)
and the logit ensemble of all members on the full test env. Random ("trained-looking") weights,
synthetic uint8 images (three splits of --n images), `--devices` emulated CPU devices.

Paths (one JSON row each, per repeat; repeat 0 includes compilation):
  before     the reference one-device path: evaluation.predict_logits per member and soup,
             predict_logits_stacked for the ensemble, the gate's points one by one
  after      the engine path (evaluation.StackEvaluator -> MemberEngine.logits) with the CPU
             default layout (members over the devices, no 'data' split): member logits in one
             pass per split, the gate's 5 points as one stack
  after_dp   the same with data_parallel=True (images split over the devices a stack leaves)
and a ratio row per repeat (before seconds / after seconds). Every path must give the same
accuracies (checked).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--n", type=int, default=512, help="images per split")
    p.add_argument("--batch", type=int, default=64, help="eval_batch_size")
    p.add_argument("--devices", type=int, default=8, help="emulated CPU devices")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--paths", default="before,after,after_dp")
    return p.parse_args(argv)


def random_members(arch, classes, m):
    """M random members around one base (so soups and gates are not degenerate) and frozen BN
    statistics, drawn with numpy from the model's shapes."""
    import numpy as np
    from flax.traverse_util import unflatten_dict
    from rat_jax.convert.converter import expected_shapes
    shapes = expected_shapes(arch, classes)
    rng = np.random.default_rng(0)
    base, stats = {}, {}
    for path, shape in shapes.items():
        scale = np.sqrt(2.0 / np.prod(shape[:-1])) if len(shape) > 1 else 0.1
        v = rng.normal(0.0, scale, shape).astype(np.float32)
        if path[-1] == "var":
            v = 0.5 + np.abs(v)
        (stats if path[0] == "batch_stats" else base)[path] = v
    members = [{p: (v + 0.3 * rng.normal(0.0, np.std(v) + 1e-3, v.shape)).astype(np.float32)
                for p, v in base.items()} for _ in range(m)]
    stacked = {p: np.stack([mm[p] for mm in members]) for p in base}
    return unflatten_dict(stacked)["params"], unflatten_dict(stats)["batch_stats"]


def before(model, bs, stacked, scores, splits, batch):
    """The one-device reference path (what selection did before the engine path)."""
    import numpy as np
    from rat_jax import diagnostics, soups, trees
    from rat_jax.evaluation import accuracy, predict_logits, predict_logits_stacked
    test_in, sel, full = splits
    acc = lambda p, d: accuracy(predict_logits(model, {"params": p, "batch_stats": bs}, d[0],
                                               batch), d[1])
    order = soups.sort_by_score(scores)
    out = {"best": acc(trees.take(stacked, order[0]), test_in)}
    gate = diagnostics.GateConfig(0.05, probe=diagnostics.LmcProbe(diagnostics.GATE_ALPHAS,
                                                                   batch))
    _, kept, rec = diagnostics.lmc_gate(model, bs, stacked, order, *sel, gate)
    out["gate"] = [r["barrier"] for r in rec]
    out["uniform"] = acc(trees.average(stacked), full)
    soup, selected, _ = soups.greedy_soup(stacked, scores, lambda p: acc(p, sel))
    out["greedy"], out["selected"] = acc(soup, full), selected
    logits = predict_logits_stacked(model, stacked, bs, full[0], batch)
    out["ensemble"] = accuracy(np.asarray(soups.ensemble_logits(logits)), full[1])
    return out


def after(model, bs, stacked, scores, splits, batch, data_parallel):
    """The engine path (what rat_jax.selection does now)."""
    import numpy as np
    from rat_jax import diagnostics, soups, trees
    from rat_jax.evaluation import StackEvaluator, accuracy
    ev = StackEvaluator(model, bs, batch, data_parallel=data_parallel)
    test_in, sel, full = splits
    acc = lambda p, d: accuracy(ev.logits_of([p], d[0])[0], d[1])
    order = soups.sort_by_score(scores)
    members_in = ev.logits(trees.select(stacked, order), test_in[0])   # one pass, all members
    out = {"best": accuracy(members_in[0], test_in[1])}
    probe = diagnostics.LmcProbe(diagnostics.GATE_ALPHAS, batch,
                                 stack_logits=lambda st: ev.logits(st, sel[0]))
    _, kept, rec = diagnostics.lmc_gate(model, bs, stacked, order, None, sel[1],
                                        diagnostics.GateConfig(0.05, probe=probe))
    out["gate"] = [r["barrier"] for r in rec]
    out["uniform"] = acc(trees.average(stacked), full)
    soup, selected, _ = soups.greedy_soup(stacked, scores, lambda p: acc(p, sel))
    out["greedy"], out["selected"] = acc(soup, full), selected
    logits = ev.logits(stacked, full[0])                                 # one pass, all members
    out["ensemble"] = accuracy(np.asarray(soups.ensemble_logits(logits)), full[1])
    return out


def main(argv=None):
    args = parse_args(argv)
    from rat_jax import runtime
    runtime.configure_cpu_xla_flags("auto")
    import jax
    jax.config.update("jax_num_cpu_devices", args.devices)
    runtime.enable_compilation_cache()
    import numpy as np
    from rat_jax.models import create_model
    model = create_model(args.arch, args.classes)
    stacked, bs = random_members(args.arch, args.classes, args.members)
    scores = np.random.default_rng(1).uniform(0.3, 0.6, args.members)
    rng = np.random.default_rng(2)
    splits = [(rng.integers(0, 256, (args.n, args.image, args.image, 3), dtype=np.uint8),
               rng.integers(0, args.classes, args.n).astype(np.int32)) for _ in range(3)]
    paths = {"before": lambda: before(model, bs, stacked, scores, splits, args.batch),
             "after": lambda: after(model, bs, stacked, scores, splits, args.batch, False),
             "after_dp": lambda: after(model, bs, stacked, scores, splits, args.batch, True)}
    names = args.paths.split(",")
    common = dict(arch=args.arch, image=args.image, members=args.members, n=args.n,
                  batch=args.batch, devices=len(jax.devices()))
    ref = None
    for r in range(args.repeat):
        secs = {}
        for name in names:
            t0 = time.perf_counter()
            res = paths[name]()
            secs[name] = time.perf_counter() - t0
            if ref is None:
                ref = res
            same = res == ref
            print(json.dumps({"path": name, "repeat": r, "seconds": round(secs[name], 3),
                              "same_results": same, **common,
                              **{k: res[k] for k in ("best", "uniform", "greedy", "ensemble")}}),
                  flush=True)
            if not same:
                print(json.dumps({"mismatch": name, "got": res, "ref": ref}, default=float),
                      flush=True)
        if "before" in secs:
            print(json.dumps({"path": "ratio", "repeat": r, **{
                f"before/{n}": round(secs["before"] / secs[n], 3) for n in secs if n != "before"}}),
                flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
