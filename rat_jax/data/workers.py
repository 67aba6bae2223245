"""Process workers for MemberLoader: a step's rows computed in worker processes and written
straight into shared memory (multiprocessing.shared_memory), so no image array is pickled.

- Start method: "spawn" (a fresh interpreter per worker; never fork: the parent runs JAX and
  other threads). Workers start once per loader, on its first batch; each rebuilds what it
  needs from a picklable `filler` (batches.ProcessBatches sends the stream's fill_rows bound
  to a pickled ImageStore: each worker opens its own store over the parent's cache dir, whose
  uint8 cache is a read-only memmap that the OS page cache shares between processes).
- Buffers: one shared-memory segment per batch (buffers.SharedBlock), laid out as named arrays
  (`layout`). The parent maps each segment once and leases the batch's arrays (buffers.Blocks):
  the segment goes back to the free list only when nothing holds an array of its batch any
  more, so segments are never overwritten under a reader; their number is what is in flight
  (prefetch + 1) plus the batches the consumer still holds.
- Clean-up: close() (or garbage collection of the pool) shuts the workers down and unlinks every
  segment, so nothing is left in /dev/shm; a segment still held by the consumer stays mapped
  (unlinked) until its arrays are freed.
- Errors: an exception in a worker (e.g. transforms.ImageDecodeError naming the file) is
  re-raised in the parent with its type and message (concurrent.futures pickles it).
"""
import concurrent.futures
import concurrent.futures.process
import mmap
import multiprocessing
import weakref
from multiprocessing import shared_memory
from typing import Callable, Dict, Sequence

import numpy as np

from rat_jax.data.buffers import Block, Blocks, Layout, SharedBlock, views

START_METHOD = "spawn"


# -- worker side -------------------------------------------------------------------------------
_WORKER: dict = {}
_MAX_ATTACHED = 16


def _init_worker(filler):
    _WORKER["filler"] = filler
    _WORKER["attached"] = {}


def _attach(name: str, size: int) -> mmap.mmap:
    attached = _WORKER["attached"]
    mm = attached.pop(name, None)
    if mm is None:
        shm = shared_memory.SharedMemory(name=name)
        mm = mmap.mmap(shm._fd, size)
        shm.close()
        while len(attached) >= _MAX_ATTACHED:  # the parent retires segments only rarely
            attached.pop(next(iter(attached))).close()
    attached[name] = mm  # most recently used last
    return mm


def _run(name: str, size: int, layout: Layout, items: list):
    arrays = views(_attach(name, size), layout)
    try:
        _WORKER["filler"](items, arrays)
    finally:
        del arrays


# -- parent side -------------------------------------------------------------------------------
class PendingBatch:
    """A batch whose rows the workers are computing; result() waits and returns the arrays."""

    def __init__(self, segments: Blocks, seg: SharedBlock, futures, finish: Callable):
        self._segments, self._seg, self._futures, self._finish = segments, seg, futures, finish
        self._done = False

    def _wait(self):
        """Wait for every chunk (none may still write to the segment); the first error."""
        error = None
        for f in self._futures:
            try:
                f.result()
            except concurrent.futures.CancelledError:
                pass
            except concurrent.futures.process.BrokenProcessPool as e:
                error = error or concurrent.futures.process.BrokenProcessPool(
                    f"{e} (a loader worker process died: out of memory, or the main script "
                    "starts the loader without an `if __name__ == '__main__':` guard, which "
                    "spawned processes need; FeedOptions(worker_type='thread') avoids processes)")
            except BaseException as e:  # noqa: B036 - re-raised below
                error = error or e
        return error

    def result(self) -> dict:
        if self._done:
            raise RuntimeError("PendingBatch.result() called twice")
        self._done = True
        error = self._wait()
        if error is not None:
            self._segments.release(self._seg)
            raise error
        return self._finish(self._segments.lease(self._seg))

    def cancel(self) -> bool:
        """Cancel what has not started, wait for the rest, release the segment."""
        if not self._done:
            self._done = True
            for f in self._futures:
                f.cancel()
            self._wait()
            self._segments.release(self._seg)
        return True

    def cancelled(self) -> bool:
        return self._done


def _shutdown(executor, segments):
    executor.shutdown(wait=False, cancel_futures=True)
    segments.close()


class ProcessWorkers:
    """`n` worker processes computing rows with `filler(items, arrays)`, writing into shared
    memory. submit() returns a PendingBatch; close() (or garbage collection) ends the workers
    and unlinks every segment."""

    def __init__(self, n: int, filler, start_method: str = START_METHOD):
        if start_method == "fork":
            raise ValueError("process workers use 'spawn' or 'forkserver', never 'fork'")
        self.n = int(n)
        ctx = multiprocessing.get_context(start_method)
        self.segments = Blocks(SharedBlock)
        self._executor = concurrent.futures.ProcessPoolExecutor(
            self.n, mp_context=ctx, initializer=_init_worker, initargs=(filler,))
        self._finalizer = weakref.finalize(self, _shutdown, self._executor, self.segments)

    def submit(self, layout: Layout, size: int, chunks: Sequence[list],
               prepare: Callable[[Block, Dict[str, np.ndarray]], None],
               finish: Callable[[Dict[str, np.ndarray]], dict]) -> PendingBatch:
        """Acquire a segment, let `prepare(segment, arrays)` write what the workers do not
        (rows of members not loaded), send each chunk of plan items to a worker."""
        seg = self.segments.acquire(layout, size)
        try:
            base, arrays = seg.arrays()
            prepare(seg, arrays)
            del base, arrays
            futures = [self._executor.submit(_run, seg.name, seg.size, layout, chunk)
                       for chunk in chunks if chunk]
        except BaseException:
            self.segments.release(seg)
            raise
        return PendingBatch(self.segments, seg, futures, finish)

    def close(self):
        if self._finalizer.alive:
            self._finalizer.detach()
            self._executor.shutdown(wait=True, cancel_futures=True)
            self.segments.close()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive
