"""Weight selection (docs/protocol.md §1.5-1.6): greedy soups, fusing coefficients, logit
ensembles. Everything acts on *stacked* parameter pytrees (leading member axis); the uniform and
weighted means themselves are `rat_jax.trees.average`."""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from rat_jax.trees import average, stack


def sort_by_score(scores: Sequence[float], exclude: Sequence[int] = ()) -> list[int]:
    """Member indices by descending ID-validation score (stable, as Python's sorted), minus `exclude`."""
    skip = set(int(i) for i in exclude)
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    return [i for i in order if i not in skip and math.isfinite(float(scores[i]))]


def greedy_soup(stacked, scores: Sequence[float], evaluate: Callable[[object], float],
                exclude: Sequence[int] = ()):
    """Greedy selection (MR inference.py): go through members by descending score, add each to the
    soup, rebuild the uniform average and keep it if `evaluate(soup) >= best` (the first is kept).

    Returns (soup_params, selected member indices, per-candidate log rows).
    """
    order = sort_by_score(scores, exclude)
    if not order:
        raise ValueError("greedy_soup: every member is excluded or has a non-finite score.")
    selected: list[int] = []
    best = -math.inf
    log = []
    for i in order:
        trial = selected + [i]
        acc = float(evaluate(average(stacked, members=trial)))
        accept = acc >= best
        if accept:
            selected, best = trial, acc
        log.append({"member": i, "score": float(scores[i]), "selection_acc": acc, "accept": accept})
    return average(stacked, members=selected), selected, log


def fusing_coefficients(seed: int, fusing_range: float, n: int) -> list[float]:
    """λ_j = κ_j / Σκ with κ_j = exp(R·U_j), U_j from Python's `random` right after random.seed(seed)."""
    rng = random.Random(seed)
    kappas = [math.exp(fusing_range * rng.random()) for _ in range(n)]
    total = sum(kappas)
    return [k / total for k in kappas]


def fuse(trees: Sequence, coefficients: Sequence[float]):
    """Σ λ_j θ_j parameter by parameter (fusing baseline, §1.5)."""
    if len(trees) != len(coefficients):
        raise ValueError(f"fuse: {len(trees)} trees but {len(coefficients)} coefficients.")
    return average(stack(trees), weights=coefficients)


def ensemble_logits(stacked_logits, members: Sequence[int] | None = None):
    """Logit ensemble: mean of the members' logits ([M, N, C] -> [N, C])."""
    if members is not None:
        stacked_logits = stacked_logits[np.asarray(members)]
    return jnp.mean(stacked_logits, axis=0)
