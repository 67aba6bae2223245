"""MemberLoader, the iterator of per-member training batches, and evaluation iteration.

MemberLoader ties the parts of the training feed together: the stream (stream.py: what each
step's batch holds, a pure function of the step), a batch builder (batches.py: threads of this
process or worker processes writing into shared memory) and, here, the order of the steps:
prefetch, resume state (get_state / set_state), which members are computed (load_only), the
choice of worker type and close().
"""
import collections
import concurrent.futures
import concurrent.futures.process
import dataclasses
import warnings
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from rat_jax.data.batches import ProcessBatches, ThreadBatches
from rat_jax.data.store import DEFAULT_CACHE, ImageStore, default_workers
from rat_jax.data.stream import MemberStream, StreamSpec
from rat_jax.runtime import usable_cores

STATE_VERSION = 1
WORKER_TYPES = ("auto", "thread", "process")
DEFAULT_PREFETCH = 2  # steps computed ahead of the one being consumed

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


@dataclasses.dataclass(frozen=True)
class FeedOptions:
    """How MemberLoader computes its batches; none of these changes what a batch holds.

    `workers` (default: the usable cores, at most 8) computes each step's items in parallel;
    `worker_type` says how: "thread" (batches.ThreadBatches), "process" (`workers` spawned
    processes writing into shared memory: batches.ProcessBatches) or "auto" (default, see
    `resolve_worker_type`). `prefetch`: steps computed ahead of the one consumed (0: none).
    `cache_dir`: the ImageStore's cache when the loader opens its own (DEFAULT_CACHE: the
    default dir; None: no disk cache). `reuse_buffers` (threads; processes always reuse their
    shared memory): write each batch into a host buffer reused once nothing references the
    batch it held any more (batches.ThreadBatches), instead of fresh arrays every step."""
    workers: Optional[int] = None
    worker_type: str = "auto"
    prefetch: int = DEFAULT_PREFETCH
    cache_dir: Any = DEFAULT_CACHE
    reuse_buffers: bool = True

    def __post_init__(self):
        if self.worker_type not in WORKER_TYPES:
            raise ValueError(f"worker_type={self.worker_type!r}: use one of {WORKER_TYPES}")


class MemberLoader:
    """Iterator of dict(images=[M, D*B, H, W, 3] float32, labels=[M, D*B] int32).

    `seeds`: one stream seed per member (e.g. protocol.run_seed). `trial_seeds`: the split
    seed per member (int for all). `train_envs`: env indices trained on, in env order.
    `spec` (stream.StreamSpec): what a batch holds (batch size, image size, augmentation on
    the host or the device, output dtype, cache side); `feed` (FeedOptions): how it is computed
    (workers, worker type, prefetch, cache dir, buffer reuse). `store`: an ImageStore to read
    from (default: one over `feed.cache_dir`).

    With worker_type="process", close() (or `with`, or garbage collection) ends the processes
    and unlinks the shared memory; arrays of batches already returned stay valid for as long
    as they are referenced. Under "auto", processes that die before delivering any batch (e.g.
    a main script without the `__main__` guard spawn needs) mean threads, with a warning.
    A batch's arrays may be views of a reused host buffer (`reuse_buffers`, process workers'
    shared memory): the buffer is written again only once nothing references them, so a batch
    stays valid however long it is held.
    The batches are bit-identical for every worker type, worker count, prefetch depth and
    buffer reuse.
    """

    def __init__(self, dataset, train_envs: Sequence[int], seeds: Sequence[int], *,
                 trial_seeds: Union[int, Sequence[int]] = 0,
                 spec: StreamSpec = StreamSpec(), feed: FeedOptions = FeedOptions(),
                 store: Optional[ImageStore] = None):
        self.stream = MemberStream(dataset, train_envs, seeds, trial_seeds, spec)
        self.store = store or ImageStore(dataset, feed.cache_dir, feed.workers)
        self.workers = feed.workers or default_workers()
        self.prefetch = feed.prefetch
        self.reuse_buffers = feed.reuse_buffers
        images = self.stream.num_members * self.stream.rows
        self.worker_type = resolve_worker_type(feed.worker_type, self.workers, dataset, images,
                                               spec.augment_on if spec.augment else "host")
        self._auto = feed.worker_type == "auto"
        self._batches = (ProcessBatches(self.stream, self.store, self.workers)
                         if self.worker_type == "process" else self._thread_batches())
        self._queue = collections.deque()  # (step, Future or PendingBatch) started ahead
        self._step = 0
        self._served = 0  # batches returned
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

    def _thread_batches(self) -> ThreadBatches:
        return ThreadBatches(self.stream, self.store, self.workers, self.reuse_buffers)

    @property
    def num_members(self) -> int:
        return self.stream.num_members

    def plan(self, step: int) -> list:
        """[(member, slot, env, dataset index, sample seed)] of one step (MemberStream.plan)."""
        return self.stream.plan(step)

    def batch(self, step: int) -> dict:
        """The batch of `step` (same result whenever and wherever it is computed)."""
        return self._served_batch(
            lambda: self._batches.batch(step, self.local_members), step)

    def _served_batch(self, compute, step: int) -> dict:
        """compute(); under worker_type="auto", worker processes that die before delivering
        any batch mean threads from here on (this step computed again by them)."""
        try:
            out = compute()
        except concurrent.futures.process.BrokenProcessPool as e:
            if not (self._auto and self.worker_type == "process") or self._served:
                raise
            warnings.warn(f"worker_type='auto': the loader's worker processes failed ({e}); "
                          "using threads", RuntimeWarning, stacklevel=3)
            self._drop_prefetch()
            self._batches.close()
            self._batches = self._thread_batches()
            self.worker_type = "thread"
            out = self._batches.batch(step, self.local_members)
        self._served += 1
        return out

    # -- iteration with prefetch ------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.prefetch <= 0:
            out = self.batch(self._step)
        else:
            while len(self._queue) <= self.prefetch:
                s = self._step + len(self._queue)
                self._queue.append((s, self._batches.start(s, self.local_members)))
            s, handle = self._queue.popleft()
            assert s == self._step
            out = self._served_batch(handle.result, s)
        self._step += 1
        return out

    def get_state(self) -> dict:
        """JSON-serializable position: the next step returned, plus what defines the stream."""
        return {"version": STATE_VERSION, "step": self._step, **self.stream.identity()}

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
        for _, handle in self._queue:
            handle.cancel()
        for _, handle in self._queue:
            if not handle.cancelled():
                try:
                    handle.result()
                except Exception:
                    pass
        self._queue.clear()

    def close(self):
        """Stop prefetching, end the worker threads or processes, unlink shared memory.
        Arrays of batches already returned stay valid."""
        self._drop_prefetch()
        self._batches.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def eval_indices(dataset, trial_seed: int = 0, holdout_fraction: float = 0.2):
    """{(env, split): indices} for split in in/out/all (all = every image, file order)."""
    out = {}
    for env, (o, i) in enumerate(dataset.splits(trial_seed, holdout_fraction)):
        out[(env, "out")], out[(env, "in")] = o, i
        out[(env, "all")] = np.arange(len(dataset.samples[env]))
    return out
