"""Time each convolution algorithm (forward + backward) on the conv shapes of the rat_jax
backbones, side by side, to justify `choose_conv_impl`'s CPU defaults.

    python bench/conv_paths.py [--arch resnet18 --size 64] [--batch 32] [--json]
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from rat_jax.models import create_model
from rat_jax.models.layers import choose_conv_impl, conv2d


def conv_shapes(arch: str, size: int):
    """(in_hw, cin, cout, k, stride, groups, pads) of every distinct conv in `arch` at `size` px."""
    model = create_model(arch, 10, conv_impl="xla")
    seen = {}
    import rat_jax.models.layers as layers

    real = layers.conv2d

    def spy(x, kernel, stride, pads, groups=1, impl="auto"):
        kh, _, _, cout = kernel.shape
        key = (tuple(x.shape[1:3]), x.shape[-1], cout, kh, stride, groups, tuple(pads))
        seen[key] = seen.get(key, 0) + 1
        return real(x, kernel, stride, pads, groups, impl)

    layers.conv2d = spy
    try:
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    finally:
        layers.conv2d = real
    return seen


def time_fn(fn, *args, reps=5):
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) / reps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    rows = []
    for (hw, cin, cout, k, s, g, pads), count in conv_shapes(a.arch, a.size).items():
        x = jax.random.normal(jax.random.key(0), (a.batch, *hw, cin))
        w = jax.random.normal(jax.random.key(1), (k, k, cin // g, cout)) * 0.05
        row = dict(arch=a.arch, size=a.size, in_hw=hw[0], cin=cin, cout=cout, k=k, stride=s,
                   groups=g, count=count,
                   auto=choose_conv_impl(jax.default_backend(), hw, k, s, cin, g))
        for impl in ("xla", "im2col", "shift"):
            f = jax.jit(jax.value_and_grad(
                lambda x, w, impl=impl: jnp.sum(conv2d(x, w, s, pads, g, impl) ** 2), (0, 1)))
            row[f"{impl}_ms"] = 1e3 * time_fn(f, x, w)
        best = min(("xla", "im2col", "shift"), key=lambda i: row[f"{i}_ms"])
        row["best"] = best
        rows.append(row)
        if a.json:
            print(json.dumps(row))
        else:
            print(f"{hw[0]:>4}px {cin:>5}->{cout:<5} k{k} s{s} g{g:<4} x{count:<2} "
                  f"xla {row['xla_ms']:8.2f}  im2col {row['im2col_ms']:8.2f}  shift {row['shift_ms']:8.2f}"
                  f"  best={best:<7} auto={row['auto']}", flush=True)
    total = {i: sum(r[f"{i}_ms"] * r["count"] for r in rows) for i in ("xla", "im2col", "shift")}
    total["auto"] = sum(r[f"{r['auto']}_ms"] * r["count"] for r in rows)
    total["best"] = sum(r[f"{r['best']}_ms"] * r["count"] for r in rows)
    print(("" if a.json else "total ms (fwd+bwd, all convs): ") + json.dumps(
        {k: round(v, 1) for k, v in total.items()}))


if __name__ == "__main__":
    from rat_jax import runtime
    runtime.reexec_with_malloc_tunables()  # the malloc settings rat_jax's entry points run with
    main()
