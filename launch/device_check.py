"""The accelerator check: the reference member step, the input path, correctness on the device
and a short target-only run, each row printed as soon as it is measured, within a time budget.

    python launch/device_check.py --data device_carry/data/PACS --out $OUT   # one GPU/TPU
    python launch/device_check.py --tiny --out /tmp/dc                        # CPU, seconds

Rows, in this order (launch/device_rows.py says what each measures):
  step        ResNet-50 at 224 px, 96 images per member (PACS: 32 x 3 training domains),
              M in --members, strategies --strategies, dtypes --dtypes, the first one first;
  input       at the largest M: (a) the batch already on the device, (b) uint8 crop windows +
              device augmentation, (c) fed by MemberLoader with every host core, over --data
              (the carried PACS subset) plus generated >= 1,000-px JPEGs (host-resize path);
  loader, eval, checkpoint    the loader alone (images/s), one ID-val pass, one save (s);
  augment     device augmentation vs the PIL path (max abs difference, expected 0);
  members     one member step by the stacked strategy vs one by one, per dtype;
  step        the remaining step rows and one DomainNet-shaped row (160 images, 345 classes);
  parity      ResNet-50 and EfficientNet-Lite0 logits, JAX float32/bf16 vs torch float32;
  e2e         a ResNet-50 target-only run through rat_jax.pipeline (launch/device_e2e.py).
Each row runs in its own try/except (an error is one line, the next row runs); a row that would
not fit the budget's remainder is `skipped` (the e2e row keeps --e2e-reserve seconds for itself).
After the first step row, JAX's persistent compilation cache (--cache-dir) serves repeated
compiles. After every row, --out gets device_check.json (every row) and device_check.md (the
table); everything else (caches, workdirs, the e2e console log) goes to --work.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # no XLA/absl INFO and WARNING lines

import device_rows as R  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--tiny", action="store_true", help="CPU rehearsal in seconds: resnet_tiny, 32 px, M {1,2}")
    a("--arch", default="resnet50")
    a("--image", type=int, default=224)
    a("--batch", type=int, default=96, help="images per member per step (32 x 3 domains)")
    a("--members", default="7,1", help="members per device of the step rows")
    a("--strategies", default="map,loop", help="local strategies (engine.strategies)")
    a("--dtypes", default="bfloat16,float32", help="compute dtypes of the step rows")
    a("--domainnet-batch", type=int, default=160, help="DomainNet-shaped row (0: none)")
    a("--steps", type=int, default=5, help="timed steps per row (after one compiling step)")
    a("--data", default="", help="DomainBed-layout folder for the input rows (default: "
      "generated images); the carried PACS subset: device_carry/data/PACS")
    a("--large", type=int, default=2, help="generated >= 1,000-px JPEGs per class")
    a("--eval-batch", type=int, default=256)
    a("--min-crops", type=int, default=64, help="crops of the augmentation comparison")
    a("--parity-archs", default="resnet50,efficientnet_lite0")
    a("--parity-batch", type=int, default=8)
    a("--weights", default="", help="torch/safetensors ResNet-50 file for parity")
    a("--e2e-steps", type=int, default=150, help="steps of the e2e run (0: none)")
    a("--e2e-reserve", type=float, default=150.0, help="seconds kept for the e2e row")
    a("--budget", type=float, default=330.0, help="seconds for every row, e2e included")
    a("--out", default="", help="folder for device_check.json and device_check.md")
    a("--work", default="", help="caches, workdirs, logs (default: a new folder in /tmp)")
    a("--cache-dir", default="", help="persistent compilation cache (default: WORK/xla_cache)")
    a("--conv-impl", default="auto", help="rat_jax conv algorithm (models.CONV_IMPLS)")
    args = p.parse_args(argv)
    if args.tiny:
        tiny(args, p)
    return args


def tiny(args, parser) -> None:
    """CPU sizes: every row kind, little compiling (explicit options are kept)."""
    sizes = dict(arch="resnet_tiny", image=32, batch=6, members="2,1", domainnet_batch=10,
                 steps=2, large=1, eval_batch=32, min_crops=64, parity_archs="resnet_tiny",
                 parity_batch=4, e2e_steps=4, e2e_reserve=30.0, budget=600.0, conv_impl="xla")
    for k, v in sizes.items():
        if getattr(args, k) == parser.get_default(k):
            setattr(args, k, v)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # a rehearsal: halve XLA:CPU compile times (its timings mean nothing anyway)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                               " --xla_llvm_disable_expensive_passes=true").strip()


# ----------------------------------------------------------------------------------------------
# Rows: run, print, save
# ----------------------------------------------------------------------------------------------
def _is_oom(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


class Check:
    """Runs rows within the budget; prints each at once; rewrites the JSON and table after each."""

    def __init__(self, header: str, budget: float, out: str):
        self.header, self.rows = header, []
        self.t0 = time.time()
        self.deadline = self.t0 + budget
        self.out = pathlib.Path(out) if out else None
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.time()

    def row(self, kind: str, name: str, fn, need: float = 0.0, keep: float = 0.0) -> dict:
        """Run `fn()` (its fields) as row `kind`/`name` when `need` seconds fit the remaining
        budget less `keep`; an error or OOM becomes the row's status, never an exception."""
        row = dict(kind=kind, name=name)
        spare = self.left() - keep
        if need > spare:
            row["status"] = f"skipped (needs ~{need:.0f} s, {max(spare, 0):.0f} s left)"
        else:
            t0 = time.time()
            try:
                row.update(fn())
                row["status"] = "ok"
            except Exception as e:  # noqa: BLE001 - a failing row must not lose the next ones
                first = (str(e).strip().splitlines() or [""])[0][:160]
                row["status"] = "OOM" if _is_oom(e) else f"error: {type(e).__name__}: {first}"
            row["wall_s"] = time.time() - t0
            gc.collect()
        self.rows.append(row)
        print(f"[{time.time() - self.t0:5.0f} s] {kind:10s} {name}: "
              + (f"{row.get('value', '')}  ({row.get('detail', '')})" if row["status"] == "ok"
                 else row["status"]), flush=True)
        self.save()
        return row

    def save(self) -> None:
        if not self.out:
            return
        (self.out / "device_check.json").write_text(json.dumps(
            dict(header=self.header, rows=self.rows), indent=1, default=str))
        (self.out / "device_check.md").write_text(table(self.rows, self.header) + "\n")


def table(rows: list, header: str) -> str:
    lines = [header, "", "| kind | row | result | details |", "|---|---|---|---|"]
    for r in rows:
        ok = r.get("status") == "ok"
        lines.append(f"| {r['kind']} | {r['name']} | {r.get('value', '') if ok else r['status']} "
                     f"| {r.get('detail', '') if ok else ''} |")
    rec = recommend(rows)
    if rec:
        lines += ["", f"Most images/s at the largest member count: {rec}."]
    return "\n".join(lines)


def recommend(rows: list) -> str | None:
    """The strategy and dtype of the fastest step row at the largest member count."""
    ok = [r for r in rows if r["kind"] == "step" and r.get("status") == "ok"
          and r.get("members", 1) > 1 and r.get("classes") != 345]
    if not ok:
        return None
    m = max(r["members"] for r in ok)
    best = max((r for r in ok if r["members"] == m), key=lambda r: r["images_per_s"])
    return f"{best['strategy']} {best['dtype']} (M={m}, {best['images_per_s']:.0f} img/s)"


# ----------------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------------
def _torch_reference(arch: str, seed: int = 0):
    """A random torchvision-layout torch model from tests/torch_reference.py, or None (no torch)."""
    try:
        import torch  # noqa: F401
        sys.path.insert(0, str(REPO / "tests"))
        import torch_reference
    except ImportError:
        return None
    refs = torch_reference.REFERENCES
    return torch_reference.randomize_(refs[arch](1000 if arch != "resnet_tiny" else 10), seed)


def _parity_variables(args, arch: str, images):
    """(variables, where they come from, the torch model or None)."""
    import jax
    from rat_jax.convert.converter import convert_state_dict, convert_torch_checkpoint
    from rat_jax.convert.reader import canonicalize_state_dict
    from rat_jax.models import create_model
    if args.weights and arch == "resnet50":
        return (convert_torch_checkpoint(args.weights, arch),
                f"converted {pathlib.Path(args.weights).name}", _torch_from_weights(args))
    torch_model = _torch_reference(arch)
    if torch_model is not None:
        sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
        variables, _ = convert_state_dict(canonicalize_state_dict(sd), arch)
        return variables, "random torchvision-layout weights, converted", torch_model
    model = create_model(arch, 1000, conv_impl=args.conv_impl)
    return jax.jit(model.init)(jax.random.key(0), images[:1]), "random JAX weights (no torch)", None


def parity(args, arch: str) -> dict:
    """Logits of `arch` in JAX float32 (highest and default precision) and bfloat16 against torch
    float32 on CPU (else JAX float32 highest): one row, the runs in `runs`."""
    import jax
    import numpy as np
    from rat_jax.models import create_model
    images = np.random.RandomState(0).randn(args.parity_batch, args.image, args.image,
                                            3).astype(np.float32)
    variables, source, torch_model = _parity_variables(args, arch, images)
    num_classes = int(np.shape(variables["params"]["classifier"]["kernel"])[1])
    runs = [("jax float32 highest", "float32", "highest"), ("jax float32 default", "float32", None),
            ("jax bfloat16", "bfloat16", None)]
    if jax.default_backend() == "cpu":  # no TF32 on CPU: "default" is "highest"
        runs = [runs[0], runs[2]]
    outs = {}
    for name, dtype, precision in runs:
        model = create_model(arch, num_classes, conv_impl=args.conv_impl, dtype=dtype)
        with jax.default_matmul_precision(precision or "default"):
            outs[name] = np.asarray(jax.jit(model.apply)(variables, images), np.float64)
    ref, ref_name = outs["jax float32 highest"], "jax float32 highest"
    if torch_model is not None:
        import torch
        with torch.no_grad():
            ref = torch_model.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
        ref_name = "torch float32 (CPU)"
    scale = max(float(np.abs(ref).max()), 1e-12)
    runs = [dict(run=name, max_abs=float(np.abs(x - ref).max()),
                 max_rel=float(np.abs(x - ref).max()) / scale,
                 top1_agree=float(np.mean(x.argmax(-1) == ref.argmax(-1))))
            for name, x in outs.items()]
    return dict(runs=runs, reference=ref_name, weights=source, arch=arch, image=args.image,
                value=", ".join(f"{r['run'][4:]} {r['max_rel']:.1e}" for r in runs),
                detail=f"max |diff| / max |logit| vs {ref_name}; top-1 agreement "
                       + "/".join(f"{r['top1_agree']:.2f}" for r in runs) + f"; {source}")


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
    except Exception as e:  # noqa: BLE001 - the JAX-only comparison still runs
        print(f"(torch reference for {args.weights} unavailable: {e})", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------
def _split(text: str, kind=str) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def step_shapes(args) -> list:
    """Step rows in order: the reference (first member count, strategy and dtype) first, one
    member next (the members row needs it), then the rest; the DomainNet-shaped row last."""
    members, strategies, dtypes = (_split(args.members, int), _split(args.strategies),
                                   _split(args.dtypes))
    if not (members and strategies and dtypes):
        raise SystemExit("--members, --strategies and --dtypes each need at least one value")

    def shape(m, s, d, batch=args.batch, classes=7):
        return R.Shape(args.arch, args.image, batch, m, s, d, classes, args.conv_impl)
    shapes = [shape(members[0], strategies[0], dtypes[0]), shape(1, strategies[0], dtypes[0])]
    shapes += [shape(m, s, d) for s in strategies for d in dtypes for m in members
               if m > 1 or s == strategies[0]]
    if args.domainnet_batch:
        shapes.append(shape(max(members), strategies[0], dtypes[0], args.domainnet_batch, 345))
    return list(dict.fromkeys(shapes))


def enable_cache(path: pathlib.Path) -> None:
    """JAX's persistent compilation cache from now on (the first row's compile stays a real
    compile), in a folder outside the output folder."""
    from jax._src import compilation_cache
    from rat_jax import runtime
    runtime.enable_compilation_cache(str(path))
    compilation_cache.reset_cache()  # the cache was checked (absent) at the first compile
    print(f"(compilation cache: {path})", flush=True)


class Plan:
    """Every row of one check, in order (the module docstring)."""

    def __init__(self, args, check: Check, work: pathlib.Path):
        self.args, self.check, self.work = args, check, work
        self.engines = R.Engines()
        self.shapes = step_shapes(args)
        self.keep = args.e2e_reserve if args.e2e_steps else 0.0
        self.compile_s = 0.0  # the wall time of the last step row: the next compile's estimate

    def row(self, kind, name, fn, compiles: float = 0.0):
        return self.check.row(kind, name, fn, need=compiles * self.compile_s, keep=self.keep)

    def step(self, shape) -> None:
        r = self.row("step", shape.label, lambda: R.step_row(self.engines, shape,
                                                             self.args.steps), compiles=1)
        if r["status"] == "ok":
            self.compile_s = max(self.compile_s, r["compile_s"])

    def run(self) -> None:
        a, ref = self.args, self.shapes[0]
        self.step(ref)
        enable_cache(pathlib.Path(a.cache_dir or self.work / "xla_cache"))
        self.inputs(ref)
        for d in _split(a.dtypes)[:1]:
            self.members(dataclasses.replace(ref, dtype=d))
        for shape in self.shapes[1:]:
            self.step(shape)
        for d in _split(a.dtypes)[1:]:
            self.members(dataclasses.replace(ref, dtype=d))
        for arch in _split(a.parity_archs):
            self.row("parity", f"{arch} {a.image}px", lambda: parity(a, arch), compiles=0.5)
        if a.e2e_steps:
            self.e2e()

    def members(self, shape) -> None:
        tol = 1e-3 if shape.dtype == "float32" else 5e-2
        self.row("members", f"{shape.label} vs one by one",
                 lambda: R.members_row(self.engines, shape, tol), compiles=1)

    def inputs(self, ref) -> None:
        a, work = self.args, self.work
        cache = str(work / "image_cache")
        holder = {}

        def dataset():
            from rat_jax.data import load_folder
            if "ds" not in holder:
                holder["ds"] = load_folder(self.feed_root())
            return holder["ds"]
        self.row("input", "(a) batch on the device",
                 lambda: R.step_row(self.engines, ref, a.steps))
        src = self.row("loader", "MemberLoader, device mode",
                       lambda: self._loader_fields(holder, dataset(), ref, cache))
        if src["status"] == "ok":
            feed = holder["loader"]
            self.row("input", "(b) uint8 windows + device augmentation",
                     lambda: R.windows_row(self.engines, ref, holder["batch"], a.steps),
                     compiles=0.5)
            self.row("input", "(c) fed by MemberLoader",
                     lambda: R.fed_row(self.engines, ref, feed, a.steps))
            feed.close()
        self.row("eval", "one ID-val pass", lambda: R.eval_row(self.engines, ref, dataset(),
                                                               cache, a.eval_batch), compiles=0.3)
        self.row("checkpoint", "one save", lambda: R.checkpoint_row(
            self.engines, ref, work / "checkpoint"))
        self.row("augment", "device vs PIL", lambda: R.augment_row(
            dataset(), dataclasses.replace(ref, members=1), cache, a.min_crops), compiles=0.2)

    def feed_root(self) -> pathlib.Path:
        """The input rows' and the e2e run's images (made once)."""
        root = self.work / "feed"
        if not root.is_dir():
            R.feed_folder(R.Feed(data=self.args.data, large=self.args.large), self.work)
        return root

    def _loader_fields(self, holder, dataset, ref, cache):
        holder["loader"] = R.loader(dataset, ref, cache, "device")
        holder["batch"] = holder["loader"].batch(0)
        return R.loader_row(holder["loader"], self.args.steps)

    def e2e(self) -> None:
        from device_e2e import E2E, e2e_row
        a = self.args
        members = _split(a.members, int)[0]

        def run():
            root = self.feed_root()
            envs = sum(p.is_dir() for p in root.iterdir())
            return e2e_row(E2E(data=str(root), root=str(self.work / "e2e"), arch=a.arch,
                               image=a.image, batch=a.batch // (envs - 1), members=members,
                               steps=a.e2e_steps, eval_every=max(1, a.e2e_steps // 3),
                               probe_steps=max(2, a.e2e_steps // 8), dtype=_split(a.dtypes)[0],
                               conv_impl=a.conv_impl))
        self.check.row("e2e", f"target-only run, {a.arch}, {members} members", run,
                       need=self.keep * 0.8)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    from rat_jax import runtime
    runtime.quiet_logs()
    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="rat_jax_device_"))
    work.mkdir(parents=True, exist_ok=True)
    dev = jax.devices()[0]
    header = (f"device_check: {dev.device_kind} ({jax.default_backend()}, {jax.device_count()} "
              f"device(s)), jax {jax.__version__}, python {platform.python_version()}, "
              f"budget {args.budget:.0f} s")
    print(header, flush=True)
    check = Check(header, args.budget, args.out)
    Plan(args, check, work).run()
    print("\n" + table(check.rows, header), flush=True)
    print(f"\ntotal {time.time() - check.t0:.0f} s; rows in {args.out or '(no --out)'}")
    return 0 if any(r["kind"] == "step" and r["status"] == "ok" for r in check.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
