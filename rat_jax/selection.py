"""Stage E and the baselines' selection (docs/protocol.md §1.6-1.7): every row of the paper's table
from the members of one (test env, trial) and across trials (†). Progress goes to the console
(main process, unless quiet): a line when a test env's selection starts and ends, rate-limited
status lines in between (which split is loaded, which soup is built: "greedy soup 5/20 members").

Evaluation goes through the member engine (evaluation.StackEvaluator -> MemberEngine.logits):
members split over the devices, images over 'data' and the processes, each process decoding
only its rows of a split (evaluation.EvalSplit). Each member's logits on a split are computed
once, in one pass per (split, members group) — members shared by two groups (the no-aux members
of Ratatouille's group) once — and reused by the best-single rows, the logit ensemble and the
figures; soups, greedy candidates and LMC gate points are new params evaluated through the same
engine, a gate's points (and the figures' curves) as one stack."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import numpy as np

from rat_jax import diagnostics, distributed, figures, report, soups, trees
from rat_jax.engine.progress import Console
from rat_jax.data import ImageStore
from rat_jax.evaluation import SplitSpec, StackEvaluator, accuracy, eval_split
from rat_jax.specs import MemberSpec
from rat_jax.stages import GroupResult, ratatouille_foundation_members


@dataclasses.dataclass
class Candidates:
    """The members a row is made of: their stacked (best ID-val) `params`, ID-val `scores`,
    `flagged` (non-finite) marks, MemberSpecs (`info`) and `keys`, each member's name in the
    evaluator's logits cache (e.g. ("noaux", trial, j))."""
    params: Any
    scores: np.ndarray
    flagged: np.ndarray
    info: list[MemberSpec]
    keys: list

    @classmethod
    def of_group(cls, group: GroupResult, name: str, trial: int) -> "Candidates":
        return cls(group.best_params, group.best_score, group.nonfinite, list(group.info),
                   [(name, trial, j) for j in range(len(group.best_score))])

    @classmethod
    def concatenate(cls, parts: Sequence["Candidates"]) -> "Candidates":
        return cls(trees.concatenate([c.params for c in parts]),
                   np.concatenate([c.scores for c in parts]),
                   np.concatenate([c.flagged for c in parts]),
                   [m for c in parts for m in c.info], [k for c in parts for k in c.keys])

    def subset(self, idx: Sequence[int]) -> "Candidates":
        idx = list(idx)
        return Candidates(trees.select(self.params, idx), self.scores[idx], self.flagged[idx],
                          [self.info[i] for i in idx], [self.keys[i] for i in idx])

    @property
    def ok(self) -> list[int]:
        """The members rows use: the flagged (non-finite) ones are left out."""
        return [j for j in range(len(self.scores)) if not self.flagged[j]]

    def order(self) -> list[int]:
        """The usable members, best ID-val score first."""
        return soups.sort_by_score(self.scores, exclude=np.flatnonzero(self.flagged))


def withaux_members(groups: dict, aux_names, n_runs: int, trial: int = 0) -> Candidates | None:
    """Ratatouille's members: the aux-init group plus the runs the init rule starts from the
    foundation, which are the no-aux members with those h (same seed, hparams and init). The
    no-aux members among them keep their cache keys: their logits are not recomputed."""
    if "aux" not in groups:
        return None
    noaux = Candidates.of_group(groups["noaux"], "noaux", trial)
    idx = ratatouille_foundation_members([m.h for m in noaux.info], aux_names, n_runs)
    return Candidates.concatenate([noaux.subset(idx),
                                   Candidates.of_group(groups["aux"], "aux", trial)])


class _Evaluator:
    """Logits and accuracies of member stacks and soups on evaluation splits (EvalSplit, uint8
    images decoded per process), through the member engine; member logits cached per split."""

    def __init__(self, settings, dataset, batch_stats, saver=None, console=None):
        self.settings = settings
        self.saver = saver
        self.console = console or Console("selection", quiet=True)
        self.model = settings.model(dataset.num_classes)
        self.batch_stats = batch_stats
        self.dataset = dataset
        self.batch_size = settings.eval_batch_size
        self.store = ImageStore(dataset, **settings.cache_kw())
        self.engine = StackEvaluator(
            self.model, batch_stats, settings.eval_batch_size,
            strategy=settings.engine_strategy, data_parallel=settings.data_parallel_flag,
            devices=settings.devices)
        self._members: dict = {}  # (split name, member key) -> logits [N, C]

    def split(self, envs, split, trial):
        s = self.settings
        self.console.status(f"trial {trial}: envs {list(envs)} split {split!r}")
        data = eval_split(self.dataset, SplitSpec.of(s, trial_seed=trial, envs=envs,
                                                     split=split), store=self.store)
        data.name = (tuple(envs), split, trial)
        return data

    def logits(self, stacked, data) -> np.ndarray:
        """Logits [K, N, C] of K stacked params (one pass over the images)."""
        return self.engine.logits(stacked, data)

    def accs(self, params_list, data) -> list[float]:
        """Accuracies of several param trees (soups), evaluated as one stack."""
        return [accuracy(lg, data.labels)
                for lg in self.engine.logits_of(list(params_list), data)]

    def acc(self, params, data) -> float:
        return self.accs([params], data)[0]

    def members(self, params, keys, data, which=None) -> np.ndarray:
        """Logits [len(which), N, C] of members `which` (default all) of the stacked `params`,
        whose member j is known as keys[j] (e.g. ("noaux", trial, j)): the members not yet
        evaluated on `data` go in one pass, the others come from the cache."""
        which = list(range(len(keys))) if which is None else [int(j) for j in which]
        todo = [j for j in which if (data.name, keys[j]) not in self._members]
        if todo:
            for j, lg in zip(todo, self.logits(trees.select(params, todo), data)):
                self._members[(data.name, keys[j])] = lg
        if not which:
            return np.zeros((0, len(data), 0), np.float32)
        return np.stack([self._members[(data.name, keys[j])] for j in which])

    def save(self, row: dict, soup, members: Sequence[int], cands: Candidates) -> None:
        if self.saver is not None:
            self.saver(row, soup, self.batch_stats, [
                {"member": int(j), "init": cands.info[j].init, "group": cands.info[j].group,
                 "hparams": cands.info[j].record_hparams(), "score": float(cands.scores[j])}
                for j in members])


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """How select_and_evaluate scores a test env: `settings` (stages.TrainSettings); the pool
    used (`aux_names`, `n_runs`: Ratatouille's foundation-init members); `gate_threshold` > 0
    runs the LMC gate before each uniform soup (`gate_skip`: leave gated members out);
    `plots_dir`: the first trial's diagnostic figures; `save_soup(row, params, batch_stats,
    members)`: called with every soup (e.g. export.SoupWriter); `progress_interval`: seconds
    between status lines (default 0.5 on a TTY, 30 otherwise)."""
    settings: Any
    aux_names: Sequence[str] = ()
    n_runs: int = 1
    gate_threshold: float = 0.0
    gate_skip: bool = False
    plots_dir: Any = None
    save_soup: Callable | None = None
    progress_interval: float | None = None


@dataclasses.dataclass
class _Env:
    """One test env's selection: its evaluator, full test domain, console and row maker."""
    ev: _Evaluator
    k: int
    full_test: Any
    config: SelectionConfig
    target: Any

    def row(self, method, selection, trial, acc, n, **extra) -> dict:
        return report.make_row(method, selection, self.target.name, self.k, trial, acc, n,
                               **extra)


def select_and_evaluate(target, k: int, by_trial: dict, batch_stats,
                        config: SelectionConfig | None = None, **options) -> list[dict]:
    """All rows for test env k from {trial: {group: GroupResult}} (stages.target_members): per
    trial ERM / inter-training / fusing (ID val), uniform and greedy soups, the logit ensemble;
    across trials the uniform soups (†). `config`: a SelectionConfig, or its fields as
    keywords (`settings=` at least)."""
    config = config or SelectionConfig(**options)
    settings = config.settings
    console = Console(f"selection env{k}", interval=config.progress_interval,
                      quiet=settings.quiet or not distributed.is_main_process())
    started = time.monotonic()
    console.message(f"trials {list(by_trial)}: scoring members, soups and ensembles")
    ev = _Evaluator(settings, target, batch_stats, config.save_soup, console)
    env = _Env(ev, k, ev.split([k], "all", 0), config, target)   # the full test domain
    rows = []
    dagger = {"Soups/DiWA†": [], "Ratatouille†": []}
    for t, groups in by_trial.items():
        rows += _trial_rows(env, t, groups, dagger, plots=t == min(by_trial))
    if len(by_trial) > 1:
        for method, stacks in dagger.items():
            if stacks:
                rows.append(_dagger_row(env, method, Candidates.concatenate(stacks)))
    console.message(f"done in {time.monotonic() - started:.1f} s: {len(rows)} rows")
    return rows


def _dagger_row(env: _Env, method: str, cands: Candidates) -> dict:
    """The uniform soup (†) of a method's members over every trial."""
    ok = cands.ok
    env.ev.console.status(f"{method}: uniform soup of {len(ok)} members over trials")
    soup = trees.average(cands.params, members=ok)
    row = env.row(method, "Uniform†", -1, env.ev.acc(soup, env.full_test), len(ok))
    env.ev.save(row, soup, ok, cands)
    return row


def _trial_rows(env: _Env, t: int, groups: dict, dagger: dict, plots: bool) -> list[dict]:
    """The rows of trial `t`; its no-aux and Ratatouille members join `dagger`'s stacks."""
    ev, k, c = env.ev, env.k, env.config
    train_envs = [e for e in range(env.target.num_envs) if e != k]
    test_in = ev.split([k], "in", t)                      # DomainBed's env{k}_in_acc
    selection_set = ev.split(train_envs, "out", t)        # merged clean train-env out splits
    sets = _Sets(env.full_test, selection_set, test_in)

    def best_single(cands: Candidates):
        # the group's candidates in one pass; the row scores the best ID-val one
        order = cands.order()
        ev.console.status(f"trial {t}: scoring the best ID-val member ({len(order)} candidates)")
        logits = ev.members(cands.params, cands.keys, test_in, order)
        return order[0], accuracy(logits[0], test_in.labels)

    noaux = Candidates.of_group(groups["noaux"], "noaux", t)
    i, acc = best_single(noaux)
    rows = [env.row("ERM (vanilla fine-tuning)", "ID val", t, acc, 1, member=i)]
    rows += _soup_rows(env, "Soups/DiWA", noaux, sets, t).rows
    dagger["Soups/DiWA†"].append(noaux)
    wa = withaux_members(groups, c.aux_names, c.n_runs, t)
    if wa is not None:
        i, acc = best_single(wa)
        rows.append(env.row("Inter-training", "ID val", t, acc, 1, member=i,
                            init=wa.info[i].init))
        soup = _soup_rows(env, "Ratatouille", wa, sets, t)
        rows += soup.rows
        ok = wa.ok
        ev.console.status(f"trial {t}: logit ensemble of {len(ok)} members")
        logits = ev.members(wa.params, wa.keys, env.full_test, ok)
        rows.append(env.row("Ensemble of Ratatouille members", "Logits", t,
                            accuracy(soups.ensemble_logits(logits), env.full_test.labels),
                            len(ok)))
        if c.plots_dir is not None and plots:
            # every process evaluates (the engine spans them); the main one writes
            figures.env_figures(c.plots_dir, f"test{k}_trial{t}", figures.FigureMembers(
                ev.model, ev.batch_stats, wa.params, wa.scores, wa.flagged, wa.info),
                figures.FigureData(env.full_test, selection_set, ev.batch_size,
                                   stack_logits=ev.logits),
                member_logits=logits, greedy=soup.greedy,
                write=distributed.is_main_process())
        dagger["Ratatouille†"].append(wa)
    if "fusing" in groups:
        f = Candidates.of_group(groups["fusing"], "fusing", t)
        i, acc = best_single(f)
        rows.append(env.row("Fusing", "ID val", t, acc, 1, member=i, init=f.info[i].init))
    return rows


@dataclasses.dataclass
class _Sets:
    """A trial's evaluation splits: the full test domain, the ID-val selection set, the test
    env's in-split."""
    full_test: Any
    selection_set: Any
    test_in: Any


@dataclasses.dataclass
class _SoupRows:
    rows: list
    greedy: tuple  # (selected, log) of soups.greedy_soup


def _gate(env: _Env, method: str, cands: Candidates, selection_set, t: int):
    """(soup, kept members, row fields) of the LMC-gated uniform soup."""
    c, ev = env.config, env.ev
    ev.console.status(f"trial {t} {method}: LMC gate over {len(cands.ok)} members")
    # LMC gate on the ID-val selection set, members in score order (docs/protocol.md: no test data).
    probe = diagnostics.LmcProbe(diagnostics.GATE_ALPHAS, ev.batch_size,
                                 stack_logits=lambda stacked: ev.logits(stacked, selection_set))
    uniform, kept, records = diagnostics.lmc_gate(
        ev.model, ev.batch_stats, cands.params, cands.order(), None, selection_set.labels,
        diagnostics.GateConfig(c.gate_threshold, c.gate_skip, probe=probe))
    extra = {"gated": [r["member"] for r in records if r["gated"]],
             "gate_excluded": [r["member"] for r in records if r["excluded"]],
             "gate_barriers": {str(r["member"]): r["barrier"] for r in records}}
    return uniform, kept, extra


def _soup_rows(env: _Env, method: str, cands: Candidates, sets: _Sets, t: int) -> _SoupRows:
    ev = env.ev
    ok = cands.ok
    if env.config.gate_threshold > 0 and len(ok) > 1:
        uniform, members, extra = _gate(env, method, cands, sets.selection_set, t)
    else:
        uniform, members, extra = trees.average(cands.params, members=ok), ok, {}
    ev.console.status(f"trial {t} {method}: uniform soup of {len(members)} members")
    out = [env.row(method, "Uniform", t, ev.acc(uniform, sets.full_test), len(members), **extra)]
    ev.save(out[-1], uniform, members, cands)
    candidates = len(cands.order())
    tried = []

    def greedy_score(p):
        tried.append(1)
        ev.console.status(f"trial {t} {method}: greedy soup {len(tried)}/{candidates} members")
        return ev.acc(p, sets.selection_set)
    soup, selected, log = soups.greedy_soup(cands.params, cands.scores, greedy_score,
                                            exclude=np.flatnonzero(cands.flagged))
    out.append(env.row(method, "Greedy", t, ev.acc(soup, sets.full_test), len(selected),
                       selected=selected))
    ev.save(out[-1], soup, selected, cands)
    return _SoupRows(out, (selected, log))


def notes(c, target, trained_members: int, rows=(), aux_names=None, n_runs=None) -> str:
    """The sentences under the table. `aux_names` / `n_runs`: the auxiliary pool actually used
    (trained and brought checkpoints); default config.aux and config.n_aux_hparams."""
    aux_names = sorted(c.aux.keys()) if aux_names is None else sorted(aux_names)
    n_runs = c.n_aux_hparams if n_runs is None else n_runs
    flagged = ""
    gated = [f"{r['method']} env {r['test_env']} trial {r['trial']}: members {r['gated']}"
             + (" left out" if r.get("gate_excluded") else " kept (warn only)")
             for r in rows if r.get("gated")]
    gate = c.get("lmc_gate", None)
    if gate is not None and gate.threshold > 0:
        flagged += (f" LMC gate (accuracy barrier with the running soup > {gate.threshold} on the "
                    f"ID-val set): " + ("; ".join(gated) if gated else "no member gated") + ".")
    return (f"Target {target.name} ({', '.join(f'{i}={e}' for i, e in enumerate(target.envs))}); "
            f"arch {c.arch}, {c.image_size}px, batch {c.batch_size}/domain, "
            f"{c.target.steps} steps, {c.n_hparams} members per (test env, trial), "
            f"trials {list(c.trials)}, aux datasets {aux_names} x {n_runs} runs. "
            "Single-model rows: test env in-split (80%), as DomainBed's collect_results; "
            "soups and ensembles: the full test env, as MR's inference.py. "
            f"Member runs trained by this invocation: {trained_members}.{flagged}")
