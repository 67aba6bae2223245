"""The whole protocol for one config and workdir: the stage functions of `rat_jax.stages`, with
fingerprinted results and resume (`stages.WorkdirStore`), then selection and the report.

Each members run writes under the workdir and records a fingerprint of what it was computed from
(`done.json`); a rerun loads runs whose fingerprint matches and resumes a run killed midway from
its Orbax checkpoints.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import sys

from flax.traverse_util import flatten_dict

from rat_jax import aux_checkpoints, distributed, report, runtime, selection, stages
from rat_jax.data import DomainDataset, load_dataset
from rat_jax.export import SoupWriter
from rat_jax.files import write_json_atomic

log = logging.getLogger("rat_jax")


def record_config(config, workdir: pathlib.Path) -> None:
    """Write `config` and the command line to `workdir/config.json` (process 0); when the workdir
    holds another config, log the fields that differ."""
    path = workdir / "config.json"
    new = flatten_dict(json.loads(config.to_json_best_effort()), sep=".")
    if path.exists():
        old = flatten_dict(json.loads(path.read_text()).get("config", {}), sep=".")
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            log.warning("%s was last run with another config; fields that differ: %s",
                        workdir, ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})"
                                           for k in changed))
    if distributed.is_main_process():
        write_json_atomic(path, {"config": json.loads(config.to_json_best_effort()),
                                 "argv": sys.argv})


class Pipeline:
    """All stages for one config and workdir. `run()` returns the result rows.

    `shared_root` (a sweep's root, rat_jax.sweep): the foundation, the auxiliary pool and the
    auxiliary linear probes live there, shared by every target of the sweep
    (`stages.WorkdirStore`); the target's own runs, soups and table stay in `workdir`."""

    def __init__(self, config, workdir: str | os.PathLike,
                 shared_root: str | os.PathLike | None = None):
        self.c = config
        self.workdir = pathlib.Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.shared_root = pathlib.Path(shared_root).absolute() if shared_root else None
        self.settings = stages.TrainSettings.from_config(config)
        self.store = stages.WorkdirStore(self.workdir, config.aux_pool_dir or None,
                                         keep_checkpoints=config.keep_checkpoints,
                                         quiet=bool(config.quiet), shared_root=self.shared_root)
        self.notes = ""  # the sentences under the last run()'s table
        self.pool: dict = {}  # the auxiliary pool of the last run(): trained + checkpoints
        self.record_config()

    def record_config(self) -> None:
        """Write the resolved config and command line to `workdir/config.json`; when the workdir
        holds another config, log the fields that differ (the runs they affect are retrained)."""
        record_config(self.c, self.workdir)

    @property
    def trained_members(self) -> int:
        """Members trained by this process (0 when everything was loaded from the workdir)."""
        return self.store.trained_members

    def dataset(self, entry) -> DomainDataset:
        """A config dataset entry (name, optional root) as a dataset."""
        return self._resolve_dataset(entry.name, entry.root)

    def _resolve_dataset(self, name: str, root: str | None) -> DomainDataset:
        """A dataset by name or folder with this config's data settings. config.data_root (the
        DomainBed folder) is not a TFDS data dir: a `tfds:` name without a root uses TFDS's."""
        if not root and not str(name).startswith("tfds:"):
            root = self.c.data_root
        return load_dataset(name, root or None, cache_dir=self.c.cache_dir or None,
                            domainnet_duplicates=self.c.domainnet_duplicates or None)

    def run(self) -> list[dict]:
        c = self.c
        foundation = stages.Foundation.load(
            c.foundation, c.arch, (self.shared_root or self.workdir) / stages.FOUNDATION,
            c.image_size)
        target = self.dataset(c.target)
        test_envs = list(c.target.test_envs) or list(range(target.num_envs))
        for k in test_envs:
            if not 0 <= k < target.num_envs:
                raise ValueError(f"config.target.test_envs has {k}, but {target.name} has envs "
                                 f"0..{target.num_envs - 1} ({target.envs})")
        brought, pool = self._aux_pool(foundation, target)
        plan = stages.TargetPlan(pool, c.n_hparams, aux_checkpoints.pool_runs(pool, c.n_aux_hparams),
                                 c.lp_steps, c.target.steps, c.target.checkpoint_freq,
                                 run_fusing=c.run_fusing, fusing_range=c.fusing_range)
        runtime.release_memory()
        rows = []
        for k in test_envs:
            rows += self._test_env(target, k, foundation, plan)
            runtime.release_memory(compiled=True)  # this test env's members and programs
        notes = selection.notes(c, target, self.trained_members, rows, aux_names=sorted(pool),
                                n_runs=plan.n_runs)
        if brought:
            notes += (" Auxiliary checkpoints (config.aux_checkpoints, not trained here): "
                      + ", ".join(f"{n} x {p.n_runs}" for n, p in brought.items())
                      + f"; {plan.n_runs} runs per auxiliary dataset.")
        self.notes = notes
        if distributed.is_main_process():  # one writer and one printed table per run
            md = report.write(self.workdir, rows, notes)
            print(md, flush=True)
        return rows

    def _aux_pool(self, foundation: stages.Foundation, target: DomainDataset):
        """(the checkpoints' pool, the whole pool): checkpoints first (cheap; a bad file fails
        before any training), then the trained pool."""
        c = self.c
        tasks = {name: stages.AuxTask(self.dataset(e), e.steps, e.checkpoint_freq,
                                      c.lp_probe_steps)
                 for name, e in c.aux.items()}
        brought = aux_checkpoints.load_aux_checkpoints(
            c.get("aux_checkpoints", ()), aux_checkpoints.PoolCheck(
                arch=c.arch, foundation=foundation, target=target,
                n_runs=c.n_aux_hparams if tasks else None, reserved_names=sorted(tasks)),
            resolve_dataset=self._resolve_dataset, store=self.store)
        pool = stages.aux_pool(tasks, foundation, target=target, n_runs=c.n_aux_hparams,
                               settings=self.settings, store=self.store) if tasks else {}
        self.pool = aux_checkpoints.merge_pools(pool, brought)
        return brought, self.pool

    def _test_env(self, target: DomainDataset, k: int, foundation: stages.Foundation,
                  plan: stages.TargetPlan) -> list[dict]:
        """The rows of test env `k`: its linear probe, its members per trial, selection."""
        c, s = self.c, self.settings
        lp_steps = c.lp_probe_steps if c.lp_probe_steps > 0 else c.target.steps
        w_lp = stages.linear_probe(target, foundation, test_envs=[k], steps=lp_steps, settings=s,
                                   checkpoint_freq=c.target.checkpoint_freq, store=self.store,
                                   name=f"{target.name}_test{k}")
        by_trial = {t: stages.target_members(target, k, t, w_lp, foundation, plan, settings=s,
                                             store=self.store)
                    for t in c.trials}
        return selection.select_and_evaluate(
            target, k, by_trial, foundation.batch_stats, selection.SelectionConfig(
                settings=s, aux_names=sorted(plan.pool), n_runs=plan.n_runs,
                gate_threshold=c.lmc_gate.threshold, gate_skip=bool(c.lmc_gate.skip),
                plots_dir=self.workdir / "plots" if c.make_plots else None,
                save_soup=SoupWriter(self.workdir / "models", arch=c.arch, dataset=target,
                                     foundation_hash=foundation.hash,
                                     image_size=c.image_size)))


def train_and_evaluate(config, workdir: str | os.PathLike) -> list[dict]:
    """Every stage for `config` in `workdir` (resumable); the table rows. What
    `python -m rat_jax.main` runs, callable from a notebook with a config from `configs/`."""
    return Pipeline(config, workdir).run()
