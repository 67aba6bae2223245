"""Evaluation: evaluation splits, logits of stacked members, accuracy and loss.

Two paths give the same logits:
  * the engine path (`StackEvaluator`, what selection uses): stacked params [K] -> logits
    [K, N, C] by `MemberEngine.logits`, members split over the devices' 'model' axis and images
    over 'data' and over the processes; an `EvalSplit` names a split's rows and each process
    decodes only the rows its devices hold;
  * the reference one-device path (`predict_logits`, `predict_logits_stacked`): members one by
    one on host arrays (`load_split`).

Images stay uint8 on the host and are normalized on device (ImageNet mean/std, as
`rat_jax.data.transforms.normalize`). Every batch has the same shape (the last one is padded), so
one model is compiled once per (batch size, image size).
"""
from __future__ import annotations

import concurrent.futures
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rat_jax import trees
from rat_jax.data import DomainDataset, ImageStore, eval_indices, iterate_eval, load_dataset
from rat_jax.data.store import DEFAULT_CACHE
from rat_jax.engine.step import normalize_on_device

__all__ = ["load_split", "EvalSplit", "eval_split", "StackEvaluator", "predict_logits",
           "predict_logits_stacked", "accuracy", "mean_loss", "normalize_on_device"]


def load_split(dataset, *, trial_seed: int = 0, envs: Sequence[int | str] | None = None,
               split: str = "all", image_size: int = 224, holdout_fraction: float = 0.2,
               augment: bool = False, seed: int = 0, cache_dir=DEFAULT_CACHE,
               workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W, 3], labels int32 [N]): `split` ('in' | 'out' | 'all') of each env in
    `envs` (all envs when None), concatenated in the order given.

    `dataset` is a `DomainDataset` or anything `rat_jax.data.load_dataset` accepts (a demo name,
    a folder path).
    """
    if not isinstance(dataset, DomainDataset):
        dataset = load_dataset(dataset)
    if split not in ("in", "out", "all"):
        raise ValueError(f"split={split!r}: use 'in', 'out' or 'all'")
    env_list = list(range(dataset.num_envs)) if envs is None else list(envs)
    images, labels = [], []
    for batch in iterate_eval(dataset, trial_seed=trial_seed, envs=env_list, splits=(split,),
                              batch_size=256, image_size=image_size, augment=augment, seed=seed,
                              holdout_fraction=holdout_fraction, cache_dir=cache_dir,
                              workers=workers, pad=False, output="uint8"):
        images.append(batch["images"])
        labels.append(batch["labels"])
    if not images:
        return (np.zeros((0, image_size, image_size, 3), np.uint8), np.zeros((0,), np.int32))
    return np.concatenate(images), np.concatenate(labels).astype(np.int32)


class EvalSplit:
    """The rows of an evaluation split, decoded only when asked: `labels` [N] int32 (known without
    decoding), `load(rows)` -> uint8 [len(rows), size, size, 3] through the ImageStore cache (what
    `iterate_eval` yields for them). The row-source interface of MemberEngine.logits: each
    process loads only the rows its devices hold. `images()`: every row (load_split's array)."""

    def __init__(self, store: ImageStore, envs: np.ndarray, index: np.ndarray, labels: np.ndarray,
                 image_size: int):
        self.store, self.envs, self.index = store, np.asarray(envs), np.asarray(index)
        self.labels = np.asarray(labels, np.int32)
        self.image_size = int(image_size)
        self.image_shape, self.dtype = (self.image_size, self.image_size, 3), np.dtype(np.uint8)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows) -> "EvalSplit":
        rows = np.asarray(rows, np.int64)
        return EvalSplit(self.store, self.envs[rows], self.index[rows], self.labels[rows],
                         self.image_size)

    def load(self, rows) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        out = np.zeros((len(rows),) + self.image_shape, np.uint8)

        def one(k):
            r = rows[k]
            out[k] = self.store.eval_array(int(self.envs[r]), int(self.index[r]), self.image_size)
        workers = getattr(self.store, "workers", 1) or 1
        if self.store.cache_dir is None and workers > 1 and len(rows) > 1:  # decoding: threads
            with concurrent.futures.ThreadPoolExecutor(min(workers, len(rows))) as pool:
                list(pool.map(one, range(len(rows))))
        else:                                                  # reads of the cached arrays
            for k in range(len(rows)):
                one(k)
        return out

    def images(self) -> np.ndarray:
        return self.load(np.arange(len(self)))


def eval_split(dataset, *, trial_seed: int = 0, envs: Sequence[int | str] | None = None,
               split: str = "all", image_size: int = 224, holdout_fraction: float = 0.2,
               max_images: int = 0, store: ImageStore | None = None, cache_dir=DEFAULT_CACHE,
               workers: int | None = None) -> EvalSplit:
    """`load_split`'s rows (same order) as an EvalSplit, nothing decoded. `max_images` > 0: a
    fixed subset of that many rows (numpy RandomState(0), kept in order), as the selection stage
    draws it."""
    if not isinstance(dataset, DomainDataset):
        dataset = load_dataset(dataset)
    if split not in ("in", "out", "all"):
        raise ValueError(f"split={split!r}: use 'in', 'out' or 'all'")
    store = store or ImageStore(dataset, cache_dir, workers)
    env_list = (list(range(dataset.num_envs)) if envs is None
                else [dataset.env_index(e) for e in envs])
    index = eval_indices(dataset, trial_seed, holdout_fraction)
    env_rows, idx_rows, labels = [], [], []
    for env in env_list:
        idx = np.asarray(index[(env, split)], np.int64)
        env_rows.append(np.full(len(idx), env, np.int64))
        idx_rows.append(idx)
        labels.append(np.asarray(dataset.labels(env))[idx])
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros((0,), dt)
    out = EvalSplit(store, cat(env_rows, np.int64), cat(idx_rows, np.int64),
                    cat(labels, np.int32), image_size)
    if max_images and len(out) > max_images:
        keep = np.random.RandomState(0).choice(len(out), max_images, replace=False)
        out = out.subset(np.sort(keep))
    return out


class StackEvaluator:
    """Logits of stacked params [K] through the member engine (`MemberEngine.logits`), on an
    EvalSplit or an image array: one engine per evaluation mesh (`plan_eval_mesh(K)`), so stacks
    of different sizes share the compiled function of the same layout. `batch_size`: images per
    device and step. `strategy`, `data_parallel`, `devices`: as the training engine's."""

    def __init__(self, model, batch_stats: Any, batch_size: int = 256, *,
                 strategy: str | None = None, data_parallel: bool | None = None,
                 devices: Sequence[jax.Device] | None = None):
        self.model, self.batch_stats, self.batch_size = model, batch_stats, int(batch_size)
        self.strategy, self.data_parallel = strategy, data_parallel
        self.devices = list(jax.devices() if devices is None else devices)
        self._engines: dict = {}

    def engine(self, num_members: int):
        from rat_jax.engine.members import EngineConfig, MemberEngine, plan_eval_mesh
        mesh = plan_eval_mesh(num_members, self.devices, self.data_parallel)
        key = (mesh.devices.shape, tuple(d.id for d in mesh.devices.flat))
        if key not in self._engines:
            self._engines[key] = MemberEngine(self.model, self.batch_stats,
                                              mesh.devices.shape[0],
                                              EngineConfig(strategy=self.strategy), mesh=mesh)
        return self._engines[key]

    def logits(self, stacked: Any, images) -> np.ndarray:
        """[K, N, C] float32 numpy on every process."""
        leaves = jax.tree.leaves(stacked)
        if not leaves:
            raise ValueError("StackEvaluator.logits: stacked params are empty")
        return self.engine(int(leaves[0].shape[0])).logits(stacked, images, self.batch_size)

    def logits_of(self, params_list: Sequence[Any], images) -> np.ndarray:
        """Logits [K, N, C] of K separate param trees (soups, interpolation points) as one
        stack."""
        return self.logits(trees.stack(params_list), images)


@functools.lru_cache(maxsize=32)
def _logits_fn(model):
    """One jitted eval function per model (flax modules hash by their fields)."""
    def fn(variables, images):
        if images.dtype == jnp.uint8:
            images = normalize_on_device(images)
        return model.apply(variables, images, train=False).astype(jnp.float32)
    return jax.jit(fn)


def _get_fn(model):
    try:
        return _logits_fn(model)
    except TypeError:  # an unhashable module: no cache, still one compile per call
        return _logits_fn.__wrapped__(model)


def _batches(n: int, batch_size: int):
    bs = max(1, min(int(batch_size), n))
    return bs, [(s, min(s + bs, n)) for s in range(0, n, bs)]


def _padded(images: np.ndarray, start: int, stop: int, bs: int) -> np.ndarray:
    chunk = images[start:stop]
    if len(chunk) < bs:
        pad = np.zeros((bs - len(chunk),) + chunk.shape[1:], chunk.dtype)
        chunk = np.concatenate([chunk, pad])
    return chunk


def predict_logits(model, variables: dict, images, batch_size: int = 256) -> np.ndarray:
    """Logits [N, C] (float32 numpy) of `model` with `variables` ({'params', 'batch_stats'}).

    `images`: uint8 [N, H, W, 3] (normalized on device) or already-normalized float32.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3], got shape {images.shape}")
    n = len(images)
    if n == 0:
        return np.zeros((0, _num_classes(variables)), np.float32)
    fn = _get_fn(model)
    bs, spans = _batches(n, batch_size)
    out = [np.asarray(fn(variables, _padded(images, a, b, bs)))[: b - a] for a, b in spans]
    return np.concatenate(out)


def predict_logits_stacked(model, stacked_params: Any, batch_stats: Any, images,
                           batch_size: int = 256) -> np.ndarray:
    """Logits [M, N, C] of every member of `stacked_params` (leading member axis) with shared
    frozen `batch_stats`. Each image batch is sent to the device once and run through every
    member with the same compiled function."""
    leaves = jax.tree.leaves(stacked_params)
    if not leaves:
        raise ValueError("predict_logits_stacked: stacked_params is empty")
    m = int(leaves[0].shape[0])
    members = [{"params": jax.device_put(trees.take(stacked_params, i)), "batch_stats": batch_stats}
               for i in range(m)]
    images = np.asarray(images)
    n = len(images)
    if n == 0:
        return np.zeros((m, 0, _num_classes(members[0])), np.float32)
    fn = _get_fn(model)
    bs, spans = _batches(n, batch_size)
    out = [[] for _ in range(m)]
    for a, b in spans:
        batch = jax.device_put(_padded(images, a, b, bs))
        for i, variables in enumerate(members):
            out[i].append(fn(variables, batch))
        for i in range(m):                      # fetch after dispatching every member
            out[i][-1] = np.asarray(out[i][-1])[: b - a]
    return np.stack([np.concatenate(o) for o in out])


def accuracy(logits, labels) -> float:
    """Top-1 accuracy of logits [N, C] (or [..., N, C]: mean over everything) against labels [N]."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if labels.size == 0:
        return float("nan")
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def mean_loss(logits, labels) -> float:
    """Mean softmax cross-entropy (float64 on host) of logits [N, C] against labels [N]."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    if labels.size == 0:
        return float("nan")
    z = logits - logits.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(z).sum(axis=-1))
    picked = np.take_along_axis(z, labels[..., None].astype(np.int64), axis=-1)[..., 0]
    return float(np.mean(logz - picked))


def _num_classes(variables) -> int:
    try:
        return int(variables["params"]["classifier"]["bias"].shape[-1])
    except (KeyError, TypeError):
        return 0
