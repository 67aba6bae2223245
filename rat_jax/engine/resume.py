"""Checkpoint and resume of a members run with an Orbax CheckpointManager.

One checkpoint = the stacked state (members' params and Adam state, best params/score/step) saved
with `StandardSave`, plus a JSON item with the loop position, loader state and record accumulators.
CheckpointManager writes into a temporary folder and renames it when complete, so a run killed at any
moment resumes from the last complete checkpoint.
"""
from __future__ import annotations

import base64
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


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
    """Periodic, atomic checkpoints of a members run under `directory`."""

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 1,
                 async_save: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, target_state: Any) -> tuple[Any, dict]:
        """Restore onto the shardings of `target_state` (arrays or ShapeDtypeStructs)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(target_state)), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
