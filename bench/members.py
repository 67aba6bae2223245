"""Members training throughput, side by side: the Python loop over a jitted single-member step,
the stacked engine with each local strategy and layout, and plain PyTorch.

    python bench/members.py [--quick] [--json] [--models resnet_tiny,efficientnet_lite0]
                            [--members 1,2,4,8] [--image 64] [--domains 3 --per-domain 32]
                            [--cpu-ynn auto|on|off]

The measurement behind the CPU default local strategy "loop" (rat_jax.engine.strategies) and the
CPU device emulation (rat_jax.runtime); docs/benchmarks.md holds the current numbers.

Rows per (model, M):
  loop          one jitted single-member step (rat_jax.engine.step) called M times per round
  <s>@1         MemberEngine on 1 device, local strategy <s> (vmap / map / loop)
  1/dev@<M>     MemberEngine over M devices, one member per device
  1/dev@<D>     MemberEngine over all D (emulated) devices with data_parallel=True: mesh
                ('model'=gcd(M, D), 'data'=rest), each member's batch split over its 'data' devices
  default       MemberEngine(strategy=None) on runtime.DEFAULT_CPU_DEVICES devices: what
                train_members does under rat_jax's default CPU set-up
  torch         the same network and Adam step in plain PyTorch, one member after another
Rows of one (model, M) are timed in interleaved bursts (rounds), so load from other processes hits
every row alike; member_steps_per_s is the median over rounds of M * calls / seconds (the best burst
is also given); images_per_s = member_steps_per_s * batch; ratio_vs_loop is the median over rounds of
the row's rate over the loop's rate in the same round (paired, robust on a shared machine). Rows whose
mesh has one member per device run no local strategy ("1/dev"); duplicates are dropped. Emulated CPU devices are set with --devices (default 8)
before JAX starts.
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="~1 minute: resnet_tiny, M in {1,4}, "
                   "loop/default/torch only, batch 3x16")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument("--models", default="resnet_tiny,efficientnet_lite0")
    p.add_argument("--members", default="1,2,4,8")
    p.add_argument("--strategies", default="vmap,map,loop")
    p.add_argument("--layouts", default="1,m,all", help="device counts for the engine rows: a "
                   "number, 'm' (one device per member) or 'all'")
    p.add_argument("--image", type=int, default=64)
    p.add_argument("--domains", type=int, default=3)
    p.add_argument("--per-domain", type=int, default=32)
    p.add_argument("--devices", type=int, default=8, help="emulated CPU devices")
    p.add_argument("--rounds", type=int, default=8, help="interleaved timing rounds")
    p.add_argument("--burst", type=float, default=0.75, help="seconds per row per round")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--cpu-ynn", default="auto", choices=["auto", "on", "off"],
                   help="XLA:CPU YNNPACK dot fusions (rat_jax.runtime.cpu_compiler_options)")
    a = p.parse_args(argv)
    if a.quick:
        a.models, a.members, a.per_domain, a.rounds, a.burst = "resnet_tiny", "1,4", 16, 5, 0.4
        a.strategies, a.layouts = "", ""
    return a


class Runner:
    """One row: `call()` runs one round (M member-steps); timed in bursts interleaved with the
    other rows of the same (model, M), so that load from other processes hits every row alike."""

    def __init__(self, row: dict, call, members: int):
        self.row, self.call, self.members = row, call, members
        self.rates: list[float] = []

    def warm(self) -> None:
        t0 = time.perf_counter()
        self.call()
        self.row["first_call_s"] = round(time.perf_counter() - t0, 2)  # incl. compilation
        self.call()

    def burst(self, seconds: float) -> None:
        calls, t0 = 0, time.perf_counter()
        while calls < 1 or time.perf_counter() - t0 < seconds:
            self.call()
            calls += 1
        self.rates.append(self.members * calls / (time.perf_counter() - t0))


def measure(runners: list, rounds: int, seconds: float) -> None:
    """Warm every row (compile), then `rounds` rounds of one burst per row, in turn."""
    for r in runners:
        r.warm()
    for _ in range(rounds):
        for r in runners:
            r.burst(seconds)


def bench_model(arch, args, emit):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rat_jax import runtime, trees
    from rat_jax.engine import members as members_lib
    from rat_jax.engine import step as step_lib
    from rat_jax.models import create_model

    num_classes, n = 7, args.domains * args.per_domain
    model = create_model(arch, num_classes)
    variables = model.init(jax.random.key(0), jnp.zeros((1, args.image, args.image, 3)))
    params = jax.tree.map(np.asarray, variables["params"])
    bs = variables["batch_stats"]
    ms = [int(x) for x in args.members.split(",")]
    rng = np.random.RandomState(0)
    data = {"images": rng.randn(max(ms), n, args.image, args.image, 3).astype(np.float32),
            "labels": rng.randint(0, num_classes, (max(ms), n)).astype(np.int32)}
    hp_all = members_lib.make_hparams(max(ms), lr=5e-5, weight_decay=1e-4, dropout=0.1,
                                      seed=list(range(max(ms))))
    step = jax.jit(lambda b, mem, hp, x, y: step_lib.train_step(model, b, mem, hp, x, y),
                   donate_argnums=(1,))
    torch_call = None if args.no_torch else torch_step(arch, num_classes, n, args)
    if torch_call is None and not args.no_torch:
        print(f"# {arch}: no torch reference network, torch row skipped", file=sys.stderr)

    for m in ms:
        base = {"model": arch, "members": m, "batch": n, "image": args.image}
        runners = []
        # (a) loop: one jitted single-member step called M times
        mems = [jax.tree.map(jnp.array, step_lib.init_member(params)) for _ in range(m)]
        hps = [trees.take(hp_all, i) for i in range(m)]

        def loop_round(mems=mems, hps=hps, m=m):
            out = None
            for i in range(m):
                mems[i], out = step(bs, mems[i], hps[i], data["images"][i], data["labels"][i])
            jax.block_until_ready(out)
        runners.append(Runner({**base, "strategy": "loop", "devices": 1, "mesh": None},
                              loop_round, m))

        # (b) the engine: each local strategy and layout; rows running the same program once
        total = len(jax.devices())
        # the default row first, so that its bursts directly follow the loop's (the acceptance
        # pair: its paired ratio then sees the least drift of a shared machine)
        configs = [(None, "default", None)]
        for layout in [x for x in args.layouts.split(",") if x]:
            ndev = {"all": total, "m": min(m, total)}.get(layout) or int(layout)
            configs += [(s, ndev, layout == "all") for s in args.strategies.split(",") if s]
        batch = {k: v[:m] for k, v in data.items()}
        seen = set()
        for strategy, ndev, split in configs:
            # the default row: the devices rat_jax's runtime.setup() emulates by default
            devices = (jax.devices()[:runtime.DEFAULT_CPU_DEVICES] if ndev == "default"
                       else jax.devices()[:ndev])
            eng = members_lib.MemberEngine(model, bs, m, members_lib.EngineConfig(
                batch_size=n, devices=devices, strategy=strategy, data_parallel=split or None,
                cpu_ynn=args.cpu_ynn))
            mesh = dict(eng.mesh.shape)
            local = m // mesh["model"]
            effective = eng.strategy if local > 1 else "1/dev"  # one local member: no strategy
            name = f"{effective}@{eng.mesh.devices.size}"
            if strategy is None:
                name = f"default ({name})"
            key = (tuple(mesh.items()), effective)
            if key in seen and strategy is not None:
                continue
            seen.add(key)
            # the live members train_members steps (MemberEngine.start)
            live = eng.start(members_lib.init_state(trees.stack([params] * m))["members"],
                             trees.select(hp_all, range(m)))

            def engine_round(live=live):
                jax.block_until_ready(live.step(batch))
            runners.append(Runner({**base, "strategy": name, "devices": int(eng.mesh.devices.size),
                                   "mesh": mesh}, engine_round, m))

        # (c) plain PyTorch, members one after another (a member-step costs the same at any M)
        if torch_call is not None:
            runners.append(Runner({**base, "strategy": "torch", "devices": None, "mesh": None},
                                  torch_call, 1))

        measure(runners, args.rounds, args.burst)
        loop_rates = np.asarray(runners[0].rates)
        for r in runners:
            rates = np.asarray(r.rates)
            rate = float(np.median(rates))
            emit({**r.row, "member_steps_per_s": rate, "images_per_s": rate * n,
                  # paired: each round's rate over the loop's rate measured right before it
                  "ratio_vs_loop": float(np.median(rates / loop_rates)),
                  "best_member_steps_per_s": float(rates.max()),
                  "rounds": len(rates)})
        del runners, mems


def torch_model(arch, num_classes):
    """tests/torch_reference.py's network if present; else a minimal torch resnet_tiny here."""
    try:
        sys.path.insert(0, str(REPO / "tests"))
        import torch_reference
        return torch_reference.REFERENCES[arch](num_classes)
    except (ImportError, KeyError):
        if arch != "resnet_tiny":
            return None
        return _minimal_torch_resnet_tiny(num_classes)


def _minimal_torch_resnet_tiny(num_classes):
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout)) if stride != 1 or cin != cout
                         else nn.Identity())

        def forward(self, x):
            y = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
            return (y + self.down(x)).relu()

    w = 16
    return nn.Sequential(nn.Conv2d(3, w, 7, 2, 3, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1), Block(w, w, 1), Block(w, 2 * w, 2),
                         Block(2 * w, 4 * w, 2), Block(4 * w, 8 * w, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1),
                         nn.Linear(8 * w, num_classes))


def torch_step(arch, num_classes, n, args):
    """A zero-argument callable doing one plain-PyTorch Adam step (frozen BN), or None."""
    try:
        import torch
    except ImportError:
        return None
    net = torch_model(arch, num_classes)
    if net is None:
        return None
    net.train()
    for mod in net.modules():  # frozen BN, as the protocol
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.eval()
    opt = torch.optim.Adam(net.parameters(), lr=5e-5, weight_decay=1e-4)
    x = torch.randn(n, 3, args.image, args.image)
    y = torch.randint(0, num_classes, (n,))

    def one():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return one


def main(argv=None):
    args = parse_args(argv)
    import jax
    from rat_jax import runtime
    runtime.configure_cpu_xla_flags(args.cpu_ynn)  # as runtime.setup (before JAX starts)
    jax.config.update("jax_num_cpu_devices", args.devices)
    rows = []

    def emit(row):
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{row['model']:<19} M={row['members']:<2} {row['strategy']:<22} "
                  f"{row['member_steps_per_s']:8.2f} member-steps/s {row['images_per_s']:9.1f} img/s"
                  f"  x{row['ratio_vs_loop']:.2f} vs loop"
                  + (f"  (first call {row['first_call_s']:.0f}s)" if row.get("first_call_s")
                     is not None else ""), flush=True)

    if not args.json:
        print(f"# backend={jax.default_backend()} devices={len(jax.devices())} cores="
              f"{os.cpu_count()} image={args.image} batch={args.domains}x{args.per_domain} "
              f"cpu_ynn={args.cpu_ynn}")
    for arch in args.models.split(","):
        bench_model(arch, args, emit)
    return rows


if __name__ == "__main__":
    from rat_jax import runtime
    runtime.reexec_with_malloc_tunables()  # the malloc settings rat_jax's entry points run with
    main()
