"""One accelerator check (<= ~8 minutes on one GPU): ResNet-50 and EfficientNet-Lite0 numerical
parity fp32/bf16; members training throughput at 224 px bf16 with each local strategy against
members one by one, and memory per member; the training feed with the augmentation on the host
(PIL) and finished on the device; the strategy it recommends as the accelerator default. Prints
one table (markdown, for docs/benchmarks.md), each part as soon as it is measured.

    python launch/device_check.py                     # GPU/TPU: ResNet-50, 224 px, M in {1,4,8,16}
    python launch/device_check.py --weights resnet50-0676ba61.pth   # parity on real weights
    python launch/device_check.py --tiny              # CPU, seconds: resnet_tiny, 32 px, M in {1,2}

Parity: the same converted weights (the --weights file, else random torchvision-layout weights from
tests/torch_reference.py when torch is installed, else random JAX weights) run in JAX float32 at
default and at "highest" matmul precision (GPUs use TF32 for float32 convolutions by default) and in
bfloat16 (float32 params, bf16 compute); each is compared with torch float32 on CPU when torch is
there, else with JAX float32 "highest".
Throughput: `MemberEngine` on one device with M stacked members and local strategy "map" (the
accelerator default) and "vmap" (rat_jax.engine.strategies) against "one by one": a one-member
engine called M times per round (the members' states all resident). This is the measurement
behind the accelerator default.
images/s = M * batch / step time (median of --steps).
Memory: XLA's compiled footprint of the step (arguments + outputs + temporaries - aliased) / M and,
where the device reports it, the process's device peak so far (memory_stats, monotone).
Configurations that run out of memory print "OOM"; those left when --budget seconds are spent print
"skipped".
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import platform
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # room for the big vmap rows

GiB = 2 ** 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke run in seconds: resnet_tiny, 32 px, M in {1,2}, batch 4")
    p.add_argument("--arch", default="resnet50", help="model of the throughput rows")
    p.add_argument("--parity-archs", default="resnet50,efficientnet_lite0",
                   help="models of the parity rows")
    p.add_argument("--feed-members", type=int, default=4,
                   help="members of the feed rows (host vs device augmentation)")
    p.add_argument("--data", default="",
                   help="image folder (DomainBed layout) for the feed rows; default: generated")
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--batch", type=int, default=32, help="images per member per step")
    p.add_argument("--members", default="1,4,8,16")
    p.add_argument("--strategies", default="loop,map,vmap",
                   help="local strategies to time (rat_jax.engine.strategies.STRATEGIES)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype of the throughput rows")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (after one warm-up)")
    p.add_argument("--weights", default="", help="torch/safetensors ResNet-50 file for parity")
    p.add_argument("--parity-batch", type=int, default=8)
    p.add_argument("--budget", type=float, default=360.0,
                   help="seconds after which no new throughput row starts")
    p.add_argument("--json", default="", help="also write every row to this JSON file")
    p.add_argument("--conv-impl", default="auto", help="rat_jax conv algorithm (models.CONV_IMPLS)")
    a = p.parse_args(argv)
    if a.tiny:
        # every code path, little compiling: 2 strategies (each one more compile), XLA's own conv
        a.arch, a.image, a.batch, a.steps, a.parity_batch = "resnet_tiny", 32, 4, 2, 4
        a.parity_archs, a.feed_members = "resnet_tiny", 2
        a.members = a.members if a.members != "1,4,8,16" else "1,2"
        a.strategies = a.strategies if a.strategies != "loop,map,vmap" else "map,vmap"
        a.conv_impl, a.budget = "xla", 600.0
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        # a smoke run: halve XLA:CPU compile times (its timings mean nothing anyway)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_backend_optimization_level=0"
                                   " --xla_llvm_disable_expensive_passes=true").strip()
    return a


# ----------------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------------
def _torch_reference(arch: str, seed: int = 0):
    """A random torchvision-layout torch model from tests/torch_reference.py, or None (no torch)."""
    try:
        import torch  # noqa: F401
        sys.path.insert(0, str(REPO / "tests"))
        import torch_reference as R
    except ImportError:
        return None
    return R.randomize_(R.REFERENCES[arch](1000 if arch != "resnet_tiny" else 10), seed)


def parity(args, rows: list, arch: str) -> None:
    import jax
    import numpy as np
    from rat_jax.convert.converter import convert_state_dict, convert_torch_checkpoint
    from rat_jax.convert.reader import canonicalize_state_dict
    from rat_jax.models import create_model

    args = argparse.Namespace(**{**vars(args), "arch": arch})
    rng = np.random.RandomState(0)
    images = rng.randn(args.parity_batch, args.image, args.image, 3).astype(np.float32)
    torch_model = None
    if args.weights and arch == "resnet50":
        variables = convert_torch_checkpoint(args.weights, args.arch)
        source = f"converted {pathlib.Path(args.weights).name}"
        torch_model = None
    else:
        torch_model = _torch_reference(args.arch)
        if torch_model is not None:
            sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
            variables, _ = convert_state_dict(canonicalize_state_dict(sd), args.arch)
            source = "random torchvision-layout weights, converted"
        else:
            model = create_model(args.arch, 1000, conv_impl=args.conv_impl)
            variables = jax.jit(model.init)(jax.random.key(0), images[:1])
            source = "random JAX weights (no torch)"
    num_classes = int(np.shape(variables["params"]["classifier"]["kernel"])[1])
    ref, ref_name = None, "jax float32 highest"
    if torch_model is None and args.weights and arch == "resnet50":
        torch_model = _torch_from_weights(args)
    if torch_model is not None:
        import torch
        with torch.no_grad():
            ref = torch_model.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
        ref_name = "torch float32 (CPU)"

    outs = {}
    runs = [("jax float32 highest", "float32", "highest"), ("jax float32 default", "float32", None),
            ("jax bfloat16", "bfloat16", None)]
    if jax.default_backend() == "cpu":  # no TF32 on CPU: "default" is "highest"
        runs = [runs[0], runs[2]]
    for name, dtype, precision in runs:
        model = create_model(args.arch, num_classes, conv_impl=args.conv_impl, dtype=dtype)
        with jax.default_matmul_precision(precision) if precision else _null():
            fn = jax.jit(model.apply)
            outs[name] = np.asarray(fn(variables, images), np.float64)
    if ref is None:
        ref = outs["jax float32 highest"]
    scale = float(np.abs(ref).max())
    for name, logits in outs.items():
        diff = np.abs(logits - ref)
        rows.append(dict(section="parity", arch=args.arch, image=args.image, weights=source,
                         run=name, reference=ref_name, max_abs=float(diff.max()),
                         max_rel=float(diff.max() / max(scale, 1e-12)),
                         top1_agree=float(np.mean(logits.argmax(-1) == ref.argmax(-1)))))


def _torch_from_weights(args):
    """torch reference holding the --weights file's tensors (needs torch), or None."""
    try:
        import numpy as np
        import torch
        from rat_jax.convert.reader import read_torch_file
        ref = _torch_reference(args.arch)
        if ref is None:
            return None
        sd = read_torch_file(args.weights)
        sd = {("fc." + k[len("classifier."):]) if k.startswith("classifier.") else k: v
              for k, v in sd.items()}
        missing, _ = ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
                                         strict=False)
        return None if missing else ref
    except Exception as e:  # the JAX-only comparison still runs
        print(f"(torch reference for {args.weights} unavailable: {e})", file=sys.stderr)
        return None


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------------------------
# Throughput and memory
# ----------------------------------------------------------------------------------------------
def _peak_bytes(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _compiled_bytes(engine, state, hparams, images, labels) -> int | None:
    """XLA's memory analysis of the compiled train step: arguments + outputs + temps - aliased."""
    try:
        mem = engine.train_memory(state, hparams, {"images": images, "labels": labels})
        return int(mem["argument_size_in_bytes"] + mem["output_size_in_bytes"]
                   + mem["temp_size_in_bytes"] - mem.get("alias_size_in_bytes", 0))
    except Exception:  # a backend without memory analysis
        return None


def _is_oom(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def throughput(args, rows: list, deadline: float) -> None:
    import jax
    import numpy as np
    from rat_jax import trees
    from rat_jax.engine import members as members_lib
    from rat_jax.models import create_model

    device = jax.devices()[0]
    model = create_model(args.arch, 10, conv_impl=args.conv_impl, dtype=args.dtype)
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, args.image, args.image, 3), np.float32))
    variables = _random_variables(shapes)
    batch_stats = variables["batch_stats"]
    members = [int(m) for m in args.members.split(",")]
    strategies = [s for s in args.strategies.split(",") if s]

    def make_batch(engine, m):
        key = jax.random.key(1)
        shape = (m, args.batch, args.image, args.image, 3)
        images = jax.device_put(jax.random.normal(key, shape, np.float32), engine.batch_sharding)
        labels = jax.device_put(jax.random.randint(key, shape[:2], 0, 10), engine.batch_sharding)
        return images, labels

    def run_engine(m, strategy):
        """Seconds per step (median), compile seconds, XLA bytes of the compiled step."""
        engine = members_lib.MemberEngine(model, batch_stats, m, devices=[device],
                                          strategy=strategy)
        stacked = trees.stack([variables["params"]] * m)
        state = engine.place(members_lib.init_state(stacked))
        hp = engine.place(members_lib.make_hparams(m, lr=1e-4, seed=list(range(m))))
        images, labels = make_batch(engine, m)
        t0 = time.perf_counter()
        nbytes = _compiled_bytes(engine, state, hp, images, labels)  # compiles (cached for jit)
        live = engine.start(state["members"], hp)  # what train_members steps
        del state
        batch = {"images": images, "labels": labels}
        jax.block_until_ready(live.step(batch))  # first step
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            jax.block_until_ready(live.step(batch))
            times.append(time.perf_counter() - t0)
        del live
        return float(np.median(times)), compile_s, nbytes

    single = {}  # one compiled one-member engine serves every "one by one" row

    def run_one_by_one(m):
        if not single:
            single["engine"] = members_lib.MemberEngine(model, batch_stats, 1, devices=[device])
        engine = single["engine"]
        states = [engine.place(members_lib.init_state(trees.stack([variables["params"]])))
                  for _ in range(m)]
        hp = engine.place(members_lib.make_hparams(1, lr=1e-4))
        images, labels = make_batch(engine, 1)
        t0 = time.perf_counter()
        if "nbytes" not in single:
            single["nbytes"] = _compiled_bytes(engine, states[0], hp, images, labels)
        nbytes = single["nbytes"]
        batch = {"images": images, "labels": labels}
        states[0], metrics = engine.train_step(states[0], hp, batch)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - t0  # ~0 after the first row: compiled once
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            for i in range(m):
                states[i], metrics = engine.train_step(states[i], hp, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        extra = (m - 1) * _tree_bytes(states[0]["members"]) if nbytes is not None else 0
        del states
        return float(np.median(times)), compile_s, (nbytes + extra) if nbytes is not None else None

    plan = []
    for m in members:
        plan.append((m, "one by one"))  # M = 1: the stacked engine is this very program
        if m == 1:
            continue
        for s in strategies:
            plan.append((m, s))

    for m, strategy in plan:
        row = dict(section="throughput", arch=args.arch, image=args.image, batch=args.batch,
                   dtype=args.dtype, members=m, strategy=strategy, device=device.device_kind)
        if time.time() > deadline:
            rows.append({**row, "status": "skipped"})
            continue
        try:
            if strategy == "one by one":
                step_s, compile_s, nbytes = run_one_by_one(m)
            else:
                step_s, compile_s, nbytes = run_engine(m, strategy)
            peak = _peak_bytes(device)
            row.update(status="ok", step_s=step_s, compile_s=compile_s,
                       images_per_s=m * args.batch / step_s,
                       xla_gib_per_member=None if nbytes is None else nbytes / GiB / m,
                       device_peak_gib=None if peak is None else peak / GiB)
        except Exception as e:  # OOM (or another failure) in one row must not lose the table
            row.update(status="OOM" if _is_oom(e) else f"error: {type(e).__name__}: "
                       f"{str(e).splitlines()[0][:120]}")
        rows.append(row)
        print(f"  M={m} {strategy}: " + (f"{row['images_per_s']:.1f} images/s, compile "
                                         f"{row['compile_s']:.1f} s" if row["status"] == "ok"
                                         else row["status"]), flush=True)
        gc.collect()
    base = {r["members"]: r["images_per_s"] for r in rows if r.get("section") == "throughput"
            and r["strategy"] == "one by one" and r.get("status") == "ok"}
    for r in rows:
        if r.get("section") == "throughput" and r.get("status") == "ok" and r["members"] in base:
            r["vs_one_by_one"] = r["images_per_s"] / base[r["members"]]


def recommend(rows: list) -> str | None:
    """The local strategy with the most images/s at the largest member count where a stacked
    strategy ran (ties: less memory per member)."""
    ok = [r for r in rows if r.get("section") == "throughput" and r.get("status") == "ok"
          and r["strategy"] != "one by one"]
    if not ok:
        return None
    m = max(r["members"] for r in ok)
    best = max((r for r in ok if r["members"] == m),
               key=lambda r: (r["images_per_s"], -(r.get("xla_gib_per_member") or 0)))
    return best["strategy"]


def _feed_dataset(args):
    """The feed rows' images: --data, or a generated folder of 227-px JPEGs (PACS's size)."""
    import tempfile
    import numpy as np
    from PIL import Image
    from rat_jax.data import load_dataset, load_folder
    if args.data:
        return load_dataset(args.data)
    root = pathlib.Path(tempfile.mkdtemp(prefix="rat_jax_feed_")) / "feed"
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for e in range(3):
        for c in range(4):
            (root / f"env{e}" / f"c{c}").mkdir(parents=True)
            for i in range(16):  # smooth, photo-like images: JPEG sizes as real ones
                img = Image.fromarray(np.roll(base, (e + c + i), axis=0)).resize((227, 227))
                img.save(root / f"env{e}" / f"c{c}" / f"{i}.jpg", quality=90)
    return load_folder(root)


def feed(args, rows: list, deadline: float) -> None:
    """Images/s the host delivers (MemberLoader from the warm uint8 cache, every core) with the
    augmentation on the host and on the device, bytes per image, and the device's ms per image
    for finishing the augmentation, next to the member step's ms per image."""
    import tempfile
    import jax
    import numpy as np
    from rat_jax.data import MemberLoader, augment
    from rat_jax.runtime import usable_cores
    if time.time() > deadline:
        rows.append(dict(section="feed", status="skipped"))
        return
    ds = _feed_dataset(args)
    cache = tempfile.mkdtemp(prefix="rat_jax_feed_cache_")
    workers = min(16, usable_cores())
    envs = list(range(1, ds.num_envs))
    m = args.feed_members
    for mode in ("host", "device"):
        with MemberLoader(ds, envs, list(range(1, m + 1)), batch_size=args.batch,
                          image_size=args.image, cache_dir=cache, workers=workers, prefetch=0,
                          augment_on=mode) as loader:
            first = next(loader)
            t0 = time.perf_counter()
            for _ in range(3):
                next(loader)
            rate = 3 * m * len(envs) * args.batch / (time.perf_counter() - t0)
        n = m * len(envs) * args.batch
        nbytes = sum(np.asarray(x).nbytes for x in [first["images"], first["labels"]]
                     + list((first.get("augment") or {}).values())) / n
        row = dict(section="feed", mode=mode, workers=workers, image=args.image,
                   img_per_s=rate, bytes_per_image=nbytes, status="ok")
        if mode == "device":
            x = jax.device_put(first["images"].reshape((-1,) + first["images"].shape[2:]))
            p = jax.device_put({k: v.reshape((-1,) + v.shape[2:])
                                for k, v in first["augment"].items()})
            fn = jax.jit(lambda x, p: augment.model_input(x, p, args.image))
            jax.block_until_ready(fn(x, p))
            t0 = time.perf_counter()
            for _ in range(3):
                jax.block_until_ready(fn(x, p))
            row["device_finish_ms_per_image"] = (time.perf_counter() - t0) / 3 / n * 1e3
        rows.append(row)
        print(f"  feed {mode}: {rate:.0f} images/s from {workers} workers, "
              f"{nbytes / 1e3:.0f} kB/image"
              + (f", device finish {row['device_finish_ms_per_image']:.3f} ms/image"
                 if mode == "device" else ""), flush=True)


def _random_variables(shapes, seed: int = 0):
    """He-initialised kernels, unit BN (no compile of model.init)."""
    import jax
    import numpy as np
    rng = np.random.RandomState(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if name.endswith(("['scale']", "['var']")):
            return np.ones(s.shape, np.float32)
        if name.endswith(("['bias']", "['mean']")):
            return np.zeros(s.shape, np.float32)
        return (rng.randn(*s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1]))).astype(np.float32)
    return jax.tree_util.tree_map_with_path(fill, shapes)


def _tree_bytes(tree) -> int:
    import jax
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(rows: list, header: str) -> str:
    lines = [header, ""]
    par = [r for r in rows if r["section"] == "parity"]
    if par:
        lines += [f"Parity: {par[0]['arch']} @ {par[0]['image']} px, {par[0]['weights']}; "
                  f"reference {par[0]['reference']}.", "",
                  "| run | max abs diff | max diff / max logit | top-1 agreement |",
                  "|---|---|---|---|"]
        for arch in dict.fromkeys(r["arch"] for r in par):
            mine = [r for r in par if r["arch"] == arch]
            if arch != par[0]["arch"]:
                lines += ["", f"Parity: {arch} @ {mine[0]['image']} px, {mine[0]['weights']}; "
                          f"reference {mine[0]['reference']}.", "",
                          "| run | max abs diff | max diff / max logit | top-1 agreement |",
                          "|---|---|---|---|"]
            lines += [f"| {r['run']} | {r['max_abs']:.2e} | {r['max_rel']:.2e} | "
                      f"{r['top1_agree']:.2f} |" for r in mine]
        lines.append("")
    thr = [r for r in rows if r["section"] == "throughput"]
    if thr:
        r0 = thr[0]
        lines += [f"Training throughput: {r0['arch']} @ {r0['image']} px, {r0['dtype']} compute, "
                  f"{r0['batch']} images per member per step, one {r0['device']}.", "",
                  "| members | strategy | images/s | vs one by one | step ms | compile s | "
                  "GiB/member (XLA) | device peak so far GiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in thr:
            if r.get("status") != "ok":
                lines.append(f"| {r['members']} | {r['strategy']} | {r['status']} | | | | | |")
                continue
            lines.append(
                f"| {r['members']} | {r['strategy']} | {r['images_per_s']:.1f} | "
                f"{_fmt(r.get('vs_one_by_one'), '.2f')} | {r['step_s'] * 1e3:.1f} | "
                f"{r['compile_s']:.1f} | {_fmt(r['xla_gib_per_member'], '.2f')} | "
                f"{_fmt(r['device_peak_gib'], '.1f')} |")
    fd = [r for r in rows if r["section"] == "feed" and r.get("status") == "ok"]
    if fd:
        step = {r["members"]: r for r in thr if r.get("status") == "ok"}
        lines += ["", "Training feed: member loader from the warm uint8 cache, "
                  f"{fd[0]['workers']} host workers, {fd[0]['image']} px.", "",
                  "| augmentation | images/s (host) | bytes/image shipped | "
                  "device finish ms/image |", "|---|---|---|---|"]
        for r in fd:
            lines.append(f"| {r['mode']} | {r['img_per_s']:.0f} | {r['bytes_per_image']:.0f} | "
                         f"{_fmt(r.get('device_finish_ms_per_image'), '.3f')} |")
        if step:
            best = max(step.values(), key=lambda r: r["images_per_s"])
            lines.append(f"\n(the fastest training row above consumes {best['images_per_s']:.0f} "
                         f"images/s: {1e3 / best['images_per_s']:.3f} ms per image)")
    rec = recommend(rows)
    if rec:
        lines += ["", f"Recommended local strategy on this device: {rec} (most images/s at the "
                  "largest member count)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    import jax
    from rat_jax import runtime
    runtime.quiet_logs()  # no compilation cache: the compile column is a real compile
    dev = jax.devices()[0]
    header = (f"device_check: {dev.device_kind} ({jax.default_backend()}, {jax.device_count()} "
              f"device(s)), jax {jax.__version__}, python {platform.python_version()}")
    print(header, flush=True)
    rows: list = []
    for arch in [a for a in args.parity_archs.split(",") if a]:
        parity(args, rows, arch)
        print(table([r for r in rows if r.get("arch") == arch], f"parity {arch} done in "
                    f"{time.time() - t0:.0f} s"), flush=True)
    throughput(args, rows, deadline=t0 + args.budget)
    feed(args, rows, deadline=t0 + args.budget + 60)
    report = table(rows, header)
    print(report)
    print(f"\ntotal {time.time() - t0:.0f} s")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(dict(header=header, rows=rows), indent=1))
    ok = [r for r in rows if r["section"] == "throughput" and r.get("status") == "ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
