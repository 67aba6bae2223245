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
        c, s = self.c, self.settings
        featurizer, batch_stats, fhash = stages.load_foundation(
            c.foundation, c.arch, (self.shared_root or self.workdir) / stages.FOUNDATION,
            c.image_size)
        target = self.dataset(c.target)
        test_envs = list(c.target.test_envs) or list(range(target.num_envs))
        for k in test_envs:
            if not 0 <= k < target.num_envs:
                raise ValueError(f"config.target.test_envs has {k}, but {target.name} has envs "
                                 f"0..{target.num_envs - 1} ({target.envs})")
        tasks = {name: stages.AuxTask(self.dataset(e), e.steps, e.checkpoint_freq,
                                      c.lp_probe_steps)
                 for name, e in c.aux.items()}
        # Checkpoints first (cheap; a bad file fails before any training), then the trained pool.
        brought = aux_checkpoints.load_aux_checkpoints(
            c.get("aux_checkpoints", ()), arch=c.arch, foundation_featurizer=featurizer,
            foundation_batch_stats=batch_stats, target=target, foundation_hash=fhash,
            n_runs=c.n_aux_hparams if tasks else None, reserved_names=sorted(tasks),
            resolve_dataset=self._resolve_dataset, store=self.store)
        pool = stages.aux_pool(tasks, featurizer, batch_stats, target=target,
                               n_runs=c.n_aux_hparams, settings=s, foundation_hash=fhash,
                               store=self.store) if tasks else {}
        pool = self.pool = aux_checkpoints.merge_pools(pool, brought)
        n_runs = aux_checkpoints.pool_runs(pool, c.n_aux_hparams)
        runtime.release_memory()
        rows = []
        for k in test_envs:
            lp_steps = c.lp_probe_steps if c.lp_probe_steps > 0 else c.target.steps
            w_lp = stages.linear_probe(target, featurizer, batch_stats, test_envs=[k],
                                       steps=lp_steps, settings=s,
                                       checkpoint_freq=c.target.checkpoint_freq,
                                       foundation_hash=fhash, store=self.store,
                                       name=f"{target.name}_test{k}")
            by_trial = {t: stages.target_members(
                target, k, t, w_lp, featurizer, batch_stats, pool, n_hparams=c.n_hparams,
                n_runs=n_runs, lp_steps=c.lp_steps, steps=c.target.steps,
                checkpoint_freq=c.target.checkpoint_freq, settings=s, run_fusing=c.run_fusing,
                fusing_range=c.fusing_range, foundation_hash=fhash, store=self.store)
                for t in c.trials}
            rows += selection.select_and_evaluate(
                target, k, by_trial, batch_stats, settings=s, aux_names=sorted(pool),
                n_runs=n_runs, gate_threshold=c.lmc_gate.threshold,
                gate_skip=bool(c.lmc_gate.skip),
                plots_dir=self.workdir / "plots" if c.make_plots else None,
                save_soup=SoupWriter(self.workdir / "models", arch=c.arch, dataset=target,
                                     foundation_hash=fhash, image_size=c.image_size))
            del by_trial, w_lp  # this test env's members: free before the next one trains
            runtime.release_memory()
        notes = selection.notes(c, target, self.trained_members, rows, aux_names=sorted(pool),
                                n_runs=n_runs)
        if brought:
            notes += (" Auxiliary checkpoints (config.aux_checkpoints, not trained here): "
                      + ", ".join(f"{n} x {len(p['featurizers'])}" for n, p in brought.items())
                      + f"; {n_runs} runs per auxiliary dataset.")
        self.notes = notes
        if distributed.is_main_process():  # one writer and one printed table per run
            md = report.write(self.workdir, rows, notes)
            print(md, flush=True)
        return rows


def train_and_evaluate(config, workdir: str | os.PathLike) -> list[dict]:
    """Every stage for `config` in `workdir` (resumable); the table rows. What
    `python -m rat_jax.main` runs, callable from a notebook with a config from `configs/`."""
    return Pipeline(config, workdir).run()
