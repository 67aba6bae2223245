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

import time

import numpy as np

from rat_jax import diagnostics, distributed, figures, report, soups, trees
from rat_jax.engine.progress import Console
from rat_jax.data import ImageStore
from rat_jax.evaluation import StackEvaluator, accuracy, eval_split
from rat_jax.stages import ratatouille_foundation_members


def withaux_members(groups: dict, aux_names, n_runs: int):
    """Ratatouille's members: the aux-init group plus the runs the init rule starts from the
    foundation, which are the no-aux members with those h (same seed, hparams and init)."""
    noaux = groups["noaux"]
    if "aux" not in groups:
        return None
    idx = ratatouille_foundation_members([hp["h"] for hp in noaux.info], aux_names, n_runs)
    aux = groups["aux"]
    params = trees.concatenate([trees.select(noaux.best_params, idx), aux.best_params])
    scores = np.concatenate([noaux.best_score[idx], aux.best_score])
    flagged = np.concatenate([noaux.nonfinite[idx], aux.nonfinite])
    info = [noaux.info[i] for i in idx] + list(aux.info)
    return params, scores, flagged, info


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
            strategy=settings.engine_strategy, data_parallel=settings.data_parallel_flag)
        self._members: dict = {}  # (split name, member key) -> logits [N, C]

    def split(self, envs, split, trial):
        s = self.settings
        self.console.status(f"trial {trial}: envs {list(envs)} split {split!r}")
        data = eval_split(self.dataset, trial_seed=trial, envs=envs, split=split,
                          image_size=s.image_size, holdout_fraction=s.holdout_fraction,
                          max_images=s.max_eval_images, store=self.store)
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

    def save(self, row: dict, soup, members, info, scores) -> None:
        if self.saver is not None:
            self.saver(row, soup, self.batch_stats, [
                {"member": int(j), "init": info[j].get("init"), "group": info[j].get("group"),
                 "hparams": {k: v for k, v in info[j].items() if k not in ("init", "group")},
                 "score": float(scores[j])} for j in members])


def select_and_evaluate(target, k: int, by_trial: dict, batch_stats, *, settings,
                        aux_names=(), n_runs: int = 1, gate_threshold: float = 0.0,
                        gate_skip: bool = False, plots_dir=None, save_soup=None,
                        progress_interval: float | None = None) -> list[dict]:
    """All rows for test env k from {trial: {group: GroupResult}} (stages.target_members): per
    trial ERM / inter-training / fusing (ID val), uniform and greedy soups, the logit ensemble;
    across trials the uniform soups (†). `gate_threshold` > 0 runs the LMC gate before each
    uniform soup (`gate_skip`: leave gated members out); `plots_dir`: the first trial's
    diagnostic figures; `save_soup(row, params, batch_stats, members)`: called with every soup
    (e.g. export.SoupWriter). `progress_interval`: seconds between status lines (default 0.5 on
    a TTY, 30 otherwise)."""
    console = Console(f"selection env{k}", interval=progress_interval,
                      quiet=settings.quiet or not distributed.is_main_process())
    started = time.monotonic()
    console.message(f"trials {list(by_trial)}: scoring members, soups and ensembles")
    ev = _Evaluator(settings, target, batch_stats, save_soup, console)
    full_test = ev.split([k], "all", 0)                       # the full test domain
    train_envs = [e for e in range(target.num_envs) if e != k]
    rows = []
    row = lambda m, s, t, a, n, **x: report.make_row(m, s, target.name, k, t, a, n, **x)
    gate = (gate_threshold, gate_skip)
    dagger = {"Soups/DiWA†": [], "Ratatouille†": []}
    for t, groups in by_trial.items():
        test_in = ev.split([k], "in", t)                      # DomainBed's env{k}_in_acc
        selection_set = ev.split(train_envs, "out", t)        # merged clean train-env out splits
        noaux = groups["noaux"]

        def best_single(params, scores, flagged, keys):
            # the group's candidates in one pass; the row scores the best ID-val one
            order = soups.sort_by_score(scores, exclude=np.flatnonzero(flagged))
            console.status(f"trial {t}: scoring the best ID-val member ({len(order)} candidates)")
            logits = ev.members(params, keys, test_in, order)
            return order[0], accuracy(logits[0], test_in.labels)

        noaux_keys = [("noaux", t, j) for j in range(len(noaux.best_score))]
        i, acc = best_single(noaux.best_params, noaux.best_score, noaux.nonfinite, noaux_keys)
        rows.append(row("ERM (vanilla fine-tuning)", "ID val", t, acc, 1, member=i))
        soup_rows, _ = _soup_rows(ev, "Soups/DiWA", noaux.best_params, noaux.best_score,
                                  noaux.nonfinite, full_test, selection_set, t, row, gate,
                                  noaux.info)
        rows += soup_rows
        dagger["Soups/DiWA†"].append((noaux.best_params, noaux.nonfinite, noaux.info,
                                      noaux.best_score))
        wa = withaux_members(groups, aux_names, n_runs)
        if wa is not None:
            params, scores, flagged, info = wa
            idx = ratatouille_foundation_members([hp["h"] for hp in noaux.info], aux_names, n_runs)
            # the no-aux members among them keep their keys: their logits are not recomputed
            keys = [noaux_keys[j] for j in idx] + [("aux", t, j)
                                                    for j in range(len(scores) - len(idx))]
            i, acc = best_single(params, scores, flagged, keys)
            rows.append(row("Inter-training", "ID val", t, acc, 1, member=i, init=info[i]["init"]))
            soup_rows, greedy = _soup_rows(ev, "Ratatouille", params, scores, flagged, full_test,
                                           selection_set, t, row, gate, info)
            rows += soup_rows
            ok = [j for j in range(len(scores)) if not flagged[j]]
            console.status(f"trial {t}: logit ensemble of {len(ok)} members")
            logits = ev.members(params, keys, full_test, ok)
            rows.append(row("Ensemble of Ratatouille members", "Logits", t,
                            accuracy(soups.ensemble_logits(logits), full_test.labels), len(ok)))
            if plots_dir is not None and t == min(by_trial):
                # every process evaluates (the engine spans them); the main one writes
                figures.env_figures(plots_dir, f"test{k}_trial{t}", ev.model,
                                    ev.batch_stats, params, scores, flagged, info, None,
                                    full_test, selection_set, ev.batch_size,
                                    stack_logits=ev.logits, member_logits=logits,
                                    greedy=greedy, write=distributed.is_main_process())
            dagger["Ratatouille†"].append((params, flagged, info, scores))
        if "fusing" in groups:
            f = groups["fusing"]
            i, acc = best_single(f.best_params, f.best_score, f.nonfinite,
                                 [("fusing", t, j) for j in range(len(f.best_score))])
            rows.append(row("Fusing", "ID val", t, acc, 1, member=i, init=f.info[i]["init"]))
    if len(by_trial) > 1:
        for method, stacks in dagger.items():
            if not stacks:
                continue
            params = trees.concatenate([p for p, *_ in stacks])
            flagged = np.concatenate([f for _, f, *_ in stacks])
            info = [i for _, _, infos, _ in stacks for i in infos]
            scores = np.concatenate([s for *_, s in stacks])
            ok = [j for j in range(len(flagged)) if not flagged[j]]
            console.status(f"{method}: uniform soup of {len(ok)} members over trials")
            soup = trees.average(params, members=ok)
            rows.append(row(method, "Uniform†", -1, ev.acc(soup, full_test), len(ok)))
            ev.save(rows[-1], soup, ok, info, scores)
    console.message(f"done in {time.monotonic() - started:.1f} s: {len(rows)} rows")
    return rows


def _soup_rows(ev, method, params, scores, flagged, full_test, selection_set, t, row, gate, info):
    ok = [j for j in range(len(scores)) if not flagged[j]]
    threshold, skip = gate
    extra = {}
    if threshold > 0 and len(ok) > 1:
        ev.console.status(f"trial {t} {method}: LMC gate over {len(ok)} members")
        # LMC gate on the ID-val selection set, members in score order (docs/protocol.md: no test data).
        order = soups.sort_by_score(scores, exclude=np.flatnonzero(flagged))
        uniform, kept, records = diagnostics.lmc_gate(
            ev.model, ev.batch_stats, params, order, None, selection_set.labels,
            threshold=threshold, skip=skip, batch_size=ev.batch_size,
            stack_logits=lambda stacked: ev.logits(stacked, selection_set))
        extra = {"gated": [r["member"] for r in records if r["gated"]],
                 "gate_excluded": [r["member"] for r in records if r["excluded"]],
                 "gate_barriers": {str(r["member"]): r["barrier"] for r in records}}
        n_uniform = len(kept)
    else:
        uniform, n_uniform = trees.average(params, members=ok), len(ok)
    ev.console.status(f"trial {t} {method}: uniform soup of {n_uniform} members")
    out = [row(method, "Uniform", t, ev.acc(uniform, full_test), n_uniform, **extra)]
    ev.save(out[-1], uniform, kept if extra else ok, info, scores)
    candidates = len(soups.sort_by_score(scores, exclude=np.flatnonzero(flagged)))
    tried = []

    def greedy_score(p):
        tried.append(1)
        ev.console.status(f"trial {t} {method}: greedy soup {len(tried)}/{candidates} members")
        return ev.acc(p, selection_set)
    soup, selected, log = soups.greedy_soup(params, scores, greedy_score,
                                            exclude=np.flatnonzero(flagged))
    out.append(row(method, "Greedy", t, ev.acc(soup, full_test), len(selected), selected=selected))
    ev.save(out[-1], soup, selected, info, scores)
    return out, (selected, log)


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
