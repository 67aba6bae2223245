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
import threading

from flax.traverse_util import flatten_dict

from rat_jax import aux_checkpoints, distributed, report, runtime, schedule, selection, stages
from rat_jax import runs
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
        self.rows: list[dict] = []
        self.rows_by_env: dict = {}
        self.foundation = self.target = self._plan = None
        self.parallel = False  # runs side by side (schedule.run_jobs): compiled programs stay
        self._lock = threading.Lock()
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
        """Every job of this target (schedule.run_jobs); the table rows."""
        import jax
        jobs, fns = self.jobs(self.workdir)
        self.parallel = schedule.resolve_mode(self.c.engine.get("schedule", "auto"),
                                              jax.default_backend(), jax.process_count())
        schedule.run_jobs(jobs, fns, jax.devices(), self.parallel)
        return self.rows

    def prepare(self) -> None:
        """The foundation, the target and its test envs, and the auxiliary checkpoints (cheap,
        and a bad file fails before any training)."""
        if self.foundation is not None:
            return
        c = self.c
        self.foundation = stages.Foundation.load(
            c.foundation, c.arch, (self.shared_root or self.workdir) / stages.FOUNDATION,
            c.image_size)
        self.target = self.dataset(c.target)
        self.test_envs = list(c.target.test_envs) or list(range(self.target.num_envs))
        for k in self.test_envs:
            if not 0 <= k < self.target.num_envs:
                raise ValueError(f"config.target.test_envs has {k}, but {self.target.name} has "
                                 f"envs 0..{self.target.num_envs - 1} ({self.target.envs})")
        self.tasks = {name: stages.AuxTask(self.dataset(e), e.steps, e.checkpoint_freq,
                                           c.lp_probe_steps)
                      for name, e in c.aux.items()}
        self.brought = aux_checkpoints.load_aux_checkpoints(
            c.get("aux_checkpoints", ()), aux_checkpoints.PoolCheck(
                arch=c.arch, foundation=self.foundation, target=self.target,
                n_runs=c.n_aux_hparams if self.tasks else None,
                reserved_names=sorted(self.tasks)),
            resolve_dataset=self._resolve_dataset, store=self.store)

    def jobs(self, root: pathlib.Path) -> tuple[list[schedule.Job], dict]:
        """This target's jobs (runs.plan_jobs of its planned runs: the members runs, a
        selection per test env, the table), named by their folders relative to `root`, and
        their functions of the devices they get."""
        self.prepare()
        planned = runs.target_runs(self.c, self.workdir, self.shared_root or self.workdir)
        jobs = runs.plan_jobs(planned, root)
        return jobs, {j.name: self._job_fn(j) for j in jobs}

    def _job_fn(self, job: schedule.Job):
        if job.kind == "selection":
            return lambda devices: self._select(job.env, devices)
        if job.kind == "table":
            return lambda devices: self._table()
        return self._run_fn(job.run)

    def _settings(self, devices) -> stages.TrainSettings:
        return self.settings.replace(devices=tuple(devices))

    def _run_fn(self, run):
        """The job of a members run. It returns None: the scheduler keeps what each job returns
        until the schedule ends, and a run's params are read from the store where a later job
        needs them (loaded once the run is done), so the job does not hand them on."""
        role = run.role
        if role[0] == "aux_lp":
            train = lambda devices: self._aux_probe(role[1], devices)
        elif role[0] == "aux":
            train = lambda devices: stages.aux_runs(
                role[1], self.tasks[role[1]], self.foundation, self.target, self.c.n_aux_hparams,
                self._settings(devices), self.store)
        elif role[0] == "lp":
            train = lambda devices: self._probe(role[1], devices)
        else:
            train = lambda devices: self._members(role[1], role[2], devices)

        def job(devices) -> None:
            train(devices)
        return job

    def _aux_probe(self, name: str, devices) -> dict:
        task = self.tasks[name]
        return stages.linear_probe(task.dataset, self.foundation, test_envs=[],
                                   steps=task.lp_steps if task.lp_steps > 0 else task.steps,
                                   settings=self._settings(devices),
                                   checkpoint_freq=task.checkpoint_freq, store=self.store,
                                   name=f"{name}_notest")

    def _probe(self, k: int, devices=None) -> dict:
        """Test env k's linear probe on the foundation (trained, or loaded when done). As a job
        (`devices` given) run one at a time, it drops JAX's compiled programs before (those of
        the auxiliary pool or the previous test env) and after (its own): no later run has
        their shapes, and they would otherwise stay through the members runs."""
        c = self.c
        lp_steps = c.lp_probe_steps if c.lp_probe_steps > 0 else c.target.steps
        settings = self.settings if devices is None else self._settings(devices)
        job = devices is not None and not self.parallel
        if job:
            runtime.release_memory(compiled=True)
        w_lp = stages.linear_probe(self.target, self.foundation, test_envs=[k], steps=lp_steps,
                                   settings=settings, checkpoint_freq=c.target.checkpoint_freq,
                                   store=self.store, name=f"{self.target.name}_test{k}")
        if job:
            runtime.release_memory(compiled=True)
        return w_lp

    def target_plan(self) -> stages.TargetPlan:
        """The members plan of every (test env, trial): the auxiliary pool (its trained runs,
        loaded once they are done, and the brought checkpoints) and the run lengths."""
        with self._lock:
            if self._plan is None:
                c = self.c
                pool = stages.aux_pool(self.tasks, self.foundation, target=self.target,
                                       n_runs=c.n_aux_hparams, settings=self.settings,
                                       store=self.store) if self.tasks else {}
                self.pool = aux_checkpoints.merge_pools(pool, self.brought)
                self._plan = stages.TargetPlan(
                    self.pool, c.n_hparams, aux_checkpoints.pool_runs(self.pool, c.n_aux_hparams),
                    c.lp_steps, c.target.steps, c.target.checkpoint_freq,
                    run_fusing=c.run_fusing, fusing_range=c.fusing_range)
            return self._plan

    def _members(self, k: int, trial: int, devices=None) -> dict:
        """The target members of (test env k, trial) (trained, or loaded when done)."""
        settings = self.settings if devices is None else self._settings(devices)
        return stages.target_members(self.target, k, trial, self._probe(k), self.foundation,
                                     self.target_plan(), settings=settings, store=self.store)

    def _select(self, k: int, devices) -> None:
        """Selection, soups and figures of test env `k` from its members of every trial."""
        c, plan = self.c, self.target_plan()
        by_trial = {t: self._members(k, t) for t in c.trials}
        rows = selection.select_and_evaluate(
            self.target, k, by_trial, self.foundation.batch_stats, selection.SelectionConfig(
                settings=self._settings(devices), aux_names=sorted(plan.pool),
                n_runs=plan.n_runs, gate_threshold=c.lmc_gate.threshold,
                gate_skip=bool(c.lmc_gate.skip),
                plots_dir=self.workdir / "plots" if c.make_plots else None,
                save_soup=SoupWriter(self.workdir / "models", arch=c.arch, dataset=self.target,
                                     foundation_hash=self.foundation.hash,
                                     image_size=c.image_size)))
        self.rows_by_env[k] = rows
        del by_trial
        # this test env's members, and (one run at a time) its compiled programs
        runtime.release_memory(compiled=not self.parallel)

    def _table(self) -> list[dict]:
        """The per-env table of every test env, in test-env order, with its notes."""
        c, plan = self.c, self.target_plan()
        rows = [r for k in self.test_envs for r in self.rows_by_env[k]]
        notes = selection.notes(c, self.target, self.trained_members, rows,
                                aux_names=sorted(plan.pool), n_runs=plan.n_runs)
        if self.brought:
            notes += (" Auxiliary checkpoints (config.aux_checkpoints, not trained here): "
                      + ", ".join(f"{n} x {p.n_runs}" for n, p in self.brought.items())
                      + f"; {plan.n_runs} runs per auxiliary dataset.")
        self.notes, self.rows = notes, rows
        if distributed.is_main_process():  # one writer and one printed table per run
            md = report.write(self.workdir, rows, notes)
            print(md, flush=True)
        return rows


def train_and_evaluate(config, workdir: str | os.PathLike) -> list[dict]:
    """Every stage for `config` in `workdir` (resumable); the table rows. What
    `python -m rat_jax.main` runs, callable from a notebook with a config from `configs/`."""
    return Pipeline(config, workdir).run()
