"""Per-member training streams and evaluation iteration.

Every step, each member draws one batch of `batch_size` per training env, with replacement,
from that env's `in` split, and the per-env batches are concatenated in env order (DomainBed's
InfiniteDataLoader + RandomSampler(replacement=True)). Step s of member m depends only on
(seed_m, s): sample indices and augmentation come from numpy Generators seeded by
(seed_m, s, env) -- so the stream is deterministic, resumable from a step count, and can be
computed by any number of workers in any order.
"""
import collections
import concurrent.futures
import concurrent.futures.process
import warnings
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from PIL import Image

from rat_jax.data import transforms as T
from rat_jax.data import workers as W
from rat_jax.data.store import DEFAULT_CACHE, ImageStore, default_workers
from rat_jax.runtime import usable_cores

STATE_VERSION = 1
AUGMENT_MODES = ("host", "device")
WORKER_TYPES = ("auto", "thread", "process")
DEFAULT_PREFETCH = 2  # steps computed ahead of the one being consumed


def device_canvas(size: int) -> int:
    """Default canvas side of the device mode: a little over `size` (PACS's 227-px images fit
    whole at 224), rounded up to a multiple of 8. Larger windows are resized on the host."""
    return -(-(size * 33 // 32 + 1) // 8) * 8


_PARAM_DTYPES = {"flip": np.bool_, "grayscale": np.bool_, "brightness": np.float32,
                 "contrast": np.float32, "saturation": np.float32}


def _as_list(x, n, what):
    if isinstance(x, (int, np.integer)):
        return [int(x)] * n
    x = [int(v) for v in x]
    if len(x) != n:
        raise ValueError(f"{what} has {len(x)} entries for {n} members")
    return x


# worker_type="auto" (see resolve_worker_type): processes need this many usable cores, and per
# worker this many images per step (host mode: PIL transforms; device mode: crop windows only,
# far cheaper per image; per-image costs in docs/benchmarks.md).
AUTO_MIN_CORES = 4
AUTO_MIN_IMAGES_PER_WORKER = {"host": 16, "device": 256}


def resolve_worker_type(worker_type: str, workers: int, dataset, images_per_step: int,
                        mode: str) -> str:
    """"thread" or "process" for MemberLoader's `worker_type`.

    "auto" picks processes when all hold: workers >= 2; at least AUTO_MIN_CORES usable cores;
    the dataset is read from files (an in-memory `arrays` dataset would be copied into every
    worker); and the step has at least AUTO_MIN_IMAGES_PER_WORKER[mode] images per worker
    (mode: "host" = PIL transform, "device" = crop windows only). Else threads.

    Why: processes cost a fixed coordination overhead per step (shared memory, futures) and
    pay off only when threads stop scaling, i.e. when the GIL-held Python of each sample
    (Generator construction, draws, slicing) is spread over several cores and a worker's share
    of a step dwarfs that overhead. The thresholds are that overhead scaled to the per-image
    cost of each mode (docs/benchmarks.md, the training-feed section).
    """
    if worker_type != "auto":
        return worker_type
    cores = usable_cores()
    if (workers >= 2 and cores >= AUTO_MIN_CORES and getattr(dataset, "arrays", None) is None
            and images_per_step >= AUTO_MIN_IMAGES_PER_WORKER[mode] * workers):
        return "process"
    return "thread"


class MemberLoader:
    """Iterator of dict(images=[M, D*B, H, W, 3] float32, labels=[M, D*B] int32).

    `seeds`: one stream seed per member (e.g. protocol.run_seed). `trial_seeds`: the split
    seed per member (int for all). `train_envs`: env indices trained on, in env order.
    `output="uint8"` skips normalization (normalize on device with augment.model_input).
    `cache_side`: None (default) cuts crops from the original images, as the reference; S caps
    the cached images' shorter side at S (faster; a second resampling for larger images).

    `augment_on="device"`: the host draws every random choice of the transform (the same draws
    as the host mode) and only cuts each crop window out of the cached image; it ships uint8
    canvases [M, D*B, C, C, 3] (C = `canvas`, default device_canvas(image_size)) with the
    window at the top-left, plus `augment` = {name: [M, D*B, ...]} (augment.WINDOW_PARAMS) and
    `image_size`. The compiled step finishes the transform (resize, flip, colour jitter,
    grayscale, normalization: augment.model_input), so the images the network sees are those
    of the host mode. A window larger than the canvas is resized to image_size on the host
    (the same single resampling; the device's resize of it is then the identity).

    `workers` (default: the usable cores, at most 8) computes each step's samples in parallel;
    `worker_type` says how:
    - "thread": a thread pool in this process. Python parts of the per-sample work (Generator
      construction, parameter draws, slicing) hold the GIL, so threads stop scaling with cores.
    - "process": `workers` worker processes (started with "spawn", never fork), each with its
      own ImageStore over the same cache dir (the cache is warmed in this process first); each
      computes a share of the step's plan and writes images, labels and augment parameters
      into a shared-memory segment whose arrays are the returned batch (no image is pickled).
      A segment is reused only after every array of the batch it holds has been garbage
      collected, so the arrays stay valid for as long as they are referenced (see workers.py).
      close() (or `with`, or garbage collection) ends the processes and unlinks the segments.
      An error in a worker (ImageDecodeError naming the file, ...) is raised here unchanged.
    - "auto" (default): see `resolve_worker_type`.
    The batches are bit-identical for every worker type, worker count and prefetch depth.
    """

    def __init__(self, dataset, train_envs: Sequence[int], seeds: Sequence[int], *,
                 trial_seeds: Union[int, Sequence[int]] = 0, batch_size: int = 32,
                 image_size: int = 224, augment: bool = True, holdout_fraction: float = 0.2,
                 store: Optional[ImageStore] = None, cache_dir=DEFAULT_CACHE,
                 cache_side: Optional[int] = None, workers: Optional[int] = None,
                 prefetch: int = DEFAULT_PREFETCH, output: str = "float32",
                 augment_on: str = "host",
                 canvas: Optional[int] = None, worker_type: str = "auto"):
        if worker_type not in WORKER_TYPES:
            raise ValueError(f"worker_type={worker_type!r}: use one of {WORKER_TYPES}")
        if augment_on not in AUGMENT_MODES:
            raise ValueError(f"augment_on={augment_on!r}: use one of {AUGMENT_MODES}")
        if not len(seeds):
            raise ValueError("MemberLoader needs at least one member seed")
        if any(int(s) < 0 for s in seeds):
            raise ValueError(f"member seeds must be >= 0, got {list(seeds)}")
        if output not in ("float32", "uint8"):
            raise ValueError(f"output={output!r}: use 'float32' or 'uint8'")
        self.dataset = dataset
        self.train_envs = [dataset.env_index(e) for e in train_envs]
        if not self.train_envs:
            raise ValueError("train_envs is empty: pass the indices of the envs to train on")
        self.seeds = [int(s) for s in seeds]
        self.trial_seeds = _as_list(trial_seeds, len(self.seeds), "trial_seeds")
        self.batch_size, self.image_size, self.augment = batch_size, image_size, augment
        self.output = output
        self.augment_on = augment_on
        self.canvas = int(canvas or device_canvas(image_size))
        if self.canvas < image_size:
            raise ValueError(f"canvas={self.canvas} is smaller than image_size={image_size}")
        self.store = store or ImageStore(dataset, cache_dir, workers)
        self.cache_side = cache_side or None  # None: crops cut from the original images
        self.workers = workers or default_workers()
        self.prefetch = prefetch
        self.worker_type = resolve_worker_type(worker_type, self.workers, dataset,
                                               len(self.seeds) * len(self.train_envs)
                                               * batch_size, augment_on if augment else "host")
        splits = {t: dataset.splits(t, holdout_fraction) for t in set(self.trial_seeds)}
        self.pools = [[splits[t][e][1] for e in self.train_envs] for t in self.trial_seeds]
        for e, pool in zip(self.train_envs, self.pools[0]):
            if len(pool) == 0:
                raise ValueError(f"env {dataset.envs[e]!r} has an empty in split; it cannot be "
                                 "trained on")
        self._pool = None
        self._procs = None      # W.ProcessWorkers of worker_type="process", started on first use
        self._auto_workers = worker_type == "auto"
        self._process_batches = 0
        self._producer = None
        self._queue = collections.deque()
        self._step = 0
        self.local_members = None  # None: every member; else only these are decoded (load_only)

    def load_only(self, members: Sequence[int] | None) -> None:
        """Decode and augment only `members` (e.g. those whose batches live on this process's
        devices in a multi-process run); the other members' rows of each batch stay zero and
        are never read. The loaded members' rows are the same as with every member loaded."""
        if members is not None:
            members = sorted({int(i) for i in members})
            bad = [i for i in members if not 0 <= i < self.num_members]
            if bad:
                raise ValueError(f"load_only: members {bad} outside 0..{self.num_members - 1}")
        if self._queue:
            raise RuntimeError("load_only must be called before the first batch is drawn")
        self.local_members = members

    @property
    def num_members(self):
        return len(self.seeds)

    # -- pure per-step computation ----------------------------------------------------------
    def plan(self, step: int):
        """[(member, slot, env, dataset index, sample seed)] of one step, fully determined."""
        out = []
        for m, seed in enumerate(self.seeds):
            for d, (env, pool) in enumerate(zip(self.train_envs, self.pools[m])):
                rng = np.random.default_rng([seed, step, env])
                picks = pool[rng.integers(0, len(pool), self.batch_size)]
                sample_seeds = rng.integers(0, 2**63 - 1, self.batch_size)
                for b in range(self.batch_size):
                    out.append((m, d * self.batch_size + b, env, int(picks[b]),
                                int(sample_seeds[b])))
        return out

    def _sample(self, env, idx, sample_seed):
        if not self.augment:
            return self.store.eval_array(env, idx, self.image_size)
        img = self.store.train_image(env, idx, self.cache_side)
        return T.train_transform_uint8(img, self.image_size, np.random.default_rng(sample_seed))

    def _window(self, env, idx, sample_seed, out, params, where):
        """Device mode: draw the sample's parameters, cut its crop window into `out` (a zeroed
        canvas) and store the parameters at `where` in `params`."""
        src = self.store.train_array(env, idx, self.cache_side)
        h_img, w_img = src.shape[:2]
        p = T.window_params(np.random.default_rng(sample_seed), w_img, h_img)
        top, left, h, w = p["top"], p["left"], p["height"], p["width"]
        window = src[top:top + h, left:left + w]
        if h > self.canvas or w > self.canvas:
            size = self.image_size
            window = np.asarray(Image.fromarray(np.ascontiguousarray(window)).resize(
                (size, size), Image.BILINEAR))
            h = w = size
        out[:h, :w] = window
        p["height"], p["width"] = h, w
        for k in T.WINDOW_PARAMS:
            params[k][where] = p[k]

    def batch(self, step: int) -> dict:
        """The batch of `step` (same result whenever and wherever it is computed)."""
        if self.worker_type == "process":
            return self._process_result(self._submit(step), step)
        return self._thread_batch(step)

    def _thread_batch(self, step: int) -> dict:
        plan = self.plan(step)
        m_count, n = self.num_members, len(self.train_envs) * self.batch_size
        device = self.augment and self.augment_on == "device"
        side = self.canvas if device else self.image_size
        shape = (m_count, n, side, side, 3)
        if self.local_members is not None:  # zeros: pages never written are never touched
            keep = set(self.local_members)
            plan = [item for item in plan if item[0] in keep]
        images = np.zeros(shape, np.uint8) if device or self.local_members is not None \
            else np.empty(shape, np.uint8)
        labels = np.zeros((m_count, n), np.int32)
        params = {k: np.zeros((m_count, n) + (4,) * (k == "order"),
                              _PARAM_DTYPES.get(k, np.int32))
                  for k in T.WINDOW_PARAMS} if device else None
        samples = self.dataset.samples

        def one(item):
            m, slot, env, idx, sseed = item
            if device:
                self._window(env, idx, sseed, images[m, slot], params, (m, slot))
            else:
                images[m, slot] = self._sample(env, idx, sseed)
            labels[m, slot] = samples[env][idx][1]
        pool = self._get_pool()
        if pool is None:
            for item in plan:
                one(item)
        else:
            list(pool.map(one, plan))
        if device:
            return {"images": images, "labels": labels, "augment": params,
                    "image_size": self.image_size}
        return {"images": T.normalize(images) if self.output == "float32" else images,
                "labels": labels}

    # -- process workers --------------------------------------------------------------------
    def _layout(self):
        m_count, n = self.num_members, len(self.train_envs) * self.batch_size
        device = self.augment and self.augment_on == "device"
        side = self.canvas if device else self.image_size
        dtype = np.float32 if not device and self.output == "float32" else np.uint8
        fields = [("images", dtype, (m_count, n, side, side, 3)),
                  ("labels", np.int32, (m_count, n))]
        if device:
            fields += [(f"augment.{k}", _PARAM_DTYPES.get(k, np.int32),
                        (m_count, n) + (4,) * (k == "order")) for k in T.WINDOW_PARAMS]
        return W.make_layout(fields)

    def _fill_rows(self, items, arrays):
        """Worker side: compute `items` of a plan into the shared arrays, exactly as
        _thread_batch does (float32 images normalized per image: an elementwise map, so the
        same bits; device canvases zeroed outside the window, as a fresh zeroed batch)."""
        device = self.augment and self.augment_on == "device"
        images, labels = arrays["images"], arrays["labels"]
        params = {k: arrays[f"augment.{k}"] for k in T.WINDOW_PARAMS} if device else None
        to_float = images.dtype == np.float32
        samples = self.dataset.samples
        for m, slot, env, idx, sseed in items:
            if device:
                out = images[m, slot]
                self._window(env, idx, sseed, out, params, (m, slot))
                h, w = int(params["height"][m, slot]), int(params["width"][m, slot])
                out[h:] = 0
                out[:h, w:] = 0
            elif to_float:
                images[m, slot] = T.normalize(self._sample(env, idx, sseed))
            else:
                images[m, slot] = self._sample(env, idx, sseed)
            labels[m, slot] = samples[env][idx][1]

    def _start_processes(self):
        """Warm the cache here (once, not in every worker), then start the workers."""
        if self._procs is None:
            envs = self.train_envs
            if not self.augment:
                self.store.warm(envs, eval_size=self.image_size, train=False)
            elif getattr(self.dataset, "arrays", None) is None:
                self.store.warm(envs, train_side=self.cache_side, train=True)
            self._procs = W.ProcessWorkers(self.workers, _RowFiller(self))
        return self._procs

    def _submit(self, step: int) -> "W.PendingBatch":
        procs = self._start_processes()
        plan = self.plan(step)
        loaded = set(range(self.num_members)) if self.local_members is None \
            else set(self.local_members)
        if self.local_members is not None:
            plan = [item for item in plan if item[0] in loaded]
        layout, size = self._layout()
        device = self.augment and self.augment_on == "device"
        # rows of members not loaded: zero, or normalize(0) (what _thread_batch returns there)
        fill_tag = "norm0" if not device and self.output == "float32" else "zero"

        def prepare(seg, arrays):
            for m in range(self.num_members):
                if m in loaded:
                    seg.rows[m] = "data"
                elif seg.rows.get(m, "zero") != fill_tag:
                    for key, a in arrays.items():
                        a[m] = 0
                    if fill_tag == "norm0":
                        arrays["images"][m] = T.normalize(np.zeros((1, 1, 3), np.uint8))
                    seg.rows[m] = fill_tag

        def finish(arrays):
            out = {"images": arrays["images"], "labels": arrays["labels"]}
            if device:
                out["augment"] = {k: arrays[f"augment.{k}"] for k in T.WINDOW_PARAMS}
                out["image_size"] = self.image_size
            return out

        # 2 chunks per worker: a worker that finishes early takes another share of the step
        k = max(1, min(len(plan), 2 * procs.n))
        chunks = [plan[len(plan) * i // k:len(plan) * (i + 1) // k] for i in range(k)]
        return procs.submit(layout, size, chunks, prepare, finish)

    def _process_result(self, pending: "W.PendingBatch", step: int) -> dict:
        """pending.result(); under worker_type="auto", workers that die before delivering any
        batch (e.g. a main script without the `__main__` guard spawn needs) mean threads."""
        try:
            out = pending.result()
        except concurrent.futures.process.BrokenProcessPool as e:
            if not self._auto_workers or self._process_batches:
                raise
            warnings.warn(f"worker_type='auto': the loader's worker processes failed ({e}); "
                          "using threads", RuntimeWarning, stacklevel=3)
            self._drop_prefetch()
            self._procs.close()
            self._procs, self.worker_type = None, "thread"
            return self._thread_batch(step)
        self._process_batches += 1
        return out

    # -- iteration with prefetch ------------------------------------------------------------
    def _get_pool(self):
        if self.workers <= 1:
            return None
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.workers)
        return self._pool

    def _start(self, step: int):
        """A handle (result(), cancel()) of the batch of `step`, computed in the background."""
        if self.worker_type == "process":
            return self._submit(step)  # the workers pipeline the prefetched steps themselves
        if self._producer is None:
            self._producer = concurrent.futures.ThreadPoolExecutor(1)
        return self._producer.submit(self.batch, step)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.prefetch <= 0:
            out = self.batch(self._step)
        else:
            while len(self._queue) <= self.prefetch:
                s = self._step + len(self._queue)
                self._queue.append((s, self._start(s)))
            s, fut = self._queue.popleft()
            assert s == self._step
            out = self._process_result(fut, s) if isinstance(fut, W.PendingBatch) \
                else fut.result()
        self._step += 1
        return out

    def get_state(self) -> dict:
        """JSON-serializable position: the next step returned, plus what defines the stream."""
        return {"version": STATE_VERSION, "step": self._step, "seeds": list(self.seeds),
                "trial_seeds": list(self.trial_seeds), "train_envs": list(self.train_envs),
                "batch_size": self.batch_size, "image_size": self.image_size,
                "augment": self.augment, "dataset": self.dataset.identity}

    def set_state(self, state: dict):
        """Continue from a get_state() result; refuses a state of a different stream."""
        mine = self.get_state()
        diff = [k for k in mine if k not in ("step",) and k in state and state[k] != mine[k]]
        if diff:
            raise ValueError(f"loader state differs in {diff} "
                             f"(state {[state[k] for k in diff]}, loader {[mine[k] for k in diff]});"
                             " build the loader with the same dataset, members and sizes")
        self._drop_prefetch()
        self._step = int(state["step"])

    def _drop_prefetch(self):
        for _, fut in self._queue:
            fut.cancel()
        for _, fut in self._queue:
            if not fut.cancelled():
                try:
                    fut.result()
                except Exception:
                    pass
        self._queue.clear()

    def close(self):
        """Stop prefetching, end the worker threads or processes, unlink shared memory.
        Arrays of batches already returned stay valid."""
        self._drop_prefetch()
        for ex in (self._producer, self._pool):
            if ex is not None:
                ex.shutdown(wait=True)
        if self._procs is not None:
            self._procs.close()
        self._producer = self._pool = self._procs = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _RowFiller:
    """What a worker process needs of a MemberLoader (pickled once per worker): the stream's
    definition, and the store's cache dir and fit decisions to open its own ImageStore."""
    ATTRS = ("dataset", "train_envs", "seeds", "trial_seeds", "batch_size", "image_size",
             "augment", "output", "augment_on", "canvas", "cache_side")

    def __init__(self, loader: MemberLoader):
        self.state = {k: getattr(loader, k) for k in self.ATTRS}
        self.cache_dir = loader.store.cache_dir
        self.fits = dict(loader.store._fits)
        self._loader = None

    def __getstate__(self):
        return {**self.__dict__, "_loader": None}

    def __call__(self, items, arrays):
        if self._loader is None:
            ld = MemberLoader.__new__(MemberLoader)
            ld.__dict__.update(self.state)
            ld.store = ImageStore(self.state["dataset"], self.cache_dir, 1)
            ld.store._fits.update(self.fits)  # the parent's decisions: no re-estimate, no warning
            self._loader = ld
        self._loader._fill_rows(items, arrays)


_SPLIT_CODES = {"out": 0, "in": 1, "all": 2}


def eval_indices(dataset, trial_seed: int = 0, holdout_fraction: float = 0.2):
    """{(env, split): indices} for split in in/out/all (all = every image, file order)."""
    out = {}
    for env, (o, i) in enumerate(dataset.splits(trial_seed, holdout_fraction)):
        out[(env, "out")], out[(env, "in")] = o, i
        out[(env, "all")] = np.arange(len(dataset.samples[env]))
    return out


def iterate_eval(dataset, *, trial_seed: int = 0, envs: Optional[Sequence[int]] = None,
                 splits: Sequence[str] = ("in", "out"), batch_size: int = 64,
                 image_size: int = 224, augment: bool = False, seed: int = 0,
                 step: Optional[int] = None, holdout_fraction: float = 0.2,
                 store: Optional[ImageStore] = None,
                 cache_dir=DEFAULT_CACHE, workers: Optional[int] = None, pad: bool = True,
                 output: str = "float32", train_side: Optional[int] = None) -> Iterator[dict]:
    """Walk each env's splits once in fixed-size batches.

    Yields dict(env, split, images [B, H, W, 3], labels [B] int32, mask [B] bool). With
    pad=True the last batch is padded to batch_size (mask False on padding), else short.
    augment=True applies the train transform (the reference's augmented validation) to the
    original images (`train_side`: a capped training cache instead, see ImageStore), seeded
    by (seed, env, split, position) so it is repeatable; with `step` (the training loop's
    evaluation step) by (seed, step, env, split, position): a fresh draw per evaluation point.
    """
    for s in splits:
        if s not in _SPLIT_CODES:
            raise ValueError(f"unknown split {s!r}: use 'in', 'out' or 'all'")
    store = store or ImageStore(dataset, cache_dir, workers)
    workers = workers or default_workers()
    side = train_side
    index = eval_indices(dataset, trial_seed, holdout_fraction)
    env_list = range(dataset.num_envs) if envs is None else [dataset.env_index(e) for e in envs]
    pool = concurrent.futures.ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        for env in env_list:
            labels_all = dataset.labels(env)
            for split in splits:
                idx = index[(env, split)]
                for start in range(0, len(idx), batch_size):
                    chunk = idx[start:start + batch_size]
                    n = batch_size if pad else len(chunk)
                    images = np.zeros((n, image_size, image_size, 3), np.uint8)

                    def one(k):
                        i = int(chunk[k])
                        if augment:
                            key = [seed, env, _SPLIT_CODES[split], start + k]
                            rng = np.random.default_rng(key if step is None
                                                        else [seed, step] + key[1:])
                            images[k] = T.train_transform_uint8(
                                store.train_image(env, i, side), image_size, rng)
                        else:
                            images[k] = store.eval_array(env, i, image_size)
                    if pool is None:
                        for k in range(len(chunk)):
                            one(k)
                    else:
                        list(pool.map(one, range(len(chunk))))
                    labels = np.zeros(n, np.int32)
                    labels[:len(chunk)] = labels_all[chunk]
                    mask = np.zeros(n, bool)
                    mask[:len(chunk)] = True
                    yield {"env": env, "split": split,
                           "images": T.normalize(images) if output == "float32" else images,
                           "labels": labels, "mask": mask}
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
