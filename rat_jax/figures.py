"""The pipeline's diagnostics for one (test env, trial): LMC curves, soup vs #members, ID-val vs
OOD scatter and the diversity heat-map as PNGs, plus their numbers in a JSON file.

Everything is computed from the members the selection stage already holds, with the same
evaluator (so the same eval subsets) and, from selection, the member logits it already computed;
soups and interpolation points are evaluated as stacks. Nothing here trains.
"""
from __future__ import annotations

import json
import pathlib
from typing import Callable, Sequence

import numpy as np

from rat_jax import diagnostics, plots, soups, trees
from rat_jax.evaluation import accuracy, predict_logits_stacked

__all__ = ["member_groups", "env_figures"]

STACK = 16  # soups evaluated together at most (each is a whole copy of the params)


def member_groups(info: Sequence[dict]) -> dict[str, list[int]]:
    """{init source: member indices}: 'foundation', 'aux:<dataset>' (all runs of that dataset),
    'fusing' — from each member's `init` string."""
    groups: dict[str, list[int]] = {}
    for i, hp in enumerate(info):
        init = str(hp.get("init", "foundation"))
        if init.startswith("aux:"):
            name = "aux:" + init[4:].split("/")[0]
        elif init.startswith("fusing"):
            name = "fusing"
        else:
            name = "foundation"
        groups.setdefault(name, []).append(i)
    return groups


def env_figures(directory: pathlib.Path, tag: str, model, batch_stats, params, scores, flagged,
                info: Sequence[dict], acc: Callable | None, full_test, selection_set,
                eval_batch_size: int = 256, gate: dict | None = None, *,
                stack_logits: Callable | None = None, member_logits=None,
                greedy: tuple | None = None, write: bool = True) -> dict:
    """Write `<tag>_*.png` and `<tag>_diagnostics.json` into `directory` for the stacked members
    `params` ([M] ID-val `scores`, `flagged` non-finite, per-member `info`), on `full_test` (OOD)
    and `selection_set` (ID val): (images, labels) tuples or rat_jax.evaluation.EvalSplit.
    Returns the numbers written (paths under 'figures').

    `stack_logits(stacked, data)` -> logits [K, N, C] evaluates K stacked params in one pass
    (selection passes the member engine's); the soups of each curve and the points of each LMC
    segment go as one stack. Without it, stacks go through evaluation.predict_logits_stacked and
    single soups through `acc(params, data)` when given. `member_logits`: the non-flagged
    members' logits on `full_test` ([len(ok), N, C]) when the caller already has them;
    `greedy`: (selected, log) of soups.greedy_soup on `selection_set` when already run.
    `write=False` computes everything (every process must, when the evaluation spans
    processes) and writes nothing."""
    directory = pathlib.Path(directory)
    scores = np.asarray(scores, np.float64)
    ok = [j for j in range(len(scores)) if not flagged[j]]
    order = soups.sort_by_score(scores, exclude=np.flatnonzero(flagged))
    groups = member_groups(info)
    names = [f"m{i} {_short(info[i])}" for i in range(len(info))]
    out: dict = {"members": [dict(member=i, init=str(info[i].get("init")), h=info[i].get("h"),
                                  id_val=float(scores[i]), flagged=bool(flagged[i]))
                             for i in range(len(info))]}
    figs = {}
    if stack_logits is None:
        stack_logits = lambda stacked, data: predict_logits_stacked(
            model, stacked, batch_stats, _images(data), eval_batch_size)
        single = acc
    else:
        single = None
    if single is None:
        single = lambda p, data: accs([p], data)[0]

    def accs(params_list, data) -> list[float]:
        """Accuracies of several param trees on `data`, as stacks of at most STACK trees."""
        y = _labels(data)
        return [accuracy(lg, y) for i in range(0, len(params_list), STACK)
                for lg in stack_logits(trees.stack(params_list[i:i + STACK]), data)]

    # Per-member OOD accuracy and diversity from one stacked forward pass (or the caller's).
    if member_logits is None:
        member_logits = stack_logits(trees.select(params, ok), full_test)
    logits = np.asarray(member_logits)
    y_test = _labels(full_test)
    ood = np.full(len(scores), np.nan)
    ood[ok] = [accuracy(logits[j], y_test) for j in range(len(ok))]
    for i, m in enumerate(out["members"]):
        m["ood_test"] = float(ood[i])
    ok_groups = {g: [ok.index(i) for i in idx if i in ok] for g, idx in groups.items()}
    div = diagnostics.diversity_from_logits(logits, y_test,
                                            {g: v for g, v in ok_groups.items() if v},
                                            [names[i] for i in ok])
    out["diversity"] = {k: div[k] for k in ("names", "disagreement", "ratio_error", "per_member",
                                             "group_stats") if k in div}

    # Soup accuracy vs number of averaged members: uniform (score order) and greedy order.
    uniform_curve = accs([trees.average(params, members=order[:n])
                          for n in range(1, len(order) + 1)], full_test)
    if greedy is None:
        _, selected, log = soups.greedy_soup(params, scores,
                                             lambda p: single(p, selection_set),
                                             exclude=np.flatnonzero(flagged))
    else:
        selected, log = greedy
    counts, kept, prefixes = [], [], []
    for rec in log:
        if rec["accept"]:
            kept.append(rec["member"])
            prefixes.append(list(kept))
            counts.append(len(kept))
    greedy_curve = accs([trees.average(params, members=k) for k in prefixes], full_test)
    out["soup_vs_members"] = {"order": order, "uniform_ood": uniform_curve,
                              "greedy_selected": selected, "greedy_ood": greedy_curve}

    # ID-val vs OOD per member, soups marked (ID val of a soup: accuracy on the selection set).
    uniform = trees.average(params, members=ok)
    greedy_soup = trees.average(params, members=selected)
    id_val = accs([uniform, greedy_soup], selection_set)
    marks = {"uniform": (id_val[0], uniform_curve[-1]),
             "greedy": (id_val[1], greedy_curve[-1])}
    out["soups"] = {k: {"id_val": float(a), "ood_test": float(b)} for k, (a, b) in marks.items()}

    # Linear mode connectivity on the test env: best member vs soup, foundation vs aux init.
    pairs = {f"m{order[0]} (best) - uniform soup": (trees.take(params, order[0]), uniform)}
    found = [i for i in order if i in groups.get("foundation", [])]
    aux = [i for i in order if str(info[i].get("init", "")).startswith("aux:")]
    if found and aux:
        pairs[f"m{found[0]} foundation - m{aux[0]} {_short(info[aux[0]])}"] = (
            trees.take(params, found[0]), trees.take(params, aux[0]))
    if len(order) > 1:
        pairs[f"m{order[0]} - m{order[-1]} (best - worst)"] = (
            trees.take(params, order[0]), trees.take(params, order[-1]))
    curves, barriers = {}, {}
    for name, (a, b) in pairs.items():
        c = diagnostics.lmc_curve(model, batch_stats, a, b, None, y_test,
                                  batch_size=eval_batch_size,
                                  stack_logits=lambda st: stack_logits(st, full_test))
        curves[name] = (c["alphas"], c["acc"])
        barriers[name] = diagnostics.barrier(c["acc"], c["alphas"])
    out["lmc"] = {n: {"alphas": curves[n][0], "acc": curves[n][1], "barrier": barriers[n]}
                  for n in curves}
    if gate is not None:
        out["lmc_gate"] = gate
    if not write:
        return out

    directory.mkdir(parents=True, exist_ok=True)
    figs["diversity"] = plots.plot_diversity_heatmap(
        div["disagreement"], directory / f"{tag}_diversity.png", labels=[names[i] for i in ok],
        metric="prediction disagreement on the test env",
        title=f"Pairwise prediction disagreement ({tag})")
    figs["soup_vs_members"] = plots.plot_soup_vs_members(
        uniform_curve, greedy_curve, directory / f"{tag}_soup_vs_members.png",
        metric="OOD test accuracy", greedy_counts=counts, best_member=float(np.nanmax(ood)),
        title=f"Soup accuracy vs number of averaged members ({tag})")
    figs["scatter"] = plots.plot_member_scatter(
        scores[ok], ood[ok], directory / f"{tag}_idval_vs_ood.png", soups=marks,
        groups={g: v for g, v in ok_groups.items() if v},
        title=f"Members: ID-val vs OOD test accuracy ({tag})")
    figs["interpolation"] = plots.plot_interpolation(
        curves, directory / f"{tag}_interpolation.png", metric="OOD test accuracy",
        barriers=barriers, title=f"Linear interpolation between members ({tag})")
    out["figures"] = {k: str(v) for k, v in figs.items()}
    tmp = directory / f"{tag}_diagnostics.json.tmp"
    tmp.write_text(json.dumps(out, indent=1, default=float))
    tmp.replace(directory / f"{tag}_diagnostics.json")
    return out


def _labels(data) -> np.ndarray:
    """Labels of an EvalSplit or an (images, labels) tuple."""
    return np.asarray(data.labels if hasattr(data, "labels") else data[1])


def _images(data) -> np.ndarray:
    return data.images() if hasattr(data, "images") else data[0]


def _short(hp: dict) -> str:
    init = str(hp.get("init", "foundation"))
    return init.split(":")[0] if init.startswith("fusing") else init
