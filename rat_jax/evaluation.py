"""Evaluation: evaluation splits, logits of stacked members, accuracy and loss.

Every logit comes from the engine's one evaluation program (engine.programs.forward_program),
the one training-time evaluation uses: `StackEvaluator` turns stacked params [K] into logits
[K, N, C] by `MemberEngine.logits`, members split over the devices' 'model' axis and images over
'data' and over the processes; an `EvalSplit` names a split's rows and each process decodes only
the rows its devices hold. `predict_logits` / `predict_logits_stacked` are the same program on
this process's devices, for host arrays (`load_split`).

Images stay uint8 on the host and are normalized on device, as the train step normalizes them
(augment.model_input). Every batch has the same shape (the last one is padded), so one program
is compiled per (batch size, image size).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from rat_jax import trees
from rat_jax.data import DomainDataset, ImageStore, eval_indices, load_dataset
from rat_jax.data import transforms as T
from rat_jax.data.store import DEFAULT_CACHE

__all__ = ["SplitSpec", "load_split", "EvalSplit", "eval_split", "StackEvaluator", "predict_logits",
           "predict_logits_stacked", "accuracy", "mean_loss"]


SPLIT_CODES = {"out": 0, "in": 1, "all": 2}   # part of an augmented draw's seed


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """Which rows an evaluation split holds: `split` ('in' | 'out' | 'all') of each env in `envs`
    (all envs when None; indices or names), concatenated in the order given, for split seed
    `trial_seed` and `holdout_fraction`; `max_images` > 0 keeps a fixed subset of that many rows
    (numpy RandomState(0), kept in order); images at `image_size`. `train_side`: the training
    image cache an augmented draw crops from (ImageStore; None: the original images)."""
    trial_seed: int = 0
    envs: Sequence[int | str] | None = None
    split: str = "all"
    image_size: int = 224
    holdout_fraction: float = 0.2
    max_images: int = 0
    train_side: int | None = None

    def __post_init__(self):
        if self.split not in SPLIT_CODES:
            raise ValueError(f"split={self.split!r}: use 'in', 'out' or 'all'")

    @classmethod
    def of(cls, settings, **fields) -> "SplitSpec":
        """The spec a run with TrainSettings `settings` evaluates (its image size, holdout
        fraction, evaluation cap and training cache); `fields`: trial_seed, envs, split."""
        return cls(image_size=settings.image_size, holdout_fraction=settings.holdout_fraction,
                   max_images=settings.max_eval_images, train_side=settings.train_side,
                   **fields)

    def replace(self, **changes) -> "SplitSpec":
        return dataclasses.replace(self, **changes)


class EvalSplit:
    """The rows of an evaluation split (`eval_split`), decoded only when asked: `labels` [N]
    int32 (known without decoding); `load(rows)` -> uint8 [len(rows), size, size, 3] (the
    evaluation transform: a resize of the whole image, through the ImageStore cache);
    `load_members(rows, seeds, step)` -> [len(seeds), len(rows), size, size, 3], each member's
    own draw of the training transform (the reference's augmented validation); `batches(...)`
    walks the split in fixed-size batches of either. The row-source interface of
    MemberEngine.logits: each process loads only the rows its devices hold.

    A draw is seeded by (seed, step, env, split, position of the image in its env's split),
    (seed, env, split, position) without a step: the same for a member wherever, whenever and
    in whatever batch it is computed, so members are independent and a resumed run draws what
    the first would have."""

    def __init__(self, store: ImageStore, rows: dict, spec: SplitSpec):
        self.store, self.spec = store, spec
        self.envs, self.index = np.asarray(rows["envs"]), np.asarray(rows["index"])
        self.positions = np.asarray(rows["positions"])
        self.labels = np.asarray(rows["labels"], np.int32)
        self.image_size = int(spec.image_size)
        self.image_shape, self.dtype = (self.image_size, self.image_size, 3), np.dtype(np.uint8)

    def __len__(self) -> int:
        return len(self.labels)

    def _rows(self) -> dict:
        return {"envs": self.envs, "index": self.index, "positions": self.positions,
                "labels": self.labels}

    def subset(self, rows) -> "EvalSplit":
        rows = np.asarray(rows, np.int64)
        return EvalSplit(self.store, {k: v[rows] for k, v in self._rows().items()}, self.spec)

    def _map(self, fn, count: int) -> None:
        workers = getattr(self.store, "workers", 1) or 1
        if workers > 1 and count > 1:
            with concurrent.futures.ThreadPoolExecutor(min(workers, count)) as pool:
                list(pool.map(fn, range(count)))
        else:
            for k in range(count):
                fn(k)

    def load(self, rows) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        out = np.zeros((len(rows),) + self.image_shape, np.uint8)

        def one(k):
            r = rows[k]
            out[k] = self.store.eval_array(int(self.envs[r]), int(self.index[r]), self.image_size)
        if self.store.cache_dir is None:   # decoding: threads
            self._map(one, len(rows))
        else:                               # reads of the cached arrays
            for k in range(len(rows)):
                one(k)
        return out

    def draw_key(self, row: int, seed: int, step: int | None) -> list[int]:
        """The seed of one augmented draw (see the class docstring)."""
        key = [int(self.envs[row]), SPLIT_CODES[self.spec.split], int(self.positions[row])]
        return [int(seed)] + ([] if step is None else [int(step)]) + key

    def load_members(self, rows, seeds: Sequence[int], step: int | None = None) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        out = np.zeros((len(seeds), len(rows)) + self.image_shape, np.uint8)
        side = self.spec.train_side

        def one(k):
            m, j = divmod(k, len(rows))
            r = int(rows[j])
            rng = np.random.default_rng(self.draw_key(r, seeds[m], step))
            image = self.store.train_image(int(self.envs[r]), int(self.index[r]), side)
            out[m, j] = T.train_transform_uint8(image, self.image_size, rng)
        self._map(one, len(seeds) * len(rows))
        return out

    def member_batch(self, rows, stream, step: int | None = None) -> dict:
        """Each member's own draw of `rows` as a training batch of `stream` (a MemberStream:
        its members' seeds, image size, training cache and augmentation mode) holds it: uint8
        images [M, n, ...] and labels [M, n]; in the device mode crop windows on canvases with
        their `augment` parameters, finished on the device by the evaluation program as the
        train step finishes them. The draws are load_members'."""
        rows = np.asarray(rows, np.int64)
        m, n = stream.num_members, len(rows)
        images = np.zeros((m, n, stream.side, stream.side, 3), np.uint8)
        labels = np.zeros((m, n), np.int32)
        params = ({k: np.zeros(dims, dtype) for k, dtype, dims in stream.param_fields(n)}
                  if stream.spec.device else None)
        items = [(i, j, int(self.envs[r]), int(self.index[r]),
                  self.draw_key(int(r), stream.seeds[i], step))
                 for i in range(m) for j, r in enumerate(rows)]
        self._map(lambda k: stream.fill(self.store, items[k], images, labels, params),
                  len(items))
        if params is None:
            return {"images": images, "labels": labels}
        return {"images": images, "labels": labels, "augment": params,
                "image_size": stream.spec.image_size}

    def batches(self, batch_size: int, seeds: Sequence[int] | None = None,
                step: int | None = None, stream=None) -> Iterator[dict]:
        """dict(images, labels) batches of `batch_size` rows (the last one short), in row
        order: the evaluation transform shared by every member ([B, ...], labels [B]), or with
        `seeds` each member's own augmented draw at evaluation step `step` ([M, B, ...],
        labels [M, B]); with `stream` instead of seeds, its members' draws as its training
        batches hold them (member_batch)."""
        for start in range(0, len(self), batch_size):
            rows = np.arange(start, min(start + batch_size, len(self)))
            if stream is not None:
                yield self.member_batch(rows, stream, step)
            elif seeds is None:
                yield {"images": self.load(rows), "labels": self.labels[rows]}
            else:
                yield {"images": self.load_members(rows, seeds, step),
                       "labels": np.broadcast_to(self.labels[rows], (len(seeds), len(rows)))}

    def images(self) -> np.ndarray:
        return self.load(np.arange(len(self)))


def eval_split(dataset, spec: SplitSpec | None = None, *, store: ImageStore | None = None,
               cache_dir=DEFAULT_CACHE, workers: int | None = None) -> EvalSplit:
    """The rows `spec` names (SplitSpec) as an EvalSplit, nothing decoded. `dataset`: a
    DomainDataset or anything `rat_jax.data.load_dataset` accepts (a demo name, a folder path).
    `store`: the ImageStore to read through (default: one over `cache_dir` with `workers`)."""
    spec = spec or SplitSpec()
    if not isinstance(dataset, DomainDataset):
        dataset = load_dataset(dataset)
    store = store or ImageStore(dataset, cache_dir, workers)
    env_list = (list(range(dataset.num_envs)) if spec.envs is None
                else [dataset.env_index(e) for e in spec.envs])
    index = eval_indices(dataset, spec.trial_seed, spec.holdout_fraction)
    parts = {"envs": [], "index": [], "positions": [], "labels": []}
    for env in env_list:
        idx = np.asarray(index[(env, spec.split)], np.int64)
        parts["envs"].append(np.full(len(idx), env, np.int64))
        parts["index"].append(idx)
        parts["positions"].append(np.arange(len(idx), dtype=np.int64))
        parts["labels"].append(np.asarray(dataset.labels(env))[idx])
    rows = {k: np.concatenate(v) if v else np.zeros((0,), np.int64) for k, v in parts.items()}
    out = EvalSplit(store, rows, spec)
    if spec.max_images and len(out) > spec.max_images:
        keep = np.random.RandomState(0).choice(len(out), spec.max_images, replace=False)
        out = out.subset(np.sort(keep))
    return out


def load_split(dataset, spec: SplitSpec | None = None, *, augment_seed: int | None = None,
               cache_dir=DEFAULT_CACHE, workers: int | None = None) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """(images uint8 [N, H, W, 3], labels int32 [N]) of `eval_split(dataset, spec)`, decoded:
    the evaluation transform, or with `augment_seed` one augmented draw of the training
    transform seeded by it (EvalSplit.load_members)."""
    data = eval_split(dataset, spec, cache_dir=cache_dir, workers=workers)
    if augment_seed is None:
        return data.images(), data.labels
    return data.load_members(np.arange(len(data)), [augment_seed])[0], data.labels


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


def predict_logits(model, variables: dict, images, batch_size: int = 256) -> np.ndarray:
    """Logits [N, C] (float32 numpy) of `model` with `variables` ({'params', 'batch_stats'}) on
    `images` (uint8 [N, H, W, 3], normalized on device, or normalized float32): the engine's
    evaluation program on this process's devices."""
    stacked = jax.tree.map(lambda x: np.asarray(x)[None], variables["params"])
    return predict_logits_stacked(model, stacked, variables.get("batch_stats", {}), images,
                                  batch_size)[0]


def predict_logits_stacked(model, stacked_params: Any, batch_stats: Any, images,
                           batch_size: int = 256) -> np.ndarray:
    """Logits [M, N, C] of every member of `stacked_params` (leading member axis) with shared
    frozen `batch_stats`: the engine's evaluation program (StackEvaluator) on this process's
    devices, each image batch sent once and run through every member."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3], got shape {images.shape}")
    return StackEvaluator(model, batch_stats, batch_size,
                          devices=jax.local_devices()).logits(stacked_params, images)


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
