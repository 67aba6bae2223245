"""Orbax in one place: standalone pytree checkpoints with JSON metadata, written atomically."""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from rat_jax.files import write_json_atomic

METADATA_FILE = "rat_jax_metadata.json"


def save_pytree(directory: str | os.PathLike, tree: Any, metadata: dict | None = None,
                force: bool = False) -> pathlib.Path:
    """Save `tree` under `directory/state` (Orbax, atomic) and `metadata` as JSON beside it."""
    directory = pathlib.Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
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
    with ocp.StandardCheckpointer() as ckptr:
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
