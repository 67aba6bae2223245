"""Stacked-member pytrees: one tree whose every leaf carries a leading member axis [M, ...].

The one place that takes, selects, stacks, concatenates and averages members; the engine, the
soups, selection and the API all use these. Host (numpy) inputs stay on the host except for
`average`, which runs one compiled weighted mean.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["num_members", "take", "select", "stack", "concatenate", "average", "to_host"]


def num_members(stacked: Any) -> int:
    """M, the length of the leading axis of a stacked tree."""
    leaves = jax.tree.leaves(stacked)
    if not leaves:
        raise ValueError("an empty parameter tree has no members")
    return int(np.shape(leaves[0])[0])


def take(stacked: Any, i: int) -> Any:
    """Member `i` of a stacked tree (an ordinary single-member tree)."""
    m = num_members(stacked)
    if not -m <= int(i) < m:
        raise IndexError(f"member {i} out of range: the tree holds {m} members")
    return jax.tree.map(lambda x: x[int(i)], stacked)


def select(stacked: Any, indices: Sequence[int]) -> Any:
    """The stacked tree of members `indices`, in that order."""
    idx = np.asarray(list(indices), np.int64)
    return jax.tree.map(lambda x: x[idx], stacked)


def _check_structures(trees: Sequence[Any], what: str) -> None:
    if not trees:
        raise ValueError(f"{what} needs at least one tree")
    structure = jax.tree.structure(trees[0])
    for i, t in enumerate(trees[1:], 1):
        if jax.tree.structure(t) != structure:
            raise ValueError(f"tree {i} has a different structure than tree 0; every member must "
                             "be the same architecture with the same number of classes")


def stack(trees: Sequence[Any]) -> Any:
    """[tree_0, ..., tree_{M-1}] -> one stacked tree (host numpy arrays)."""
    trees = list(trees)
    _check_structures(trees, "stack")
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def concatenate(stacked_trees: Sequence[Any]) -> Any:
    """Stacked trees [M_a, ...], [M_b, ...] -> one stacked tree [M_a + M_b + ..., ...] (host)."""
    stacked_trees = list(stacked_trees)
    _check_structures(stacked_trees, "concatenate")
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *stacked_trees)


def to_host(tree: Any) -> Any:
    """Every leaf as a numpy array."""
    return jax.tree.map(np.asarray, tree)


def average(stacked: Any, weights: Sequence[float] | None = None,
            members: Sequence[int] | None = None) -> Any:
    """Weighted mean over the member axis (uniform when `weights` is None).

    `members` restricts the mean to those indices (e.g. to leave out flagged members): the others
    get weight 0, so every subset runs the same compiled `tree_map`. Leaves keep their dtype; the
    sum runs in float32.
    """
    m = num_members(stacked)
    w = np.ones((m,), np.float64) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (m,):
        raise ValueError(f"average(): {w.shape[0] if w.ndim else w.size} weights for {m} members")
    if members is not None:
        idx = np.asarray(members, dtype=np.int64)
        if idx.size == 0:
            raise ValueError("average() got an empty member list: nothing to average")
        keep = np.zeros((m,), bool)
        keep[idx] = True
        w = np.where(keep, w, 0.0)
    if w.sum() <= 0:
        raise ValueError("average(): the weights sum to zero")
    return _weighted_mean(jnp.asarray(w / w.sum(), jnp.float32), stacked)


@jax.jit
def _weighted_mean(w, stacked):
    return jax.tree.map(
        lambda x: jnp.tensordot(w, x.astype(jnp.float32), axes=1).astype(x.dtype), stacked)
