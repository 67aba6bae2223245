"""Stage E and the baselines' selection (PROTOCOL.md §1.6-1.7): every row of the paper's table
from the members of one (test env, trial) and across trials (†)."""
from __future__ import annotations

import numpy as np

from rat_jax import diagnostics, distributed, figures, report, soups
from rat_jax.evaluation import accuracy, load_split, predict_logits, predict_logits_stacked
from rat_jax.models import create_model


def _concat(trees):
    import jax
    return jax.tree.map(lambda *xs: np.concatenate(xs), *trees)


def withaux_members(groups: dict, n_aux: int):
    """Ratatouille's members: the aux-init group plus the foundation-init (h % (A+1) == 0) members,
    which are the no-aux members with those h (same seed, hparams and init)."""
    noaux = groups["noaux"]
    if "aux" not in groups:
        return None
    idx = [i for i, hp in enumerate(noaux.info) if hp["h"] % (n_aux + 1) == 0]
    aux = groups["aux"]
    params = _concat([_take(noaux.best_params, idx), aux.best_params])
    scores = np.concatenate([noaux.best_score[idx], aux.best_score])
    flagged = np.concatenate([noaux.nonfinite[idx], aux.nonfinite])
    info = [noaux.info[i] for i in idx] + list(aux.info)
    return params, scores, flagged, info


def _take(stacked, idx):
    import jax
    return jax.tree.map(lambda x: x[np.asarray(idx, np.int64)], stacked)


class _Evaluator:
    """Accuracy of one params tree or a stack on in-memory eval arrays (uint8 images)."""

    def __init__(self, pipe, dataset, batch_stats):
        self.c = pipe.c
        self.cache = pipe._cache_kw().get("cache_dir", None)
        self.model = create_model(self.c.arch, dataset.num_classes, conv_impl=self.c.conv_impl,
                                  dtype=self.c.engine.get("compute_dtype", "float32"))
        self.batch_stats = batch_stats
        self.dataset = dataset
        self.limit = self.c.get("max_eval_images", 0)

    def split(self, envs, split, trial):
        kw = {"cache_dir": self.cache} if self.cache else {}
        x, y = load_split(self.dataset, trial_seed=trial, envs=envs, split=split,
                          image_size=self.c.image_size, holdout_fraction=self.c.holdout_fraction,
                          **kw)
        if self.limit and len(y) > self.limit:  # CPU smoke runs: a fixed subset
            keep = np.random.RandomState(0).choice(len(y), self.limit, replace=False)
            x, y = x[np.sort(keep)], y[np.sort(keep)]
        return x, y

    def acc(self, params, data) -> float:
        x, y = data
        return accuracy(predict_logits(self.model, {"params": params, "batch_stats": self.batch_stats},
                                       x, self.c.eval_batch_size), y)

    def logits(self, stacked, data):
        return predict_logits_stacked(self.model, stacked, self.batch_stats, data[0],
                                      self.c.eval_batch_size)


def select_and_evaluate(pipe, target, k: int, by_trial: dict, batch_stats, n_aux: int) -> list[dict]:
    """All rows for test env k: per trial (ID val, uniform, greedy, ensemble) and across trials (†)."""
    ev = _Evaluator(pipe, target, batch_stats)
    full_test = ev.split([k], "all", 0)                       # the full test domain
    train_envs = [e for e in range(target.num_envs) if e != k]
    rows = []
    row = lambda m, s, t, a, n, **x: report.make_row(m, s, target.name, k, t, a, n, **x)
    dagger = {"Soups/DiWA†": [], "Ratatouille†": []}
    for t, groups in by_trial.items():
        test_in = ev.split([k], "in", t)                      # DomainBed's env{k}_in_acc
        selection_set = ev.split(train_envs, "out", t)        # merged clean train-env out splits
        noaux = groups["noaux"]

        def best_single(params, scores, flagged):
            order = soups.sort_by_score(scores, exclude=np.flatnonzero(flagged))
            return order[0], ev.acc(soups.take_member(params, order[0]), test_in)

        i, acc = best_single(noaux.best_params, noaux.best_score, noaux.nonfinite)
        rows.append(row("ERM (vanilla fine-tuning)", "ID val", t, acc, 1, member=i))
        rows += _soup_rows(ev, "Soups/DiWA", noaux.best_params, noaux.best_score, noaux.nonfinite,
                           full_test, selection_set, t, row)
        dagger["Soups/DiWA†"].append((noaux.best_params, noaux.nonfinite))
        wa = withaux_members(groups, n_aux)
        if wa is not None:
            params, scores, flagged, info = wa
            i, acc = best_single(params, scores, flagged)
            rows.append(row("Inter-training", "ID val", t, acc, 1, member=i, init=info[i]["init"]))
            rows += _soup_rows(ev, "Ratatouille", params, scores, flagged, full_test,
                               selection_set, t, row)
            ok = [j for j in range(len(scores)) if not flagged[j]]
            logits = ev.logits(_take(params, ok), full_test)
            rows.append(row("Ensemble of Ratatouille members", "Logits", t,
                            accuracy(soups.ensemble_logits(logits), full_test[1]), len(ok)))
            if (ev.c.get("make_plots", True) and t == min(by_trial)
                    and distributed.is_main_process()):
                figures.env_figures(pipe.workdir / "plots", f"test{k}_trial{t}", ev.model,
                                    ev.batch_stats, params, scores, flagged, info, ev.acc,
                                    full_test, selection_set, ev.c.eval_batch_size)
            dagger["Ratatouille†"].append((params, flagged))
        if "fusing" in groups:
            f = groups["fusing"]
            i, acc = best_single(f.best_params, f.best_score, f.nonfinite)
            rows.append(row("Fusing", "ID val", t, acc, 1, member=i, init=f.info[i]["init"]))
    if len(by_trial) > 1:
        for method, stacks in dagger.items():
            if not stacks:
                continue
            params = _concat([p for p, _ in stacks])
            flagged = np.concatenate([f for _, f in stacks])
            ok = [j for j in range(len(flagged)) if not flagged[j]]
            rows.append(row(method, "Uniform†", -1,
                            ev.acc(soups.average(params, members=ok), full_test), len(ok)))
    return rows


def _soup_rows(ev, method, params, scores, flagged, full_test, selection_set, t, row):
    ok = [j for j in range(len(scores)) if not flagged[j]]
    gate = ev.c.get("lmc_gate", None)
    extra = {}
    if gate is not None and gate.threshold > 0 and len(ok) > 1:
        # LMC gate on the ID-val selection set, members in score order (PROTOCOL: no test data).
        order = soups.sort_by_score(scores, exclude=np.flatnonzero(flagged))
        uniform, kept, records = diagnostics.lmc_gate(
            ev.model, ev.batch_stats, params, order, *selection_set, threshold=gate.threshold,
            skip=bool(gate.skip), batch_size=ev.c.eval_batch_size)
        extra = {"gated": [r["member"] for r in records if r["gated"]],
                 "gate_excluded": [r["member"] for r in records if r["excluded"]],
                 "gate_barriers": {str(r["member"]): r["barrier"] for r in records}}
        n_uniform = len(kept)
    else:
        uniform, n_uniform = soups.average(params, members=ok), len(ok)
    out = [row(method, "Uniform", t, ev.acc(uniform, full_test), n_uniform, **extra)]
    soup, selected, _ = soups.greedy_soup(params, scores, lambda p: ev.acc(p, selection_set),
                                          exclude=np.flatnonzero(flagged))
    out.append(row(method, "Greedy", t, ev.acc(soup, full_test), len(selected), selected=selected))
    return out


def notes(c, target, trained_members: int, rows=()) -> str:
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
            f"trials {list(c.trials)}, aux datasets {sorted(c.aux.keys())} x {c.n_aux_hparams} runs. "
            "Single-model rows: test env in-split (80%), as DomainBed's collect_results; "
            "soups and ensembles: the full test env, as MR's inference.py. "
            f"Member runs trained by this invocation: {trained_members}.{flagged}")
