"""Orbax in one place: standalone pytree checkpoints with JSON metadata, written atomically, and
`exclusive()`, which every Orbax operation of rat_jax holds.

Orbax numbers its operations process-wide (one current operation id, which an asynchronous save's
background thread still reads), so two threads' Orbax operations must not overlap, jobs of a
parallel schedule included (rat_jax.schedule): `exclusive()` lets one thread in at a time and
first waits for the asynchronous save in flight, if any (`in_flight`).
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp

from rat_jax.files import write_json_atomic

METADATA_FILE = "rat_jax_metadata.json"

_lock = threading.RLock()
_in_flight: list = []


@contextlib.contextmanager
def exclusive():
    """Hold around an Orbax operation (module docstring): one thread at a time, after the
    asynchronous save in flight is written."""
    with _lock:
        while _in_flight:
            _in_flight.pop().wait()
        yield


def in_flight(save) -> None:
    """Inside `exclusive()`, after starting an asynchronous save: `save.wait()` is called before
    the next Orbax operation of any thread."""
    _in_flight.append(save)


def save_pytree(directory: str | os.PathLike, tree: Any, metadata: dict | None = None,
                force: bool = False) -> pathlib.Path:
    """Save `tree` under `directory/state` (Orbax, atomic) and `metadata` as JSON beside it."""
    directory = pathlib.Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    with exclusive(), ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "state", tree, force=force)
        ckptr.wait_until_finished()
    if metadata is not None:
        write_json_atomic(directory / METADATA_FILE, metadata, indent=2, sort_keys=True)
    return directory


def restore_pytree(directory: str | os.PathLike, target: Any | None = None) -> Any:
    """Restore a tree saved by `save_pytree`.

    `target` may be a pytree of arrays or `jax.ShapeDtypeStruct`s carrying shardings, in which case
    the arrays are restored directly onto those devices (e.g. a mesh).
    """
    directory = pathlib.Path(directory).absolute()
    path = directory / "state"
    if not path.exists():
        raise FileNotFoundError(
            f"No rat_jax checkpoint at {directory}: expected a 'state' folder written by "
            "rat_jax.checkpoint.save_pytree (convert a torch file with `python -m rat_jax.convert`).")
    with exclusive(), ocp.StandardCheckpointer() as ckptr:
        if target is None:
            return ckptr.restore(path)
        abstract = jax.tree.map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
            else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            target)
        return ckptr.restore(path, abstract)


def load_metadata(directory: str | os.PathLike) -> dict:
    path = pathlib.Path(directory) / METADATA_FILE
    return json.loads(path.read_text()) if path.exists() else {}
