"""Weight-space diagnostics: linear mode connectivity (LMC) and prediction diversity.

LMC (Frankle et al. 2020): evaluate the network at ``(1 - α) θ_a + α θ_b`` for α in [0, 1]; the
*barrier* is the largest drop below the straight line joining the two endpoint values. A member
whose barrier with the running soup is large does not sit in the same basin, and averaging it in
would hurt (the soup premise of Model Ratatouille / model soups).

Diversity: pairwise prediction disagreement and the ratio-error of Aksela (2003) used by DiWA
(Ramé et al., 2022), per member and per initialization source, so one can check whether
auxiliary-task inits make members err on different samples.

Every evaluation goes through `rat_jax.evaluation` (uint8 images normalized on device); with
`stack_logits` (e.g. the member engine's `StackEvaluator.logits` bound to a split) the points of
one curve are evaluated as one stack of params in one pass over the images.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rat_jax import trees
from rat_jax.evaluation import accuracy, mean_loss, predict_logits, predict_logits_stacked

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_ALPHAS", "GATE_ALPHAS", "GateConfig", "LmcProbe", "interpolate", "lmc_curve",
           "barrier", "lmc_gate", "diversity", "diversity_from_logits", "pairwise_counts"]

DEFAULT_ALPHAS = tuple(np.linspace(0.0, 1.0, 11).round(6).tolist())
GATE_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclasses.dataclass(frozen=True)
class LmcProbe:
    """How the points of an LMC curve are evaluated: at `alphas`, in batches of `batch_size`
    images, one point after the other; or, with `stack_logits(stacked)` (logits [K, N, C] of K
    stacked params on the evaluation images, e.g. the member engine's `StackEvaluator.logits`
    bound to a split), all points as one stack (the images are then not read)."""
    alphas: Sequence[float] = DEFAULT_ALPHAS
    batch_size: int = 256
    stack_logits: Callable[[Any], np.ndarray] | None = None


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """The LMC gate of :func:`lmc_gate`: a member whose barrier (in `metric`, 'acc' or 'loss',
    see :func:`barrier`) with the running soup exceeds `threshold` is warned about and, with
    `skip=True`, left out of the soup. `probe`: how each member's curve is evaluated (default:
    the 5 GATE_ALPHAS)."""
    threshold: float
    skip: bool = False
    metric: str = "acc"
    probe: LmcProbe = dataclasses.field(default_factory=lambda: LmcProbe(GATE_ALPHAS))


# ------------------------------------------------------------------------------ LMC --------
def interpolate(a: Any, b: Any, alphas: Sequence[float]) -> list:
    """[(1 - α) a + α b for α in alphas]: one param tree per α (same dtypes as `a`)."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        raise ValueError("interpolate: the two param trees have different structures")
    return [_mix(a, b, jnp.float32(al)) for al in alphas]


@jax.jit
def _mix(a, b, alpha):
    """(1 - α) a + α b leaf by leaf in float32, cast back to a's dtypes (one compile per tree)."""
    return jax.tree.map(lambda x, y: ((1 - alpha) * x.astype(jnp.float32)
                                      + alpha * y.astype(jnp.float32)).astype(x.dtype), a, b)


def lmc_curve(model, batch_stats: Any, a: Any, b: Any, images, labels,
              probe: LmcProbe = LmcProbe()) -> dict:
    """Accuracy and mean cross-entropy of `model` along the segment from params `a` (α=0) to `b`
    (α=1) on (images uint8 [N,H,W,3], labels [N]), at the alphas of `probe` and evaluated as it
    says (:class:`LmcProbe`). Returns dict(alphas, acc, loss) of lists."""
    alphas = [float(x) for x in probe.alphas]
    labels = np.asarray(labels)
    points = interpolate(a, b, alphas)
    if probe.stack_logits is not None:
        all_logits = probe.stack_logits(trees.stack(points))
    else:
        all_logits = [predict_logits(model, {"params": p, "batch_stats": batch_stats}, images,
                                     probe.batch_size) for p in points]
    acc = [accuracy(lg, labels) for lg in all_logits]
    loss = [mean_loss(lg, labels) for lg in all_logits]
    return {"alphas": alphas, "acc": acc, "loss": loss}


def barrier(values: Sequence[float], alphas: Sequence[float] | None = None,
            metric: str = "acc") -> float:
    """Largest gap between the straight line joining the endpoint values and the curve.

    metric='acc' (higher is better): max_α [(1-t) v(α_0) + t v(α_1) - v(α)];
    metric='loss' (lower is better): max_α [v(α) - ((1-t) v(α_0) + t v(α_1))],
    with t = (α - α_0) / (α_1 - α_0) over the sorted alphas (α_0, α_1: the first and last).
    Never negative (the endpoints themselves give 0); ~0 means linearly mode-connected. nan when
    any value is nan (e.g. an empty evaluation split).
    """
    if metric not in ("acc", "loss"):
        raise ValueError(f"barrier: metric={metric!r}; use 'acc' or 'loss'")
    v = np.asarray(values, np.float64)
    al = np.linspace(0.0, 1.0, len(v)) if alphas is None else np.asarray(alphas, np.float64)
    if v.ndim != 1 or len(v) < 2 or al.shape != v.shape:
        raise ValueError(f"barrier: need >= 2 values with matching alphas, got {v.shape} values "
                         f"and {al.shape} alphas")
    if not np.all(np.isfinite(v)):
        return float("nan")
    order = np.argsort(al, kind="stable")
    v, al = v[order], al[order]
    span = al[-1] - al[0]
    if span <= 0:
        raise ValueError("barrier: alphas must span an interval (first != last)")
    t = (al - al[0]) / span
    line = (1 - t) * v[0] + t * v[-1]
    gap = line - v if metric == "acc" else v - line
    return float(max(0.0, np.max(gap)))


def lmc_gate(model, batch_stats: Any, stacked: Any, order: Sequence[int], images, labels,
             gate: GateConfig):
    """Walk members in `order`; measure each one's barrier (in `gate.metric`, see
    :func:`barrier`) with the uniform soup of the members kept so far, and warn when it exceeds
    `gate.threshold`; with `gate.skip` such members are left out of the soup.

    Returns (soup_params, kept member indices, records): one record per member walked,
    dict(member, barrier, gated, excluded), where `gated` means barrier > threshold (the first
    member starts the soup: barrier 0.0). ``[r for r in records if r['gated']]`` are the gated ones.
    Each member's curve is evaluated as `gate.probe` says (e.g. its points in one stack).
    """
    threshold, skip, metric = gate.threshold, gate.skip, gate.metric
    order = [int(i) for i in order]
    if not order:
        raise ValueError("lmc_gate: empty member order")
    kept = [order[0]]
    records = [{"member": order[0], "barrier": 0.0, "gated": False, "excluded": False}]
    for i in order[1:]:
        soup = trees.average(stacked, members=kept)
        curve = lmc_curve(model, batch_stats, soup, trees.take(stacked, i), images, labels,
                          gate.probe)
        b = barrier(curve[metric], curve["alphas"], metric)
        gated = b > threshold
        excluded = gated and skip
        if gated:
            log.warning("LMC gate: member %d has a %s barrier %.4f with the running soup of %s "
                        "(threshold %.4f)%s", i, metric, b, kept, threshold,
                        "; left out of the soup" if skip else "; kept (skip=False)")
        if not excluded:
            kept.append(i)
        records.append({"member": i, "barrier": b, "gated": bool(gated),
                        "excluded": bool(excluded)})
    return trees.average(stacked, members=kept), kept, records


# ------------------------------------------------------------------------ diversity --------
def pairwise_counts(preds: np.ndarray, labels: np.ndarray) -> dict:
    """Per pair (i, j) of members ([M, N] predicted classes): `disagree` (predictions differ),
    `single` (exactly one of the two is wrong) and `both` (both wrong) counts, each [M, M]."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    wrong = (preds != labels[None]).astype(np.int64)          # [M, N]
    right = 1 - wrong
    both = wrong @ wrong.T
    single = wrong @ right.T + right @ wrong.T
    m = preds.shape[0]
    disagree = np.zeros((m, m), np.int64)
    for i, j in itertools.combinations(range(m), 2):
        disagree[i, j] = disagree[j, i] = int(np.sum(preds[i] != preds[j]))
    return {"disagree": disagree, "single": single, "both": both, "n": preds.shape[1]}


def _ratio(single, both):
    """Aksela's ratio-error N_single / N_both; 0 when neither happens, inf with no shared error."""
    single, both = np.asarray(single, np.float64), np.asarray(both, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = single / both
    return np.where(single == 0, 0.0, r)


def diversity_from_logits(logits, labels, groups: Mapping[str, Sequence[int]] | None = None,
                          names: Sequence[str] | None = None) -> dict:
    """Diversity of members from their logits [M, N, C] (or predicted classes [M, N]).

    Pairwise [M, M] matrices (zero diagonal, symmetric):
      * ``disagreement``: fraction of samples where the two predicted classes differ;
      * ``ratio_error``: DiWA's diversity measure, the ratio-error of Aksela (2003), "Comparison of
        classifier selection methods for improving committee performance" (MCS 2003), as used in
        Ramé et al. (2022), "Diverse Weight Averaging for Out-of-Distribution Generalization"
        (DiWA, §4 / App.): N_single / N_both, the number of samples on which exactly one of the
        two members errs over the number on which both err (DESlib's ``ratio_errors`` is the same
        (N01 + N10) / N00). Higher = errors less shared = more diverse. 0 when neither member
        errs where the other does not (identical members), inf when they never err together;
      * ``single_error_fraction``: N_single / (N_single + N_both), the same information bounded
        to [0, 1] (ratio / (1 + ratio)): of the samples where at least one errs, the share where
        exactly one does.
    ``per_member``: for each of the three, the mean over the other members (ratio-error: over the
    finite values). ``accuracy``: [M]. ``groups`` (e.g. {'foundation': [0, 3], 'aux:textures':
    [1, 4]}): ``group_stats`` holds, for every within-group pair set ('foundation') and every
    between-group pair set ('foundation | aux:textures'), the mean of each pairwise measure and
    the number of pairs (means of ratio-error over finite values; nan when there is no pair).
    """
    arr = np.asarray(logits)
    preds = arr.argmax(-1) if arr.ndim == 3 else arr.astype(np.int64)
    labels = np.asarray(labels)
    if preds.ndim != 2 or preds.shape[1] != labels.shape[0]:
        raise ValueError(f"diversity: logits {arr.shape} do not match labels {labels.shape}")
    m, n = preds.shape
    c = pairwise_counts(preds, labels)
    disagreement = c["disagree"] / max(n, 1)
    ratio = _ratio(c["single"], c["both"])
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(c["single"] == 0, 0.0, c["single"] / (c["single"] + c["both"]))
    np.fill_diagonal(ratio, 0.0)
    np.fill_diagonal(frac, 0.0)
    mats = {"disagreement": disagreement, "ratio_error": ratio, "single_error_fraction": frac}

    def pair_mean(mat, pairs):
        vals = np.asarray([mat[i, j] for i, j in pairs], np.float64)
        vals = vals[np.isfinite(vals)]
        return float(vals.mean()) if vals.size else float("nan")

    per_member = {k: [pair_mean(v, [(i, j) for j in range(m) if j != i]) for i in range(m)]
                  for k, v in mats.items()}
    out = {"names": list(names) if names is not None else [str(i) for i in range(m)],
           "accuracy": [float(np.mean(preds[i] == labels)) if n else float("nan")
                        for i in range(m)],
           **{k: v.tolist() for k, v in mats.items()}, "per_member": per_member,
           "num_samples": int(n)}
    if groups:
        groups = {str(g): [int(i) for i in idx] for g, idx in groups.items()}
        for g, idx in groups.items():
            bad = [i for i in idx if not 0 <= i < m]
            if bad:
                raise ValueError(f"diversity: group {g!r} names members {bad} outside 0..{m - 1}")
        stats = {}
        for g, idx in groups.items():
            pairs = list(itertools.combinations(sorted(set(idx)), 2))
            stats[g] = {"kind": "within", "pairs": len(pairs),
                        **{k: pair_mean(v, pairs) for k, v in mats.items()}}
        for g1, g2 in itertools.combinations(groups, 2):
            pairs = [(i, j) for i in groups[g1] for j in groups[g2] if i != j]
            stats[f"{g1} | {g2}"] = {"kind": "between", "pairs": len(pairs),
                                     **{k: pair_mean(v, pairs) for k, v in mats.items()}}
        out["groups"] = groups
        out["group_stats"] = stats
    return out


def diversity(model, stacked: Any, batch_stats: Any, images, labels,
              groups: Mapping[str, Sequence[int]] | None = None, *, batch_size: int = 256,
              names: Sequence[str] | None = None) -> dict:
    """:func:`diversity_from_logits` of every member of `stacked` on (images uint8, labels)."""
    logits = predict_logits_stacked(model, stacked, batch_stats, images, batch_size)
    return diversity_from_logits(logits, labels, groups, names)
