"""What the host feeds a training step: images/s and bytes per image of the member loader with
the augmentation on the host (PIL, float32 shipped) or finished on the device (uint8 crop
windows + drawn parameters shipped), next to what the device-side finish and one ResNet-50
member step cost per image on this machine.

  python bench/loader.py --json --root ../shared/datasets/PACS --sizes 224 --workers 2 \
      --worker_types thread process

One JSON row per (size, mode, workers, worker_type): `mode` (host / device), `size`, `workers`,
`worker_type` (thread / process: MemberLoader's worker_type), `img_per_s` (images/s the host
side delivers from the warm uint8 cache, after one warm-up step that also starts the worker
processes), `bytes_per_image` (bytes shipped to the device per image, parameters included).
Then per size one `device_finish` row (ms per image of augment.model_input compiled on this
CPU, and of one ResNet-50 member train step, fp32) and `ratios` rows: device vs host images/s
per worker count and worker type, and host vs device bytes per image, with the targets
(>= 10x, >= 3.5x) and whether they are met.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from rat_jax.data import (FeedOptions, ImageStore, MemberLoader, StreamSpec,  # noqa: E402
                          load_dataset)

TARGET_SPEED, TARGET_BYTES = 10.0, 3.5


def batch_bytes(batch) -> int:
    arrays = [batch["images"], batch["labels"]] + list((batch.get("augment") or {}).values())
    return sum(np.asarray(a).nbytes for a in arrays)


def loader_rate(ds, size, mode, cache_dir, store, workers, steps, members, batch, train_envs,
                worker_type="thread", prefetch=0):
    """(images/s, bytes per image) of MemberLoader after one warm-up step (prefetch off by
    default: the rate of computing batches one at a time)."""
    spec = StreamSpec(batch_size=batch, image_size=size, augment_on=mode)
    feed = FeedOptions(workers=workers, worker_type=worker_type, prefetch=prefetch,
                       cache_dir=cache_dir)
    with MemberLoader(ds, train_envs, list(range(1, members + 1)), spec=spec, feed=feed,
                      store=store) as loader:
        first = next(loader)
        t = time.perf_counter()
        for _ in range(steps):
            next(loader)
        dt = time.perf_counter() - t
    n = members * batch * len(train_envs)
    return steps * n / dt, batch_bytes(first) / n


def device_finish_ms(ds, size, store, train_envs, n_images, repeats=3):
    """ms per image of the compiled device-side finish (resize, flip, jitter, grayscale,
    normalize) of a device-mode batch, on this machine's default JAX device."""
    import jax
    from rat_jax.data import augment
    spec = StreamSpec(batch_size=max(1, n_images // len(train_envs)), image_size=size,
                      augment_on="device")
    with MemberLoader(ds, train_envs, [1], spec=spec, feed=FeedOptions(prefetch=0),
                      store=store) as loader:
        b = next(loader)
    images, params = b["images"][0], {k: v[0] for k, v in b["augment"].items()}
    fn = jax.jit(lambda x, p: augment.model_input(x, p, size))
    jax.block_until_ready(fn(images, params))
    t = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(images, params))
    return (time.perf_counter() - t) / repeats / len(images) * 1e3


def member_step_ms(arch, num_classes, size, n_images, repeats=2):
    """ms per image of one jitted single-member fp32 train step (forward, backward, Adam)."""
    import jax
    import jax.numpy as jnp
    import optax
    from rat_jax.models import create_model
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
    for i in range(repeats):
        params, opt_state = step(params, opt_state, jax.random.key(i))
    jax.block_until_ready(params)
    return (time.perf_counter() - t) / repeats / n_images * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=os.path.join(os.path.dirname(__file__), "..", "..",
                                                  "shared", "datasets", "PACS"))
    p.add_argument("--sizes", type=int, nargs="+", default=[224])
    p.add_argument("--workers", type=int, nargs="+", default=[2])
    p.add_argument("--modes", nargs="+", default=["host", "device"], choices=["host", "device"])
    p.add_argument("--worker_types", nargs="+", default=["thread"],
                   choices=["thread", "process", "auto"])
    p.add_argument("--prefetch", type=int, default=0, help="loader prefetch depth")
    p.add_argument("--steps", type=int, default=4, help="timed loader steps per row")
    p.add_argument("--members", type=int, default=1)
    p.add_argument("--batch", type=int, default=32, help="per domain")
    p.add_argument("--test_env", type=int, default=0)
    p.add_argument("--arch", default="resnet50", help="model of the member-step column, or none")
    p.add_argument("--model_batch", type=int, default=8, help="images of the timed member step")
    p.add_argument("--finish_images", type=int, default=24,
                   help="images of the timed device-side finish (0: skip)")
    p.add_argument("--cache_dir", default=None, help="default: a fresh temp dir, removed after")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)

    ds = load_dataset(a.root)
    train_envs = [i for i in range(ds.num_envs) if i != a.test_env]
    cache_dir = a.cache_dir or tempfile.mkdtemp(prefix="rat_jax_bench_")
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row) if a.json else
              "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    try:
        for size in a.sizes:
            store = ImageStore(ds, cache_dir, workers=max(a.workers))
            store.warm(train_envs)  # the originals (the default training cache)
            got = {}
            for workers in a.workers:
                for wtype in a.worker_types:
                    for mode in a.modes:
                        rate, nbytes = loader_rate(ds, size, mode, cache_dir, store, workers,
                                                   a.steps, a.members, a.batch, train_envs,
                                                   wtype, a.prefetch)
                        got[mode, workers, wtype] = (rate, nbytes)
                        emit({"kind": "loader", "mode": mode, "size": size, "workers": workers,
                              "worker_type": wtype, "members": a.members,
                              "prefetch": a.prefetch, "img_per_s": round(rate, 1),
                              "bytes_per_image": round(nbytes, 1)})
            finish = (device_finish_ms(ds, size, store, train_envs, a.finish_images)
                      if a.finish_images else None)
            step = (member_step_ms(a.arch, ds.num_classes, size, a.model_batch)
                    if a.arch != "none" else None)
            emit({"kind": "device_finish", "size": size,
                  "finish_ms_per_image": None if finish is None else round(finish, 2),
                  "model": None if step is None else a.arch,
                  "member_step_ms_per_image": None if step is None else round(step, 2)})
            if ("host" in a.modes) and ("device" in a.modes):
                for workers, wtype in [(w, t) for w in a.workers for t in a.worker_types]:
                    speed = got["device", workers, wtype][0] / got["host", workers, wtype][0]
                    fewer = got["host", workers, wtype][1] / got["device", workers, wtype][1]
                    emit({"kind": "ratios", "size": size, "workers": workers,
                          "worker_type": wtype,
                          "device_vs_host_img_per_s": round(speed, 2),
                          "host_vs_device_bytes": round(fewer, 2),
                          "targets": f">= {TARGET_SPEED:g}x, >= {TARGET_BYTES:g}x",
                          "met": bool(speed >= TARGET_SPEED and fewer >= TARGET_BYTES)})
    finally:
        if a.cache_dir is None:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
