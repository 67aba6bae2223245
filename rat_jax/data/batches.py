"""Batch builders of a MemberStream: compute a step's items into one batch, in threads of this
process (`ThreadBatches`) or in worker processes writing into shared memory (`ProcessBatches`).
Both give the same batch, bit for bit, for any worker count; MemberLoader (loader.py) picks one
and orders the steps.

A batch: dict(images=[M, D*B, s, s, 3], labels=[M, D*B] int32), images float32 (normalized)
or uint8 (`output="uint8"`); in device mode uint8 canvases plus `augment` (the drawn
parameters) and `image_size`. `members` (a sorted list, or None for all) limits which members'
rows are computed; the others stay zero (normalize(0) for float32 images).

Host buffers: both builders write into blocks leased from a pool (buffers.Blocks) that are
reused once no array of the batch they held is referenced any more (the consumer's, or a
device array aliasing it); rows that must hold a constant (members not loaded, device-mode
canvases outside the window) are rewritten on reuse. ThreadBatches(reuse=False) allocates
fresh arrays every step instead (the same bits).
"""
import concurrent.futures
import functools
from typing import Optional, Sequence

import numpy as np

from rat_jax.data import buffers as B
from rat_jax.data import transforms as T
from rat_jax.data import workers as W
from rat_jax.data.store import ImageStore
from rat_jax.data.stream import MemberStream


def batch_layout(stream: MemberStream):
    """(layout, bytes) of one batch of `stream` in a block (buffers.make_layout)."""
    s = stream
    dtype = np.float32 if not s.spec.device and s.spec.output == "float32" else np.uint8
    fields = [("images", dtype, (s.num_members, s.rows, s.side, s.side, 3)),
              ("labels", np.int32, (s.num_members, s.rows))]
    if s.spec.device:
        fields += [(f"augment.{k}", dt, dims) for k, dt, dims in s.param_fields()]
    return B.make_layout(fields)


def prepare_rows(stream: MemberStream, loaded: set, block: B.Block, arrays: dict) -> None:
    """Rows of members not loaded: zero, or normalize(0) for float32 images (what a fresh
    batch holds there), rewritten only where the block holds something else."""
    fill_tag = "norm0" if arrays["images"].dtype == np.float32 else "zero"
    for m in range(stream.num_members):
        if m in loaded:
            block.rows[m] = "data"
        elif block.rows.get(m, "zero") != fill_tag:
            for a in arrays.values():
                a[m] = 0
            if fill_tag == "norm0":
                arrays["images"][m] = T.normalize(np.zeros((1, 1, 3), np.uint8))
            block.rows[m] = fill_tag


def finish_batch(stream: MemberStream, arrays: dict) -> dict:
    """The batch dict of a block's arrays."""
    out = {"images": arrays["images"], "labels": arrays["labels"]}
    if stream.spec.device:
        out["augment"] = {k: arrays[f"augment.{k}"] for k in T.WINDOW_PARAMS}
        out["image_size"] = stream.spec.image_size
    return out


class ThreadBatches:
    """Batches computed in this process, each step's items spread over a pool of `workers`
    threads (none for one worker). `batch` computes a step in the calling thread; `start`
    in a background thread (a Future; the loader's prefetch). Python parts of the per-item
    work (Generator construction, parameter draws, slicing) hold the GIL, so threads stop
    scaling with cores. `reuse`: write into leased host blocks (buffers.Blocks, reused once
    their batch is no longer referenced) instead of fresh arrays every step."""

    def __init__(self, stream: MemberStream, store: ImageStore, workers: int,
                 reuse: bool = True):
        self.stream, self.store, self.workers, self.reuse = stream, store, workers, reuse
        self._pool = self._producer = self._blocks = None

    def batch(self, step: int, members: Optional[Sequence[int]] = None) -> dict:
        """The batch of `step`."""
        s = self.stream
        plan = s.plan(step)
        if members is not None:
            keep = set(members)
            plan = [item for item in plan if item[0] in keep]
        if self.reuse:
            return self._into_block(plan, members)
        device = s.spec.device
        shape = (s.num_members, s.rows, s.side, s.side, 3)
        # zeros: pages never written are never touched
        images = np.zeros(shape, np.uint8) if device or members is not None \
            else np.empty(shape, np.uint8)
        labels = np.zeros((s.num_members, s.rows), np.int32)
        params = {k: np.zeros(dims, dtype) for k, dtype, dims in s.param_fields()} \
            if device else None
        self._run(functools.partial(s.fill, self.store, images=images, labels=labels,
                                    params=params), plan)
        if device:
            return {"images": images, "labels": labels, "augment": params,
                    "image_size": s.spec.image_size}
        return {"images": T.normalize(images) if s.spec.output == "float32" else images,
                "labels": labels}

    def _into_block(self, plan: list, members: Optional[Sequence[int]]) -> dict:
        """The batch of `plan` written into a leased block (stream.fill_rows: the same bits as
        a fresh batch)."""
        s = self.stream
        if self._blocks is None:
            self._blocks = B.Blocks(B.Block)
        block = self._blocks.acquire(*batch_layout(s))
        arrays = self._blocks.lease(block)
        prepare_rows(s, set(range(s.num_members)) if members is None else set(members),
                     block, arrays)
        self._run(lambda item: s.fill_rows(self.store, (item,), arrays), plan)
        return finish_batch(s, arrays)

    def _run(self, one, plan: list) -> None:
        pool = self._get_pool()
        if pool is None:
            for item in plan:
                one(item)
        else:
            list(pool.map(one, plan))

    def start(self, step: int, members: Optional[Sequence[int]] = None):
        """A Future of the batch of `step`, computed in the background."""
        if self._producer is None:
            self._producer = concurrent.futures.ThreadPoolExecutor(1)
        return self._producer.submit(self.batch, step, members)

    def _get_pool(self):
        if self.workers <= 1:
            return None
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.workers)
        return self._pool

    def close(self):
        """End the threads and drop the free blocks (they start again on the next batch;
        batches already returned stay valid)."""
        for ex in (self._producer, self._pool):
            if ex is not None:
                ex.shutdown(wait=True)
        if self._blocks is not None:
            self._blocks.close()
        self._producer = self._pool = self._blocks = None


class ProcessBatches:
    """Batches computed by `workers` worker processes (workers.ProcessWorkers, started with
    "spawn" on the first batch, after the cache is warmed here once). Each worker rebuilds the
    stream and an ImageStore over the same cache dir from their pickles, computes a share of a
    step's plan and writes images, labels and augment parameters into a shared-memory segment
    whose arrays are the returned batch (no image is pickled). A segment is reused only after
    every array of the batch it holds has been garbage collected (see workers.py). `start`
    returns a PendingBatch (result() / cancel()); the workers pipeline the started steps
    themselves. close() ends the processes and unlinks the segments. An error in a worker
    (ImageDecodeError naming the file, ...) is raised by result() unchanged."""

    def __init__(self, stream: MemberStream, store: ImageStore, workers: int):
        self.stream, self.store, self.workers = stream, store, workers
        self.procs: Optional[W.ProcessWorkers] = None

    def batch(self, step: int, members: Optional[Sequence[int]] = None) -> dict:
        """The batch of `step`."""
        return self.start(step, members).result()

    def start(self, step: int, members: Optional[Sequence[int]] = None) -> W.PendingBatch:
        """The batch of `step`, sent to the workers: 2 chunks of its plan per worker, so that
        a worker that finishes early takes another share of the step."""
        procs = self._started()
        plan = self.stream.plan(step)
        loaded = set(range(self.stream.num_members)) if members is None else set(members)
        if members is not None:
            plan = [item for item in plan if item[0] in loaded]
        k = max(1, min(len(plan), 2 * procs.n))
        chunks = [plan[len(plan) * i // k:len(plan) * (i + 1) // k] for i in range(k)]
        return procs.submit(*batch_layout(self.stream), chunks,
                            functools.partial(prepare_rows, self.stream, loaded),
                            functools.partial(finish_batch, self.stream))

    def _started(self) -> W.ProcessWorkers:
        """The workers; on first use, warm the cache here (once, not in every worker) and
        start them."""
        if self.procs is None:
            s, store = self.stream, self.store
            if not s.spec.augment:
                store.warm(s.train_envs, eval_size=s.spec.image_size, train=False)
            elif getattr(s.dataset, "arrays", None) is None:
                store.warm(s.train_envs, train_side=s.cache_side, train=True)
            self.procs = W.ProcessWorkers(self.workers, functools.partial(s.fill_rows, store))
        return self.procs

    def close(self):
        """End the processes and unlink every segment (they start again on the next batch)."""
        if self.procs is not None:
            self.procs.close()
        self.procs = None
