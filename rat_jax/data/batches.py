"""Batch builders of a MemberStream: compute a step's items into one batch, in threads of this
process (`ThreadBatches`) or in worker processes writing into shared memory (`ProcessBatches`).
Both give the same batch, bit for bit, for any worker count; MemberLoader (loader.py) picks one
and orders the steps.

A batch: dict(images=[M, D*B, s, s, 3], labels=[M, D*B] int32), images float32 (normalized)
or uint8 (`output="uint8"`); in device mode uint8 canvases plus `augment` (the drawn
parameters) and `image_size`. `members` (a sorted list, or None for all) limits which members'
rows are computed; the others stay zero (normalize(0) for float32 images).
"""
import concurrent.futures
import functools
from typing import Optional, Sequence

import numpy as np

from rat_jax.data import transforms as T
from rat_jax.data import workers as W
from rat_jax.data.store import ImageStore
from rat_jax.data.stream import MemberStream


class ThreadBatches:
    """Batches computed in this process, each step's items spread over a pool of `workers`
    threads (none for one worker). `batch` computes a step in the calling thread; `start`
    in a background thread (a Future; the loader's prefetch). Python parts of the per-item
    work (Generator construction, parameter draws, slicing) hold the GIL, so threads stop
    scaling with cores."""

    def __init__(self, stream: MemberStream, store: ImageStore, workers: int):
        self.stream, self.store, self.workers = stream, store, workers
        self._pool = self._producer = None

    def batch(self, step: int, members: Optional[Sequence[int]] = None) -> dict:
        """The batch of `step`."""
        s = self.stream
        plan = s.plan(step)
        device = s.spec.device
        shape = (s.num_members, s.rows, s.side, s.side, 3)
        if members is not None:  # zeros: pages never written are never touched
            keep = set(members)
            plan = [item for item in plan if item[0] in keep]
        images = np.zeros(shape, np.uint8) if device or members is not None \
            else np.empty(shape, np.uint8)
        labels = np.zeros((s.num_members, s.rows), np.int32)
        params = {k: np.zeros(dims, dtype) for k, dtype, dims in s.param_fields()} \
            if device else None
        one = functools.partial(s.fill, self.store, images=images, labels=labels,
                                params=params)
        pool = self._get_pool()
        if pool is None:
            for item in plan:
                one(item)
        else:
            list(pool.map(one, plan))
        if device:
            return {"images": images, "labels": labels, "augment": params,
                    "image_size": s.spec.image_size}
        return {"images": T.normalize(images) if s.spec.output == "float32" else images,
                "labels": labels}

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
        """End the threads (they start again on the next batch)."""
        for ex in (self._producer, self._pool):
            if ex is not None:
                ex.shutdown(wait=True)
        self._producer = self._pool = None


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
        return procs.submit(*self._layout(), chunks,
                            functools.partial(self._prepare, loaded), self._finish)

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

    def _layout(self):
        s = self.stream
        dtype = np.float32 if not s.spec.device and s.spec.output == "float32" else np.uint8
        fields = [("images", dtype, (s.num_members, s.rows, s.side, s.side, 3)),
                  ("labels", np.int32, (s.num_members, s.rows))]
        if s.spec.device:
            fields += [(f"augment.{k}", dt, dims) for k, dt, dims in s.param_fields()]
        return W.make_layout(fields)

    def _prepare(self, loaded: set, seg: W.Segment, arrays: dict) -> None:
        """Rows of members not loaded: zero, or normalize(0) for float32 images (what
        ThreadBatches returns there), rewritten only where the segment holds something else."""
        fill_tag = "norm0" if arrays["images"].dtype == np.float32 else "zero"
        for m in range(self.stream.num_members):
            if m in loaded:
                seg.rows[m] = "data"
            elif seg.rows.get(m, "zero") != fill_tag:
                for a in arrays.values():
                    a[m] = 0
                if fill_tag == "norm0":
                    arrays["images"][m] = T.normalize(np.zeros((1, 1, 3), np.uint8))
                seg.rows[m] = fill_tag

    def _finish(self, arrays: dict) -> dict:
        out = {"images": arrays["images"], "labels": arrays["labels"]}
        if self.stream.spec.device:
            out["augment"] = {k: arrays[f"augment.{k}"] for k in T.WINDOW_PARAMS}
            out["image_size"] = self.stream.spec.image_size
        return out

    def close(self):
        """End the processes and unlink every segment (they start again on the next batch)."""
        if self.procs is not None:
            self.procs.close()
        self.procs = None
