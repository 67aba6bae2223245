"""Where stacked members live: the mesh ('model', 'data'), its shardings, and the training form.

`Placement` puts stacked trees (leading member axis) and batches on the mesh. `PartLayout` holds
the members in the form the local strategy trains: with the "loop" strategy and several members
per device group, one part per local member i (local member i of every device group), each
stepped in place with donated buffers; else one part, the stacked tree.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import rat_jax.trees as trees
from rat_jax.engine.mesh import DATA_AXIS, MEMBER_AXIS


def put(x, sharding):
    """Place a host array that every process holds whole (or a ready global jax.Array). With several
    processes each one copies only its devices' blocks (device_put would also all-gather the whole
    array to check that the processes agree)."""
    if jax.process_count() > 1 and not isinstance(x, jax.Array):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, x.shape)
    return jax.device_put(x, sharding)


class Placement:
    """The shardings of one mesh for `num_members` stacked members: members over 'model',
    each member's batch (and shared evaluation images) over 'data'."""

    def __init__(self, mesh: Mesh, num_members: int):
        self.mesh = mesh
        self.num_members = num_members
        self.model_size = mesh.shape[MEMBER_AXIS]
        self.data_size = mesh.shape[DATA_AXIS]
        if num_members % self.model_size:
            raise ValueError(f"{num_members} members do not split over a 'model' axis of "
                             f"{self.model_size}")
        self.member_sharding = NamedSharding(mesh, P(MEMBER_AXIS))
        # A size-1 'data' axis is left out of the specs: values that vary over it could not be
        # returned as replicated over it (check_vma).
        self.batch_spec = P(MEMBER_AXIS, DATA_AXIS) if self.data_size > 1 else P(MEMBER_AXIS)
        self.eval_spec = P(DATA_AXIS) if self.data_size > 1 else P()
        self.batch_sharding = NamedSharding(mesh, self.batch_spec)
        self.eval_sharding = NamedSharding(mesh, self.eval_spec)
        self.replicated = NamedSharding(mesh, P())

    def place(self, stacked: Any) -> Any:
        """Put a stacked tree (leading member axis) on the mesh, split over 'model'."""
        return jax.tree.map(lambda x: put(x, self.member_sharding), stacked)

    def replicate(self, tree: Any) -> Any:
        return jax.tree.map(lambda x: put(x, self.replicated), tree)

    def check_members(self, images) -> None:
        if images.shape[0] != self.num_members:
            raise ValueError(f"the member loader gave a batch for {images.shape[0]} members; the "
                             f"engine trains {self.num_members} (images must be [M, N, H, W, C])")

    def check_batch(self, batch: dict) -> tuple[Any, Any]:
        images, labels = batch["images"], batch["labels"]
        self.check_members(images)
        if images.shape[1] % self.data_size:
            raise ValueError(f"per-member batch {images.shape[1]} does not split over the 'data' "
                             f"axis of {self.data_size} devices; pass batch_size to plan_mesh")
        return images, labels

    def place_batch(self, batch: dict) -> tuple[jax.Array, jax.Array, dict]:
        """(images, labels, augment parameters) of a loader batch on the mesh."""
        images, labels = self.check_batch(batch)
        aug = jax.tree.map(lambda x: put(x, self.batch_sharding), batch.get("augment") or {})
        return put(images, self.batch_sharding), put(labels, self.batch_sharding), aug

    def place_eval(self, images: np.ndarray, labels: np.ndarray, mask: np.ndarray | None):
        """Shared evaluation images, labels and mask, padded to split over 'data', on the mesh."""
        n = images.shape[0]
        mask = np.ones((n,), bool) if mask is None else np.asarray(mask, bool)
        pad = (-n) % self.data_size
        if pad:
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
            labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
            mask = np.concatenate([mask, np.zeros((pad,), bool)])
        return tuple(put(x, self.eval_sharding) for x in (images, labels, mask))


class Parts(tuple):
    """Members in the engine's training form: a tuple of trees [model, ...], tree i holding local
    member i of every device group; one tree, the stacked [M] one, unless the engine runs the
    'loop' strategy with several members per device group."""


class PartLayout:
    """Stacked trees [M] <-> the training form (Parts) of one placement and local strategy."""

    def __init__(self, placement: Placement, strategy: str):
        self.placement, self.strategy = placement, strategy
        self.local_members = placement.num_members // placement.model_size
        # several parts: the 'loop' strategy with more than one member per device group
        self.split_form = strategy == "loop" and self.local_members > 1
        if strategy == "loop":
            self._take_jit, self._join_jit = _take_join_programs(placement.mesh)

    def split(self, stacked: Any) -> Parts:
        """A stacked tree [M, ...] (host or placed; e.g. the members or the hparams) -> Parts.
        The stacked tree is left as it was (not donated)."""
        if isinstance(stacked, Parts):
            return stacked
        stacked = self.placement.place(stacked)
        if not self.split_form:
            return Parts((stacked,))
        return Parts(self._take_jit(stacked, np.int32(i)) for i in range(self.local_members))

    def abstract(self, stacked: Any) -> Any:
        """The shapes, dtypes and shardings (ShapeDtypeStructs) of `stacked` [M, ...] placed."""
        sharding = self.placement.member_sharding
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.dtype(x.dtype),
                                                           sharding=sharding), stacked)

    def abstract_part(self, stacked: Any) -> Any:
        """The shapes, dtypes and shardings (ShapeDtypeStructs) of each part `split` makes of
        `stacked` [M, ...] (host, placed or abstract); every part has the same."""
        n = self.placement.model_size if self.split_form else self.placement.num_members
        return self.abstract(jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((n,) + tuple(np.shape(x))[1:], np.dtype(x.dtype)),
            stacked))

    def join(self, parts: Parts) -> Any:
        """Parts -> the stacked tree [M, ...] on the mesh (a copy when there are several parts;
        with one part, that part itself)."""
        if len(parts) == 1:
            return parts[0]
        return self._join_jit(tuple(parts))

    def local_index(self, i: int) -> np.ndarray:
        """Members in part i: local member i of every device group (group d holds d*L .. d*L+L-1)."""
        return np.arange(self.placement.model_size) * self.local_members + i

    @staticmethod
    def gather_local(outs: list) -> Any:
        """Per-call outputs [model] of the 'loop' strategy (call i = local member i of every
        device group) -> [M] in member order (device group d holds members d*L .. d*L+L-1)."""
        return jax.tree.map(lambda *xs: jnp.stack(xs, axis=1).reshape(-1), *outs)

    def eval_parts(self, params: Any) -> Parts:
        """Stacked params [K] (any K that the 'model' axis divides; host or placed) or Parts ->
        the parts `logits` runs: with the 'loop' strategy, local member i of every device group
        per part, else the whole placed stack."""
        if isinstance(params, Parts):
            return params
        k = trees.num_members(params)
        model_size = self.placement.model_size
        if k % model_size:
            raise ValueError(f"{k} members do not split over the 'model' axis of "
                             f"{model_size} devices (plan_eval_mesh({k}) gives a mesh "
                             "that fits)")
        placed = self.placement.place(params)
        local = k // model_size
        if self.strategy != "loop" or local == 1:
            return Parts((placed,))
        take = _take_join_programs(self.placement.mesh)[0]
        return Parts(take(placed, np.int32(i)) for i in range(local))


@functools.lru_cache(maxsize=64)
def _take_join_programs(mesh: Mesh):
    """'loop' helpers: local member i of every device group out of a stacked tree ([model]
    leading axis), and L such trees back into one stacked tree."""
    spec = P(MEMBER_AXIS)

    def take(tree, i):
        return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=True), tree)

    def join(parts):  # per device: [1, ...] x L -> its L members in order
        return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)
    take_j = jax.jit(jax.shard_map(take, mesh=mesh, in_specs=(spec, P()), out_specs=spec))
    # (no donation: XLA cannot alias L [1, ...] buffers into one [L, ...] buffer)
    join_j = jax.jit(jax.shard_map(join, mesh=mesh, in_specs=(spec,), out_specs=spec))
    return take_j, join_j
