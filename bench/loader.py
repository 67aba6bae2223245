"""Member-loader throughput on PACS (cold = decode every JPEG, cached = uint8 disk cache) next to
the images/s one single-member training step consumes.

  python bench/loader.py --root /work/shared/datasets/PACS [--sizes 64 224] [--json]

One row per (size, mode, workers); --json prints one JSON object per row. The model column
needs rat_jax.models (skipped with --arch none or when the module is missing).
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rat_jax.data import ImageStore, MemberLoader, load_dataset  # noqa: E402
from rat_jax.data.store import train_side_for  # noqa: E402


def loader_rate(ds, size, cache_dir, workers, steps, members, batch, train_envs, store=None):
    """Images/s delivered by MemberLoader (after one warm-up step), prefetch off."""
    with MemberLoader(ds, train_envs, list(range(1, members + 1)), batch_size=batch,
                      image_size=size, cache_dir=cache_dir, store=store, workers=workers,
                      prefetch=0) as loader:
        next(loader)
        t = time.perf_counter()
        for _ in range(steps):
            next(loader)
        dt = time.perf_counter() - t
    return steps * members * batch * len(train_envs) / dt


def model_rate(arch, num_classes, size, n_images, steps):
    """Images/s of one jitted single-member Adam step on a [n_images, size, size, 3] batch."""
    try:
        import jax
        import jax.numpy as jnp
        import optax
        from rat_jax.models import create_model
    except ImportError:
        return None
    model = create_model(arch, num_classes)
    images = jnp.zeros((n_images, size, size, 3), jnp.float32)
    labels = jnp.zeros((n_images,), jnp.int32)
    variables = model.init(jax.random.key(0), images[:1])
    params, stats = variables["params"], variables.get("batch_stats", {})
    opt = optax.adam(5e-5)

    @jax.jit
    def step(params, opt_state, key):
        def loss(p):
            logits = model.apply({"params": p, "batch_stats": stats}, images, train=True,
                                 dropout_rate=jnp.float32(0.1), rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        g = jax.grad(loss)(params)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = opt.init(params)
    params, opt_state = step(params, opt_state, jax.random.key(1))  # compile
    jax.block_until_ready(params)
    t = time.perf_counter()
    for i in range(steps):
        params, opt_state = step(params, opt_state, jax.random.key(i))
    jax.block_until_ready(params)
    return steps * n_images / (time.perf_counter() - t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=os.path.join(os.path.dirname(__file__), "..", "..",
                                                  "shared", "datasets", "PACS"))
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=5, help="timed loader steps per row")
    p.add_argument("--members", type=int, default=1)
    p.add_argument("--batch", type=int, default=32, help="per domain")
    p.add_argument("--test_env", type=int, default=0)
    p.add_argument("--arch", default="resnet18", help="model for the consumption column, or none")
    p.add_argument("--model_steps", type=int, default=2)
    p.add_argument("--cache_dir", default=None, help="default: a fresh temp dir, removed after")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)

    ds = load_dataset(a.root)
    train_envs = [i for i in range(ds.num_envs) if i != a.test_env]
    n_step = len(train_envs) * a.batch
    cache_dir = a.cache_dir or tempfile.mkdtemp(prefix="rat_jax_bench_")
    rows = []
    try:
        for size in a.sizes:
            consume = None
            if a.arch != "none":
                consume = model_rate(a.arch, ds.num_classes, size, n_step, a.model_steps)
            store = ImageStore(ds, cache_dir, workers=max(a.workers))
            t = time.perf_counter()
            store.warm(train_envs, train_side=train_side_for(size))
            n_imgs = sum(ds.env_sizes()[e] for e in train_envs)
            build = n_imgs / (time.perf_counter() - t)
            for workers in a.workers:
                for mode, cdir, st in (("cold", None, None), ("cached", cache_dir, store)):
                    rate = loader_rate(ds, size, cdir, workers, a.steps, a.members, a.batch,
                                       train_envs, st)
                    rows.append({"size": size, "mode": mode, "workers": workers,
                                 "members": a.members, "loader_img_s": round(rate, 1),
                                 "cache_build_img_s": round(build, 1),
                                 "model": a.arch if consume else None,
                                 "model_img_s": round(consume, 2) if consume else None})
                    r = rows[-1]
                    if a.json:
                        print(json.dumps(r), flush=True)
                    else:
                        print(f"size {size:4d} {mode:6s} workers {workers}  loader "
                              f"{r['loader_img_s']:8.1f} img/s   (cache build "
                              f"{r['cache_build_img_s']:.1f} img/s)   {a.arch} step consumes "
                              f"{r['model_img_s'] if consume else 'n/a'} img/s", flush=True)
    finally:
        if a.cache_dir is None:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
