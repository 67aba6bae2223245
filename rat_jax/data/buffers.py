"""Reusable host buffers for batches: blocks of memory laid out as named arrays, leased for one
batch and reused once nothing reads that batch any more.

- `Block`: private memory of this process (an anonymous mapping: page-aligned, zero when
  created); the thread path's batches (batches.ThreadBatches). `SharedBlock`: a shared-memory
  segment (multiprocessing.shared_memory) that worker processes write into (workers.py).
- `Blocks`: the free list per layout. `lease(block)` returns the block's arrays as views of a
  per-lease base array; the block goes back to the free list only when that base array is
  garbage collected, i.e. when the consumer (and anything that aliases the arrays, e.g. a
  zero-copy jax.device_put on CPU, whose device array keeps the host array alive) holds none of
  them any more. Blocks are therefore never overwritten under a reader; their number is what is
  in flight plus the batches still held.
- `rows` on a block records, per member row, what the block holds there ("zero", "data", or a
  fill tag), so that rows which must hold a constant are rewritten only when they hold
  something else.
"""
import itertools
import mmap
import threading
import weakref
from multiprocessing import shared_memory
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

ALIGN = 64  # byte alignment of every array in a block (SIMD loads, zero-copy device_put)

Layout = Tuple[Tuple[str, str, Tuple[int, ...], int], ...]  # (key, dtype str, shape, offset)


def make_layout(fields: Sequence[Tuple[str, object, Tuple[int, ...]]]) -> Tuple[Layout, int]:
    """((key, dtype, shape, offset), ...) and the total bytes of `fields` packed with ALIGN."""
    out, offset = [], 0
    for key, dtype, shape in fields:
        dtype = np.dtype(dtype)
        out.append((key, dtype.str, tuple(int(s) for s in shape), offset))
        nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        offset += -(-max(nbytes, 1) // ALIGN) * ALIGN
    return tuple(out), max(offset, ALIGN)


def views(buffer, layout: Layout) -> Dict[str, np.ndarray]:
    return {key: np.ndarray(shape, np.dtype(dt), buffer=buffer, offset=off)
            for key, dt, shape, off in layout}


class Block:
    """One host buffer of `size` bytes in this process's private memory."""

    _ids = itertools.count()

    def __init__(self, layout: Layout, size: int):
        self.name, self.size, self.layout = f"block-{next(Block._ids)}", size, layout
        self.mm = mmap.mmap(-1, size)
        self.rows: Dict[int, str] = {}

    def arrays(self):
        """(base, {key: view of base}): the views keep `base` alive (numpy's view chain stops
        at an array over a foreign buffer)."""
        base = np.frombuffer(self.mm, np.uint8, self.size)
        return base, views(base, self.layout)

    def unlink(self):
        """Nothing to remove for private memory (SharedBlock removes its name)."""


class SharedBlock(Block):
    """One shared-memory segment, mapped once in the parent; worker processes attach it by
    `name`."""

    def __init__(self, layout: Layout, size: int):
        shm = shared_memory.SharedMemory(create=True, size=size)
        self.name, self.size, self.layout = shm.name, size, layout
        try:
            # Our own mapping: it lives as long as any array made from it, without the
            # BufferError SharedMemory.close() raises while views exist.
            self.mm = mmap.mmap(shm._fd, size)
        except Exception:
            shm.close()
            shm.unlink()
            raise
        shm.close()
        self._shm = shm
        self.rows = {}
        self.unlinked = False

    def unlink(self):
        if not self.unlinked:
            self.unlinked = True
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass


class Blocks:
    """Blocks made by `make(layout, size)` (Block or SharedBlock), with a free list per layout.
    Leases are returned by weakref finalizers of the batch base arrays, from whatever thread
    collects them."""

    def __init__(self, make: Callable[[Layout, int], Block] = Block):
        self._make = make
        self._lock = threading.Lock()
        self._free: Dict[Layout, List[Block]] = {}
        self._all: Dict[str, Block] = {}
        self.closed = False

    def names(self) -> List[str]:
        with self._lock:
            return list(self._all)

    def acquire(self, layout: Layout, size: int) -> Block:
        with self._lock:
            if self.closed:
                raise RuntimeError("the loader's batch buffers are closed")
            free = self._free.get(layout)
            if free:
                return free.pop()
        block = self._make(layout, size)
        with self._lock:
            self._all[block.name] = block
        return block

    def release(self, block: Block):
        with self._lock:
            if not self.closed and block.name in self._all:
                self._free.setdefault(block.layout, []).append(block)

    def lease(self, block: Block) -> Dict[str, np.ndarray]:
        """The block's arrays; the block is released once none of them is referenced."""
        base, arrays = block.arrays()
        weakref.finalize(base, self.release, block)
        return arrays

    def close(self):
        """Forget every block (SharedBlock: unlink it); free ones are unmapped now, leased ones
        when their arrays are collected."""
        with self._lock:
            self.closed = True
            blocks = list(self._all.values())
            free = {id(b) for group in self._free.values() for b in group}
            self._all.clear()
            self._free.clear()
        for block in blocks:
            block.unlink()
            if id(block) in free:
                try:
                    block.mm.close()
                except BufferError:  # a view made elsewhere still exists: unmapped when freed
                    pass
