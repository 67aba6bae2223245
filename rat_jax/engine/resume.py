"""Checkpoint and resume of a members run with an Orbax CheckpointManager.

One checkpoint = the stacked state (members' params and Adam state, best params/score/step) saved
with `StandardSave`, plus a JSON item with the loop position, loader state and record accumulators.
CheckpointManager writes into a temporary folder and renames it when complete, so a run killed at any
moment resumes from the last complete checkpoint.

Saves are asynchronous by default (Orbax's async checkpointing): `save` returns once every array
is copied to host memory (the blocking part of Orbax's async save: its device-to-host transfer
completes before `save` returns) and the files are written by a background thread. The caller may
therefore donate or overwrite the device buffers it saved as soon as `save` returns; the members
loop does, and tests/test_members_loop.py checks it by deleting the arrays right after `save`. The
host copy lives until the files are written (the plan's `checkpoint_copies`). A `save` waits for
the one in flight first; `wait()` and `close()` wait for it. Every Orbax call here holds
rat_jax.checkpoint.exclusive(): Orbax's operations must not overlap across threads (the runs of
a parallel schedule), so a run's save, restore or start also waits for another run's save in
flight.
"""
from __future__ import annotations

import base64
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from rat_jax.checkpoint import exclusive, in_flight


def _abstract(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)


def encode_state(obj: Any) -> Any:
    """Make a loader state JSON-safe (grain iterators may return bytes)."""
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, dict):
        return {k: encode_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode_state(v) for v in obj]
    return obj


def decode_state(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__bytes__"}:
            return base64.b64decode(obj["__bytes__"])
        return {k: decode_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_state(v) for v in obj]
    return obj


class RunCheckpoints:
    """Atomic checkpoints of a members run under `directory`, written in the background unless
    `async_save=False`."""

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 1,
                 async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        with exclusive():
            self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Save `state` (arrays, copied to the host before this returns) and `meta` (JSON)."""
        with exclusive():
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
            in_flight(self)

    def restore(self, step: int, target_state: Any) -> tuple[Any, dict]:
        """Restore onto the shardings of `target_state` (arrays or ShapeDtypeStructs)."""
        with exclusive():
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(target_state)),
                meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def wait(self) -> None:
        """Until the save in flight is on disk (its step folder renamed into place)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        with exclusive():
            self.manager.close()
