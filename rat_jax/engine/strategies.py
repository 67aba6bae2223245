"""Local strategies: how the members that share one device run inside a compiled step.

Each strategy is kept because a benchmark or the accelerator check gives it a use:
  "loop"  CPU default. The engine calls the one-member-per-device step once per local member, so
          the compiled step is the single-member one and only one member's activations are live
          (bench/members.py measures it against a Python loop over a jitted one-member step).
  "map"   accelerator default: `lax.map`, one member at a time, plain convolutions, least memory
          (launch/device_check.py measures it).
  "vmap"  all local members at once (convolutions become grouped convolutions): timed by
          `launch/device_check.py --strategies map,loop,vmap`.
docs/benchmarks.md holds the current measurements.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

STRATEGIES = ("loop", "map", "vmap")


def check_strategy(strategy: str) -> str:
    """`strategy` if it is one of STRATEGIES, else a ValueError."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown member strategy {strategy!r}; use one of {STRATEGIES}")
    return strategy


def default_strategy(backend: str | None = None) -> str:
    """The local strategy for members sharing a device, by backend: "loop" on CPU (XLA:CPU runs
    convolutions inside a while loop much slower, and vmap turns them into slow grouped
    convolutions; bench/members.py), "map" elsewhere (least memory; launch/device_check.py)."""
    backend = backend or jax.default_backend()
    return "loop" if backend == "cpu" else "map"


def run_local(strategy: str, fn, *xs):
    """Apply `fn` to each local member (leading axis of every leaf of `xs`) with `strategy`.

    A single local member is called directly, without vmap or a loop: the fast path of the
    one-member-per-device layout, and all the "loop" strategy ever compiles (the engine hands it
    one local member per call; given several, it unrolls them).
    """
    check_strategy(strategy)
    m = jax.tree.leaves(xs)[0].shape[0]
    index = lambda i: jax.tree.map(lambda x: x[i], xs)
    if m == 1:
        return jax.tree.map(lambda y: y[None], fn(*index(0)))
    if strategy == "vmap":
        return jax.vmap(fn)(*xs)
    if strategy == "loop":
        outs = [fn(*index(i)) for i in range(m)]
        return jax.tree.map(lambda *ys: jnp.stack(ys), *outs)
    return jax.lax.map(lambda args: fn(*args), xs)
