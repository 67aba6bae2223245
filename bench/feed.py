"""Member-step throughput with and without the device feed's prefetch and the loader's reused
host buffers, side by side, in one run.

    python bench/feed.py [--json] [--arch resnet_tiny] [--members 4] [--devices 4] [--image 32]
                         [--per-domain 8] [--depths 0,1,2] [--rounds 5] [--burst 1.5]

One row per (device_prefetch, reuse_buffers): the members of one MemberEngine (`--members` of
`--arch` over `--devices` emulated CPU devices, the default local strategy) trained on the
embedded digits dataset (rat_jax.data.demo, one ImageStore; two training envs, `--per-domain`
images per env and member, `--image` px, host augmentation) from a MemberLoader (thread workers,
its default prefetch, FeedOptions.reuse_buffers) through `engine.feed(depth=...)`, stepped as
run_loop steps them (one step in flight). All rows share the engine (one compilation); each has
its own loader, feed and members. Rows are timed in interleaved bursts, so load from other
processes hits every row alike; each burst starts with `--skip` untimed steps (a queue filled
while the row waited its turn does not count). member_steps_per_s: the median over rounds of
members x steps / s; ratio: the median over rounds of the row's rate over the baseline row's
(prefetch 0, fresh buffers) in the same round.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument("--arch", default="resnet_tiny")
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--devices", type=int, default=4, help="emulated CPU devices")
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--per-domain", type=int, default=8)
    p.add_argument("--depths", default="0,1,2", help="device_prefetch values")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: cores)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--burst", type=float, default=1.5, help="timed seconds per row per round")
    p.add_argument("--skip", type=int, default=4, help="untimed steps before each burst")
    p.add_argument("--cache", default=None, help="demo data and image cache (default: a temp dir)")
    return p.parse_args(argv)


class Row:
    """One (depth, reuse) setting: its loader, feed and live members, stepped as run_loop does."""

    def __init__(self, engine, members, hparams, loader, depth: int, reuse: bool):
        self.depth, self.reuse, self.loader = depth, reuse, loader
        self.live = engine.start(members, hparams)
        self.feed = engine.feed(loader, stateful=loader, depth=depth)
        self.pending = None
        self.rates: list[float] = []

    def step(self) -> None:
        import jax
        metrics = self.live.step(next(self.feed))
        if self.pending is not None:  # at most one step in flight
            jax.block_until_ready(self.pending)
        self.pending = metrics["loss"]

    def burst(self, seconds: float, skip: int, members: int) -> None:
        import jax
        for _ in range(skip):
            self.step()
        jax.block_until_ready(self.pending)
        steps, t0 = 0, time.perf_counter()
        while steps < 1 or time.perf_counter() - t0 < seconds:
            self.step()
            steps += 1
        jax.block_until_ready(self.pending)
        self.rates.append(members * steps / (time.perf_counter() - t0))

    def close(self) -> None:
        self.feed.close()
        self.loader.close()


def build_rows(args, cache: str):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from rat_jax import trees
    from rat_jax.data import FeedOptions, ImageStore, MemberLoader, StreamSpec
    from rat_jax.data.demo import load_demo
    from rat_jax.engine import members as members_lib
    from rat_jax.models import create_model

    ds = load_demo("digits", cache)
    m, envs = args.members, [1, 2]
    model = create_model(args.arch, ds.num_classes)
    variables = model.init(jax.random.key(0), jnp.zeros((1, args.image, args.image, 3)))
    params = jax.tree.map(np.asarray, variables["params"])
    engine = members_lib.MemberEngine(model, variables["batch_stats"], m,
                                      members_lib.EngineConfig(
                                          batch_size=args.per_domain * len(envs),
                                          devices=jax.devices()[:args.devices]))
    hparams = members_lib.make_hparams(m, lr=5e-5, weight_decay=1e-4, dropout=0.1,
                                       seed=list(range(m)))
    spec = StreamSpec(batch_size=args.per_domain, image_size=args.image, augment_on="host")
    store = ImageStore(ds, os.path.join(cache, "images"))  # one store: the cache built once
    store.warm(envs, train=True)
    rows = []
    for reuse in (False, True):
        for depth in [int(d) for d in args.depths.split(",")]:
            feed = FeedOptions(workers=args.workers, worker_type="thread",
                               reuse_buffers=reuse)
            loader = MemberLoader(ds, envs, list(range(1, m + 1)), spec=spec, feed=feed,
                                  store=store)
            members = members_lib.init_state(trees.stack([params] * m))["members"]
            rows.append(Row(engine, members, hparams, loader, depth, reuse))
    return engine, rows


def main(argv=None):
    args = parse_args(argv)
    import jax
    import numpy as np
    from rat_jax import runtime
    runtime.configure_cpu_xla_flags("auto")  # as runtime.setup (before JAX starts)
    jax.config.update("jax_num_cpu_devices", args.devices)
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or tmp
        engine, rows = build_rows(args, cache)
        t0 = time.perf_counter()
        for row in rows:  # compiles once (shared engine), warms each loader's cache
            row.burst(0.0, args.skip, args.members)
        warm_s = time.perf_counter() - t0
        for row in rows:
            row.rates.clear()
        for _ in range(args.rounds):
            for row in rows:
                row.burst(args.burst, args.skip, args.members)
        for row in rows:
            row.close()
    base = np.asarray(rows[0].rates)
    n = args.per_domain * 2
    if not args.json:
        print(f"# backend={jax.default_backend()} cores={os.cpu_count()} arch={args.arch} "
              f"members={args.members} devices={dict(engine.mesh.shape)} "
              f"strategy={engine.strategy} image={args.image} batch=2x{args.per_domain} "
              f"rounds={args.rounds} burst={args.burst}s warm-up {warm_s:.0f}s")
    out = []
    for row in rows:
        rates = np.asarray(row.rates)
        rate = float(np.median(rates))
        rec = {"device_prefetch": row.depth, "reuse_buffers": row.reuse,
               "member_steps_per_s": rate, "images_per_s": rate * n,
               "ratio": float(np.median(rates / base)), "best_member_steps_per_s":
               float(rates.max()), "rounds": len(rates)}
        out.append(rec)
        if args.json:
            print(json.dumps(rec), flush=True)
        else:
            print(f"device_prefetch={row.depth} reuse_buffers={str(row.reuse):<5} "
                  f"{rate:8.2f} member-steps/s {rate * n:9.1f} img/s  "
                  f"x{rec['ratio']:.3f} vs prefetch 0, fresh buffers", flush=True)
    return out


if __name__ == "__main__":
    from rat_jax import runtime
    runtime.reexec_with_malloc_tunables()  # the malloc settings rat_jax's entry points run with
    main()
