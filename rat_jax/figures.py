"""The pipeline's diagnostics for one (test env, trial): LMC curves, soup vs #members, ID-val vs
OOD scatter and the diversity heat-map as PNGs, plus their numbers in a JSON file.

Everything is computed from the members the selection stage already holds, with the same
evaluator (so the same eval subsets) and, from selection, the member logits it already computed;
soups and interpolation points are evaluated as stacks. Nothing here trains.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Sequence

import numpy as np

from rat_jax import diagnostics, plots, soups, trees
from rat_jax.evaluation import accuracy, predict_logits_stacked
from rat_jax.specs import MemberSpec

__all__ = ["FigureData", "FigureMembers", "member_groups", "env_figures"]

STACK = 16  # soups evaluated together at most (each is a whole copy of the params)


def member_groups(info: Sequence[MemberSpec]) -> dict[str, list[int]]:
    """{init source: member indices}: 'foundation', 'aux:<dataset>' (all runs of that dataset),
    'fusing' — from each member's `init` string."""
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(info):
        init = _init(m, "foundation")
        if init.startswith("aux:"):
            name = "aux:" + init[4:].split("/")[0]
        elif init.startswith("fusing"):
            name = "fusing"
        else:
            name = "foundation"
        groups.setdefault(name, []).append(i)
    return groups


@dataclasses.dataclass
class FigureMembers:
    """The members the figures are about: `model`, shared `batch_stats`, stacked `params`,
    [M] ID-val `scores`, `flagged` (non-finite) marks and per-member MemberSpecs (`info`)."""
    model: Any
    batch_stats: Any
    params: Any
    scores: Any
    flagged: Any
    info: Sequence[MemberSpec]


@dataclasses.dataclass
class FigureData:
    """Where and how the figures evaluate: `full_test` (OOD) and `selection_set` (ID val),
    (images, labels) tuples or rat_jax.evaluation.EvalSplit. `stack_logits(stacked, data)` ->
    logits [K, N, C] evaluates K stacked params in one pass (selection passes the member
    engine's); the soups of each curve and the points of each LMC segment go as one stack.
    Without it, stacks go through evaluation.predict_logits_stacked in `eval_batch_size`
    batches and single soups through `acc(params, data)` when given."""
    full_test: Any
    selection_set: Any
    eval_batch_size: int = 256
    acc: Callable | None = None
    stack_logits: Callable | None = None


class _Scorer:
    """Accuracies of param trees on a split, as stacks of at most STACK trees."""

    def __init__(self, members: FigureMembers, data: FigureData):
        self.stack_logits = data.stack_logits
        self.single = None
        if self.stack_logits is None:
            self.stack_logits = lambda stacked, d: predict_logits_stacked(
                members.model, stacked, members.batch_stats, _images(d), data.eval_batch_size)
            self.single = data.acc
        if self.single is None:
            self.single = lambda p, d: self.accs([p], d)[0]

    def accs(self, params_list, data) -> list[float]:
        y = _labels(data)
        return [accuracy(lg, y) for i in range(0, len(params_list), STACK)
                for lg in self.stack_logits(trees.stack(params_list[i:i + STACK]), data)]


def env_figures(directory: pathlib.Path, tag: str, members: FigureMembers, data: FigureData, *,
                member_logits=None, greedy: tuple | None = None, gate: dict | None = None,
                write: bool = True) -> dict:
    """Write `<tag>_*.png` and `<tag>_diagnostics.json` into `directory` for `members` on `data`
    (see FigureData). Returns the numbers written (paths under 'figures').

    `member_logits`: the non-flagged members' logits on `full_test` ([len(ok), N, C]) when the
    caller already has them; `greedy`: (selected, log) of soups.greedy_soup on `selection_set`
    when already run; `gate`: the LMC gate's numbers, kept in the JSON. `write=False` computes
    everything (every process must, when the evaluation spans processes) and writes nothing."""
    scorer = _Scorer(members, data)
    m = members
    scores = np.asarray(m.scores, np.float64)
    ok = [j for j in range(len(scores)) if not m.flagged[j]]
    order = soups.sort_by_score(scores, exclude=np.flatnonzero(m.flagged))
    names = [f"m{i} {_short(m.info[i])}" for i in range(len(m.info))]
    out: dict = {"members": [dict(member=i, init=str(m.info[i].init), h=m.info[i].h,
                                  id_val=float(scores[i]), flagged=bool(m.flagged[i]))
                             for i in range(len(m.info))]}
    # Per-member OOD accuracy and diversity from one stacked forward pass (or the caller's).
    if member_logits is None:
        member_logits = scorer.stack_logits(trees.select(m.params, ok), data.full_test)
    per_member = _per_member(out, m, ok, names, np.asarray(member_logits), _labels(data.full_test))
    curves = _soup_curves(out, m, scorer, data, order, greedy)
    lmc = _lmc(m, scorer, data, order, curves.uniform)
    out["lmc"] = {n: {"alphas": c[0], "acc": c[1], "barrier": lmc.barriers[n]}
                  for n, c in lmc.curves.items()}
    if gate is not None:
        out["lmc_gate"] = gate
    if write:
        _write(pathlib.Path(directory), tag, out, _Plots(
            names, ok, scores, per_member, curves, lmc))
    return out


@dataclasses.dataclass
class _PerMember:
    ood: np.ndarray       # OOD accuracy per member (NaN: flagged)
    diversity: dict
    groups: dict          # {init group: positions among the non-flagged members}


def _per_member(out: dict, m: FigureMembers, ok, names, logits, y_test) -> _PerMember:
    ood = np.full(len(m.scores), np.nan)
    ood[ok] = [accuracy(logits[j], y_test) for j in range(len(ok))]
    for i, rec in enumerate(out["members"]):
        rec["ood_test"] = float(ood[i])
    ok_groups = {g: [ok.index(i) for i in idx if i in ok]
                 for g, idx in member_groups(m.info).items()}
    div = diagnostics.diversity_from_logits(logits, y_test,
                                            {g: v for g, v in ok_groups.items() if v},
                                            [names[i] for i in ok])
    out["diversity"] = {k: div[k] for k in ("names", "disagreement", "ratio_error", "per_member",
                                             "group_stats") if k in div}
    return _PerMember(ood, div, ok_groups)


@dataclasses.dataclass
class _Curves:
    uniform_curve: list   # OOD accuracy of the uniform soup of the n best members
    greedy_curve: list    # OOD accuracy of the greedy soup after each accepted member
    counts: list          # members in the greedy soup after each acceptance
    marks: dict           # {"uniform" / "greedy": (ID val, OOD)}
    uniform: Any          # the uniform soup of every usable member


def _soup_curves(out: dict, m: FigureMembers, scorer: _Scorer, data: FigureData, order,
                 greedy) -> _Curves:
    """Soup accuracy vs number of averaged members (uniform in score order, greedy order) and
    the soups' ID val vs OOD (ID val of a soup: accuracy on the selection set)."""
    uniform_curve = scorer.accs([trees.average(m.params, members=order[:n])
                                 for n in range(1, len(order) + 1)], data.full_test)
    if greedy is None:
        _, selected, log = soups.greedy_soup(m.params, m.scores,
                                             lambda p: scorer.single(p, data.selection_set),
                                             exclude=np.flatnonzero(m.flagged))
    else:
        selected, log = greedy
    counts, kept, prefixes = [], [], []
    for rec in log:
        if rec["accept"]:
            kept.append(rec["member"])
            prefixes.append(list(kept))
            counts.append(len(kept))
    greedy_curve = scorer.accs([trees.average(m.params, members=k) for k in prefixes],
                               data.full_test)
    out["soup_vs_members"] = {"order": order, "uniform_ood": uniform_curve,
                              "greedy_selected": selected, "greedy_ood": greedy_curve}
    ok = [j for j in range(len(m.scores)) if not m.flagged[j]]
    uniform = trees.average(m.params, members=ok)
    greedy_soup = trees.average(m.params, members=selected)
    id_val = scorer.accs([uniform, greedy_soup], data.selection_set)
    marks = {"uniform": (id_val[0], uniform_curve[-1]),
             "greedy": (id_val[1], greedy_curve[-1])}
    out["soups"] = {k: {"id_val": float(a), "ood_test": float(b)} for k, (a, b) in marks.items()}
    return _Curves(uniform_curve, greedy_curve, counts, marks, uniform)


@dataclasses.dataclass
class _Lmc:
    curves: dict    # {pair name: (alphas, accuracies)}
    barriers: dict  # {pair name: accuracy barrier}


def _lmc(m: FigureMembers, scorer: _Scorer, data: FigureData, order, uniform) -> _Lmc:
    """Linear mode connectivity on the test env: best member vs soup, foundation vs aux init,
    best vs worst."""
    params = m.params
    pairs = {f"m{order[0]} (best) - uniform soup": (trees.take(params, order[0]), uniform)}
    found = [i for i in order if i in member_groups(m.info).get("foundation", [])]
    aux = [i for i in order if _init(m.info[i], "").startswith("aux:")]
    if found and aux:
        pairs[f"m{found[0]} foundation - m{aux[0]} {_short(m.info[aux[0]])}"] = (
            trees.take(params, found[0]), trees.take(params, aux[0]))
    if len(order) > 1:
        pairs[f"m{order[0]} - m{order[-1]} (best - worst)"] = (
            trees.take(params, order[0]), trees.take(params, order[-1]))
    curves, barriers = {}, {}
    probe = diagnostics.LmcProbe(
        batch_size=data.eval_batch_size,
        stack_logits=lambda st: scorer.stack_logits(st, data.full_test))
    for name, (a, b) in pairs.items():
        c = diagnostics.lmc_curve(m.model, m.batch_stats, a, b, None, _labels(data.full_test),
                                  probe)
        curves[name] = (c["alphas"], c["acc"])
        barriers[name] = diagnostics.barrier(c["acc"], c["alphas"])
    return _Lmc(curves, barriers)


@dataclasses.dataclass
class _Plots:
    names: list
    ok: list
    scores: np.ndarray
    per_member: _PerMember
    curves: _Curves
    lmc: _Lmc


def _write(directory: pathlib.Path, tag: str, out: dict, p: _Plots) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    figs = {}
    figs["diversity"] = plots.plot_diversity_heatmap(
        p.per_member.diversity["disagreement"], directory / f"{tag}_diversity.png",
        labels=[p.names[i] for i in p.ok], metric="prediction disagreement on the test env",
        title=f"Pairwise prediction disagreement ({tag})")
    figs["soup_vs_members"] = plots.plot_soup_vs_members(
        p.curves.uniform_curve, p.curves.greedy_curve, directory / f"{tag}_soup_vs_members.png",
        metric="OOD test accuracy", greedy_counts=p.curves.counts,
        best_member=float(np.nanmax(p.per_member.ood)),
        title=f"Soup accuracy vs number of averaged members ({tag})")
    figs["scatter"] = plots.plot_member_scatter(
        p.scores[p.ok], p.per_member.ood[p.ok], directory / f"{tag}_idval_vs_ood.png",
        soups=p.curves.marks, groups={g: v for g, v in p.per_member.groups.items() if v},
        title=f"Members: ID-val vs OOD test accuracy ({tag})")
    figs["interpolation"] = plots.plot_interpolation(
        p.lmc.curves, directory / f"{tag}_interpolation.png", metric="OOD test accuracy",
        barriers=p.lmc.barriers, title=f"Linear interpolation between members ({tag})")
    out["figures"] = {k: str(v) for k, v in figs.items()}
    tmp = directory / f"{tag}_diagnostics.json.tmp"
    tmp.write_text(json.dumps(out, indent=1, default=float))
    tmp.replace(directory / f"{tag}_diagnostics.json")


def _labels(data) -> np.ndarray:
    """Labels of an EvalSplit or an (images, labels) tuple."""
    return np.asarray(data.labels if hasattr(data, "labels") else data[1])


def _images(data) -> np.ndarray:
    return data.images() if hasattr(data, "images") else data[0]


def _init(member: MemberSpec, default: str) -> str:
    return default if member.init is None else str(member.init)


def _short(member: MemberSpec) -> str:
    init = _init(member, "foundation")
    return init.split(":")[0] if init.startswith("fusing") else init
