"""The measurements of launch/device_check.py, one function per row kind; each returns the row's
fields (numbers, plus `value` and `detail`: the text of its table line).

  step        the reference member step: images/s, step ms, compile s, XLA GiB per member
  input       the input path at M members: (a) batch on the device, (b) uint8 crop windows +
              device augmentation, (c) fed by MemberLoader with its workers
  loader      MemberLoader alone, images/s
  eval        one ID-val evaluation pass (rat_jax.engine.loop.evaluate), seconds
  checkpoint  one save of the members' state (rat_jax.engine.resume.RunCheckpoints), seconds
  augment     device augmentation vs the PIL path on real crops: max absolute difference
  members     one member step by a stacked strategy vs members one by one: loss differences
and in launch/device_check.py (parity: ResNet-50 / EfficientNet-Lite0 logits vs torch float32)
and launch/device_e2e.py (e2e: a target-only protocol run, seconds per member-step).
"""
from __future__ import annotations

import dataclasses
import pathlib
import time

import numpy as np

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Shape:
    """One member step: model, images, members and how they run."""
    arch: str
    image: int
    batch: int          # images per member per step (all training domains)
    members: int
    strategy: str
    dtype: str
    classes: int = 7
    conv_impl: str = "auto"

    @property
    def label(self) -> str:
        return (f"{self.arch} {self.image}px b{self.batch} c{self.classes} M={self.members} "
                f"{self.strategy if self.members > 1 else 'one'} {self.dtype}")


# ----------------------------------------------------------------------------------------------
# Engines: one compiled engine per shape, shared by every row that runs it
# ----------------------------------------------------------------------------------------------
def random_variables(shapes, seed: int = 0):
    """He-initialised kernels, unit BN (no compile of model.init)."""
    import jax
    rng = np.random.RandomState(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if name.endswith(("['scale']", "['var']")):
            return np.ones(s.shape, np.float32)
        if name.endswith(("['bias']", "['mean']")):
            return np.zeros(s.shape, np.float32)
        return (rng.randn(*s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1]))).astype(np.float32)
    return jax.tree_util.tree_map_with_path(fill, shapes)


class Engines:
    """MemberEngines by Shape on the first device (compiled programs reused across rows)."""

    def __init__(self):
        self._engines: dict = {}
        self._variables: dict = {}

    def variables(self, shape: Shape) -> dict:
        import jax
        from rat_jax.models import create_model
        key = (shape.arch, shape.classes, shape.image)
        if key not in self._variables:
            model = create_model(shape.arch, shape.classes, conv_impl=shape.conv_impl)
            shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(
                (1, shape.image, shape.image, 3), np.float32))
            self._variables[key] = random_variables(shapes)
        return self._variables[key]

    def engine(self, shape: Shape):
        import jax
        from rat_jax.engine import members as members_lib
        from rat_jax.models import create_model
        if shape not in self._engines:
            model = create_model(shape.arch, shape.classes, conv_impl=shape.conv_impl,
                                 dtype=shape.dtype)
            self._engines[shape] = members_lib.MemberEngine(
                model, self.variables(shape)["batch_stats"], shape.members,
                members_lib.EngineConfig(devices=jax.devices()[:1], strategy=shape.strategy))
        return self._engines[shape]

    def live(self, shape: Shape, lr=1e-4, seeds=None):
        """Started members (LiveMembers) of `shape` from the random variables."""
        from rat_jax import trees
        from rat_jax.engine import members as members_lib
        engine = self.engine(shape)
        m = shape.members
        state = members_lib.init_state(trees.stack([self.variables(shape)["params"]] * m))
        hp = members_lib.make_hparams(m, lr=lr, seed=list(range(m)) if seeds is None else seeds)
        return engine.start(engine.place(state["members"]), engine.place(hp))

    def device_batch(self, shape: Shape) -> dict:
        """A random float32 batch already on the device."""
        import jax
        engine = self.engine(shape)
        key = jax.random.key(1)
        dims = (shape.members, shape.batch, shape.image, shape.image, 3)
        return {"images": jax.device_put(jax.random.normal(key, dims, np.float32),
                                         engine.batch_sharding),
                "labels": jax.device_put(jax.random.randint(key, dims[:2], 0, shape.classes),
                                         engine.batch_sharding)}


def _peak_gib() -> float | None:
    import jax
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - a backend without memory stats
        return None
    return stats["peak_bytes_in_use"] / GiB if stats and "peak_bytes_in_use" in stats else None


def _xla_gib(engines: Engines, shape: Shape, batch: dict) -> float | None:
    """XLA's compiled footprint of the step (arguments + outputs + temps - aliased) / M."""
    from rat_jax import trees
    from rat_jax.engine import members as members_lib
    engine = engines.engine(shape)
    try:
        params = engines.variables(shape)["params"]
        state = engine.place(members_lib.init_state(trees.stack([params] * shape.members)))
        hp = engine.place(members_lib.make_hparams(shape.members))
        mem = engine.train_memory(state, hp, batch)
        total = (mem["argument_size_in_bytes"] + mem["output_size_in_bytes"]
                 + mem["temp_size_in_bytes"] - mem.get("alias_size_in_bytes", 0))
        return total / GiB / shape.members
    except Exception:  # noqa: BLE001 - a backend without memory analysis
        return None


def timed_steps(live, batches, steps: int, images: int) -> dict:
    """One step (compiles), then `steps` timed steps; `batches`: a callable giving each batch."""
    import jax
    t0 = time.perf_counter()
    jax.block_until_ready(live.step(batches()))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        metrics = live.step(batches())
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / steps
    return dict(compile_s=compile_s, step_ms=step_s * 1e3, images_per_s=images / step_s)


def step_row(engines: Engines, shape: Shape, steps: int) -> dict:
    """The member step on a float32 batch already on the device (input path (a))."""
    batch = engines.device_batch(shape)
    live = engines.live(shape)
    row = timed_steps(live, lambda: batch, steps, shape.members * shape.batch)
    del live
    row.update(xla_gib_per_member=_xla_gib(engines, shape, batch),
               device_peak_gib=_peak_gib(), **dataclasses.asdict(shape))
    row["value"] = f"{row['images_per_s']:.1f} img/s"
    row["detail"] = (f"step {row['step_ms']:.1f} ms, first step {row['compile_s']:.1f} s, "
                     f"XLA {_num(row['xla_gib_per_member'], '.2f')} GiB/member, device peak "
                     f"{_num(row['device_peak_gib'], '.1f')} GiB")
    return row


def _num(x, spec):
    return "-" if x is None else format(x, spec)


# ----------------------------------------------------------------------------------------------
# The input path: generated images (some large), the loader, the fed step, evaluation, saving
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Feed:
    """The feed's images: `data` (a DomainBed-layout folder, e.g. the carried PACS subset) or
    generated 227-px JPEGs, plus `large` generated JPEGs of `large_side` px per class (their crop
    windows exceed the device canvas: the host-resize path)."""
    data: str = ""
    envs: int = 4
    classes: int = 4
    per_class: int = 8
    large: int = 2
    large_side: int = 1024


def _jpeg(path: pathlib.Path, side: int, seed: int) -> None:
    """A smooth, photo-like JPEG (real JPEG sizes and decode costs) of side x side * 3/4."""
    from PIL import Image
    base = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(base).resize((side, side * 3 // 4), Image.BICUBIC).save(path, quality=90)


def feed_folder(feed: Feed, root: pathlib.Path) -> pathlib.Path:
    """`root/feed/<env>/<class>/`: links to `feed.data`'s files (else generated 227-px JPEGs)
    and `feed.large` generated large JPEGs per class."""
    out = root / "feed"
    if feed.data:
        src = pathlib.Path(feed.data)
        envs = sorted(p for p in src.iterdir() if p.is_dir())
        if not envs:
            raise SystemExit(f"--data {src}: no domain folders (expected <domain>/<class>/<image>)")
        layout = {e.name: {c.name: sorted(f for f in c.iterdir() if f.is_file())
                           for c in sorted(p for p in e.iterdir() if p.is_dir())} for e in envs}
    else:
        layout = {f"env{e}": {f"c{c}": [] for c in range(feed.classes)} for e in range(feed.envs)}
    seed = 0
    for env, classes in layout.items():
        for cls, files in classes.items():
            d = out / env / cls
            d.mkdir(parents=True, exist_ok=True)
            for f in files:
                (d / f.name).symlink_to(f.resolve())
            for i in range(0 if files else feed.per_class):
                _jpeg(d / f"gen{i}.jpg", 227 * 4 // 3, seed := seed + 1)
            for i in range(feed.large):
                _jpeg(d / f"large{i}.jpg", feed.large_side, seed := seed + 1)
    return out


def loader(dataset, shape: Shape, cache: str, mode: str, **kw):
    """A MemberLoader of `shape`'s members over every env but env 0 (the test env), with every
    usable core; `shape.batch` images per member split evenly over the training envs."""
    from rat_jax.data import FeedOptions, MemberLoader, StreamSpec
    from rat_jax.runtime import usable_cores
    envs = list(range(1, dataset.num_envs))
    if shape.batch % len(envs):
        raise SystemExit(f"--batch {shape.batch} does not split over {len(envs)} training envs")
    spec = StreamSpec(batch_size=shape.batch // len(envs), image_size=shape.image,
                      augment_on=mode)
    feed = FeedOptions(**{"workers": usable_cores(), "cache_dir": cache, **kw})
    return MemberLoader(dataset, envs, list(range(1, shape.members + 1)), spec=spec, feed=feed)


def loader_row(source, steps: int) -> dict:
    """MemberLoader alone: `steps` batches after the first (which warms the cache)."""
    next(source)
    t0 = time.perf_counter()
    n = sum(int(np.prod(next(source)["labels"].shape)) for _ in range(steps))
    rate = n / (time.perf_counter() - t0)
    return dict(images_per_s=rate, workers=source.workers, worker_type=source.worker_type,
                value=f"{rate:.0f} img/s",
                detail=f"{source.workers} {source.worker_type} workers, prefetch {source.prefetch}")


def windows_row(engines: Engines, shape: Shape, batch: dict, steps: int) -> dict:
    """Input path (b): one loader batch of uint8 crop windows + augmentation parameters, copied
    to the device and finished there (augment.model_input in the compiled step) every step."""
    live = engines.live(shape)
    images = shape.members * shape.batch
    row = timed_steps(live, lambda: batch, steps, images)
    nbytes = sum(np.asarray(x).nbytes for x in [batch["images"], batch["labels"]]
                 + list(batch["augment"].values())) / images
    row.update(bytes_per_image=nbytes, value=f"{row['images_per_s']:.1f} img/s",
               detail=f"{nbytes / 1e3:.0f} kB/image shipped, step {row['step_ms']:.1f} ms, "
                      f"first step {row['compile_s']:.1f} s")
    return row


def fed_row(engines: Engines, shape: Shape, source, steps: int) -> dict:
    """Input path (c): the member step fed by the loader (its workers and prefetch) through the
    engine's device feed (each batch placed on the device while the step before it runs), as
    run_loop trains."""
    live = engines.live(shape)
    with engines.engine(shape).feed(source) as feed:
        row = timed_steps(live, lambda: next(feed), steps, shape.members * shape.batch)
    row.update(value=f"{row['images_per_s']:.1f} img/s",
               detail=f"{source.workers} {source.worker_type} workers, device prefetch "
                      f"{feed.depth}, step {row['step_ms']:.1f} ms")
    return row


def eval_row(engines: Engines, shape: Shape, dataset, cache: str, eval_batch: int) -> dict:
    """One ID-val evaluation pass (the training envs' out splits, augmented as the reference),
    seconds: the first pass (compiles) and a second one."""
    from rat_jax import stages
    from rat_jax.data import MemberStream
    from rat_jax.engine.loop import evaluate, id_val_names
    settings = stages.TrainSettings(arch=shape.arch, image_size=shape.image,
                                    eval_batch_size=eval_batch, cache_dir=cache,
                                    conv_impl=shape.conv_impl, compute_dtype=shape.dtype)
    run = stages.GroupRun(test_envs=[0], trial=0, steps=1, checkpoint_freq=1)
    stream = MemberStream(dataset, list(range(1, dataset.num_envs)), list(range(shape.members)),
                          0, settings.stream_spec())
    sets, _ = stages.eval_sets(dataset, run, settings, stream)
    sets = {n: sets[n] for n in id_val_names(dataset.num_envs, [0])}
    live = engines.live(shape)
    times = []
    for step in (0, 1):
        t0 = time.perf_counter()
        evaluate(engines.engine(shape), live.params_for_eval(), sets, step=step)
        times.append(time.perf_counter() - t0)
    n = sum(len(dataset.splits(0, 0.2)[e][0]) for e in range(1, dataset.num_envs))
    return dict(seconds=times[1], first_s=times[0], images=n, images_per_s=n * shape.members
                / times[1], value=f"{times[1]:.2f} s",
                detail=f"{n} images x {shape.members} members, batch {eval_batch}, first pass "
                       f"{times[0]:.1f} s")


def checkpoint_row(engines: Engines, shape: Shape, directory: pathlib.Path) -> dict:
    """One save of the members' stacked state (params, Adam state) as the training loop saves
    (asynchronous): the blocking part (the copy to host memory: what training waits for) and the
    time until the files are on disk."""
    import jax
    from rat_jax.engine.resume import RunCheckpoints
    state = jax.block_until_ready(engines.live(shape).stacked())
    ckpts = RunCheckpoints(directory)
    t0 = time.perf_counter()
    ckpts.save(0, {"members": state}, {"step": 0})
    blocking = time.perf_counter() - t0
    ckpts.close()
    seconds = time.perf_counter() - t0
    mb = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 2 ** 20
    return dict(seconds=seconds, blocking_s=blocking, mb=mb, value=f"{seconds:.2f} s",
                detail=f"{mb:.0f} MiB, {shape.members} members, training blocked "
                       f"{blocking:.2f} s")


# ----------------------------------------------------------------------------------------------
# Correctness on the device
# ----------------------------------------------------------------------------------------------
def augment_row(dataset, shape: Shape, cache: str, min_crops: int) -> dict:
    """The device augmentation (augment.model_input, jitted on the device) of the loader's crop
    windows against the host (PIL) path's images of the same draws: max absolute difference of
    the normalized images (expected 0) over >= `min_crops` crops, and how many were resized on
    the host first (windows larger than the canvas)."""
    import jax
    from rat_jax.data import augment
    kw = dict(prefetch=0, workers=1)
    host, dev = loader(dataset, shape, cache, "host", **kw), loader(dataset, shape, cache,
                                                                   "device", **kw)
    finish = jax.jit(jax.vmap(lambda x, a: augment.model_input(x, a, shape.image)))
    worst, n, resized, step = 0.0, 0, 0, 0
    with host, dev:
        while n < min_crops:
            want, got = host.batch(step), dev.batch(step)
            out = np.asarray(finish(got["images"], got["augment"]))
            worst = max(worst, float(np.abs(out - want["images"]).max()))
            n += int(np.prod(got["labels"].shape))
            resized += int(((got["augment"]["height"] == shape.image)
                            & (got["augment"]["width"] == shape.image)).sum())
            step += 1
    return dict(max_abs=worst, crops=n, host_resized=resized, value=f"max |diff| {worst:.3g}",
                detail=f"{n} crops ({resized} resized on the host first), expected 0")


def members_row(engines: Engines, shape: Shape, tolerance: float) -> dict:
    """Two member steps of `shape` (a stacked strategy) against the same members trained one
    by one on one-member engines: the largest relative difference of their losses (step 1: the
    same params; step 2: after one update), within `tolerance`."""
    m = shape.members
    batch = engines.device_batch(shape)
    lrs = [1e-4 * (1 + i) for i in range(m)]
    live = engines.live(shape, lr=lrs)
    stacked = [np.asarray(live.step(batch)["loss"]) for _ in range(2)]
    one = dataclasses.replace(shape, members=1)
    single = np.zeros((2, m))
    for i in range(m):
        part = {k: v[i:i + 1] for k, v in batch.items()}
        alone = engines.live(one, lr=[lrs[i]], seeds=[i])
        for s in range(2):
            single[s, i] = float(np.asarray(alone.step(part)["loss"])[0])
    stacked = np.asarray(stacked, np.float64).reshape(2, m)
    rel = np.abs(stacked - single) / np.maximum(np.abs(single), 1e-12)
    worst = float(rel.max())
    return dict(max_rel=worst, step1_rel=float(rel[0].max()), tolerance=tolerance,
                within=worst <= tolerance, **dataclasses.asdict(shape),
                value=f"max rel {worst:.2e}",
                detail=f"{'within' if worst <= tolerance else 'OUTSIDE'} {tolerance:g}; step 1 "
                       f"(same params) {rel[0].max():.2e}")
