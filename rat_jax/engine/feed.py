"""Training batches placed on the devices ahead of the step that reads them.

`DeviceFeed` pulls host batches from an iterator (a MemberLoader, or any iterable of batch
dicts) and places each with `place` (MemberEngine.place_train: the layout the train step reads,
one slice per part in the 'loop' strategy's split form, each process's own blocks with several
processes). With `depth` >= 1 a background thread does it, keeping up to `depth` placed batches
ahead of the consumer: while step s runs, batch s+1 (.. s+depth) is read and copied to the
devices. With depth 0 each batch is placed in the consumer's thread when asked for.

The feed serves its source's batches in order, unchanged. `get_state()` is the source's state
right after the last served batch was pulled, i.e. the position of the next batch the consumer
gets, however far the thread has read ahead: what a checkpoint must record. `close()` stops
the thread (at most the batch it is reading is finished); a feed that is garbage collected
stops its thread too.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import weakref
from typing import Any, Callable, Iterable

import numpy as np


@dataclasses.dataclass(frozen=True)
class PlacedBatch:
    """A training batch on the mesh in the form the engine's train step reads: `parts`, per
    part of the training form (placement.Parts), its (images, labels, augment parameters);
    `image_size` (device-mode augmentation) and `labels_shape` [M, N] of the host batch."""
    parts: tuple
    image_size: int | None
    labels_shape: tuple

    @property
    def num_images(self) -> int:
        """Images in the step (all members)."""
        return int(np.prod(self.labels_shape))


def _pull(source, place, stateful):
    """(placed batch, the source's state after it) of the source's next batch."""
    batch = next(source)
    state = stateful.get_state() if stateful is not None else None
    return place(batch), state


def _produce(source, place, stateful, limit, out: queue.SimpleQueue,
             slots: threading.Semaphore, stop: threading.Event) -> None:
    """The feed thread: place up to `limit` batches, each once a slot is free; then (or on
    the source's end or error) the end marker. Holds no reference to the DeviceFeed."""
    n = 0
    try:
        while limit is None or n < limit:
            slots.acquire()
            if stop.is_set():
                return
            out.put((*_pull(source, place, stateful), None))
            n += 1
        out.put((None, None, StopIteration()))
    except BaseException as e:  # noqa: B036 - handed to the consumer, raised there
        out.put((None, None, e))


def _stop(stop: threading.Event, slots: threading.Semaphore) -> None:
    stop.set()
    slots.release()  # wake a thread waiting for a slot


class DeviceFeed:
    """Iterator of PlacedBatch over `batches`, placed by `place(batch)`, `depth` batches ahead
    of the consumer (0: placed on demand), at most `limit` of them (None: until the source
    ends). `stateful`: the object whose get_state() is the source's position (None: no state).
    """

    def __init__(self, batches: Iterable, place: Callable[[Any], Any], depth: int = 1,
                 limit: int | None = None, stateful: Any = None):
        self.depth = max(0, int(depth))
        self._source, self._place, self._stateful = iter(batches), place, stateful
        self._left = limit
        self._state = stateful.get_state() if stateful is not None else None
        self._thread = None
        if self.depth:
            self._queue: queue.SimpleQueue = queue.SimpleQueue()
            self._slots = threading.Semaphore(self.depth)
            stop = threading.Event()
            self._thread = threading.Thread(
                target=_produce, name="device-feed", daemon=True,
                args=(self._source, place, stateful, limit, self._queue, self._slots, stop))
            self._stopper = weakref.finalize(self, _stop, stop, self._slots)
            self._thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            if self._left is not None and self._left <= 0:
                raise StopIteration
            placed, state = _pull(self._source, self._place, self._stateful)
            if self._left is not None:
                self._left -= 1
        else:
            placed, state, error = self._queue.get()
            if error is not None:
                self._queue.put((None, None, error))  # every later call raises it too
                raise error
            self._slots.release()  # the thread places the next one while this step runs
        self._state = state
        return placed

    def get_state(self):
        """The source's state after the last batch served (before any: at the start)."""
        return self._state

    def close(self) -> None:
        """Stop the thread and drop the batches placed ahead."""
        if self._thread is not None:
            self._stopper()
            self._thread.join()
            self._thread = None
            self._queue = queue.SimpleQueue()
            self._left = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
