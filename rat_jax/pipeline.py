"""The Ratatouille pipeline, stage by stage (PROTOCOL.md §0):

  foundation -> linear probes (aux datasets, target per test env) -> auxiliary pool ->
  target members (no-aux, aux-init, fusing) -> selection (uniform, greedy, †, ID val) -> report.

Each stage writes under the workdir and records a fingerprint of what it was computed from
(`done.json`); a rerun skips stages whose fingerprint matches and resumes a stage killed midway
from its Orbax checkpoints.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from typing import Any, Sequence

import jax
import numpy as np

from rat_jax import checkpoint, distributed, report, soups
from rat_jax.data import (DomainDataset, MemberLoader, iterate_eval, load_domainbed,
                          random_hparams, run_seed)
from rat_jax.data.protocol import default_hparams
from rat_jax.models import create_model
from rat_jax.engine import members as members_lib
from rat_jax.engine.loop import id_val_names, train_members

log = logging.getLogger("rat_jax")
FOUNDATION = "foundation"


# ---------------------------------------------------------------------------------------------
# Stage bookkeeping
# ---------------------------------------------------------------------------------------------
def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_done(directory: pathlib.Path, fp: str) -> bool:
    done = directory / "done.json"
    return done.exists() and json.loads(done.read_text()).get("fingerprint") == fp


def mark_done(directory: pathlib.Path, fp: str, **info) -> None:
    """Atomically record a finished stage (process 0 writes; every process waits for it)."""
    if distributed.is_main_process():
        tmp = directory / "done.json.tmp"
        tmp.write_text(json.dumps({"fingerprint": fp, **info}, indent=1, default=str))
        os.replace(tmp, directory / "done.json")
    distributed.barrier(f"done:{directory}")


def _np(tree):
    return jax.tree.map(np.asarray, tree)


@dataclasses.dataclass
class GroupResult:
    """Stacked outputs of one members run (numpy, leading member axis)."""
    best_params: Any
    final_params: Any
    best_score: np.ndarray
    nonfinite: np.ndarray
    info: list[dict]

    def save(self, directory: pathlib.Path, fp: str) -> None:
        checkpoint.save_pytree(directory / "result", {
            "best_params": self.best_params, "final_params": self.final_params,
            "best_score": self.best_score, "nonfinite": self.nonfinite}, force=True)
        mark_done(directory, fp, info=self.info)

    @classmethod
    def load(cls, directory: pathlib.Path) -> "GroupResult":
        tree = checkpoint.restore_pytree(directory / "result")
        info = json.loads((directory / "done.json").read_text())["info"]
        return cls(_np(tree["best_params"]), _np(tree["final_params"]),
                   np.asarray(tree["best_score"]), np.asarray(tree["nonfinite"]), info)

    def subset(self, idx: Sequence[int]) -> "GroupResult":
        take = lambda t: jax.tree.map(lambda x: x[np.asarray(idx, np.int64)], t)
        return GroupResult(take(self.best_params), take(self.final_params), self.best_score[idx],
                           self.nonfinite[idx], [self.info[i] for i in idx])

    @property
    def ok(self) -> list[int]:
        """Members to use downstream: flagged (non-finite) members are excluded."""
        return [i for i in range(len(self.best_score)) if not self.nonfinite[i]]


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
class Pipeline:
    """All stages for one config and workdir. `run()` returns the result rows."""

    def __init__(self, config, workdir: str | os.PathLike):
        self.c = config
        self.workdir = pathlib.Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cache_dir = config.cache_dir or None
        self.trained_members = 0  # member runs actually trained by this process (0 on full resume)

    # -- datasets and foundation ---------------------------------------------------------
    def dataset(self, entry) -> DomainDataset:
        """A DomainBed/demo/TFDS dataset; demo datasets are built into the cache on first use."""
        from rat_jax.data import demo
        if entry.root:
            return load_domainbed(entry.name, entry.root)
        if entry.name in demo.DEMO_DATASETS:
            return demo.load_demo(entry.name, self.cache_dir, usps=True)
        if not self.c.data_root and not os.path.isabs(entry.name):
            raise ValueError(f"dataset {entry.name!r} needs a data folder: pass "
                             f"--config.data_root=DIR (DIR holding DomainBed's dataset folders) or "
                             f"set $DOMAINBED_DATA")
        return load_domainbed(entry.name, self.c.data_root or None)

    def foundation(self) -> tuple[dict, dict, str]:
        """(featurizer params, batch_stats, hash) of the foundation model (stage 1)."""
        from rat_jax import foundation as foundation_lib
        return foundation_lib.load_foundation(self.c.foundation, self.c.arch,
                                              self.workdir / FOUNDATION, self.c.image_size)

    # -- one members run ------------------------------------------------------------------
    def train_group(self, directory: pathlib.Path, fp: str, dataset: DomainDataset,
                    test_envs: Sequence[int], trial: int, inits: list, batch_stats, hp: list[dict],
                    steps: int, checkpoint_freq: int, stage: str,
                    classifier_only: bool = False) -> GroupResult:
        """Train len(inits) members together on `dataset` minus `test_envs` (or load if done)."""
        directory.mkdir(parents=True, exist_ok=True)
        if stage_done(directory, fp):
            return GroupResult.load(directory)
        c = self.c
        train_envs = [i for i in range(dataset.num_envs) if i not in set(test_envs)]
        m = len(inits)
        hparams = members_lib.make_hparams(
            m, lr=[h["lr"] for h in hp], weight_decay=[h["weight_decay"] for h in hp],
            dropout=[h["resnet_dropout"] for h in hp], lp_steps=[h["lp_steps"] for h in hp],
            seed=[h["seed"] for h in hp])
        model = create_model(c.arch, dataset.num_classes, conv_impl=c.conv_impl,
                             dtype=c.engine.get("compute_dtype", "float32"))
        loader = MemberLoader(dataset, train_envs, [h["seed"] for h in hp], trial_seeds=trial,
                              batch_size=c.batch_size, image_size=c.image_size, augment=True,
                              holdout_fraction=c.holdout_fraction, **self._cache_kw())
        eval_sets = self.eval_sets(dataset, test_envs, trial)
        val_names = id_val_names(dataset.num_envs, test_envs)
        val_names = [n for n in val_names if n in eval_sets]
        n_train = sum(len(dataset.samples[e]) for e in train_envs) * (1 - c.holdout_fraction)
        with loader:
            result = train_members(
                model, inits, batch_stats, hparams, loader, num_steps=steps,
                checkpoint_freq=checkpoint_freq, batch_size=c.batch_size * len(train_envs),
                strategy=None if c.engine.strategy == "auto" else c.engine.strategy,
                classifier_only=classifier_only, remat=c.engine.remat,
                data_parallel=_data_parallel(c.engine.get("data_parallel", "auto")),
                eval_sets=eval_sets, val_names=val_names, workdir=directory,
                save_every=c.save_every, steps_per_epoch=n_train / (c.batch_size * len(train_envs)),
                member_info=[{"hparams": {k: v for k, v in h.items() if k not in ("init", "group")},
                              "init": h.get("init"), "group": h.get("group")} for h in hp],
                stage=stage, quiet=c.quiet)
        self.trained_members += m
        out = GroupResult(_np(result.best_params), _np(result.final_params), result.best_score,
                          result.nonfinite, [dict(h) for h in hp])
        out.save(directory, fp)
        return out

    def _cache_kw(self) -> dict:
        return {"cache_dir": self.cache_dir} if self.cache_dir else {}

    def eval_sets(self, dataset: DomainDataset, test_envs: Sequence[int], trial: int) -> dict:
        """Train envs' out splits (augmented if the config reproduces the reference) for the
        ID-val score; with `eval_all_splits`, also every env's in/out split for the records."""
        c = self.c
        sets = {}
        for env in range(dataset.num_envs):
            is_test = env in set(test_envs)
            for split in ("in", "out"):
                if not c.get("eval_all_splits", True) and (is_test or split == "in"):
                    continue
                augment = bool(c.validation_augment) and not is_test
                sets[f"env{env}_{split}"] = self._eval_source(dataset, env, split, trial, augment)
        return sets

    def _eval_source(self, dataset, env, split, trial, augment):
        c = self.c
        limit = c.get("max_eval_images", 0)

        def batches():
            seen = 0
            for b in iterate_eval(dataset, trial_seed=trial, envs=[env], splits=[split],
                                  batch_size=c.eval_batch_size, image_size=c.image_size,
                                  augment=augment, holdout_fraction=c.holdout_fraction,
                                  pad=False, **self._cache_kw()):
                if limit and seen >= limit:
                    return
                yield b
                seen += len(b["labels"])
        return batches

    # -- stages ---------------------------------------------------------------------------
    def linear_probe(self, name: str, dataset: DomainDataset, test_envs: Sequence[int],
                     featurizer, batch_stats, steps: int, freq: int, fhash: str) -> dict:
        """Stage A/C: classifier-only training of a torch-initialised head on frozen features
        (default hparams, seed 0, trial 0); returns the best-val network (MR's network_best)."""
        hp = dict(default_hparams(), seed=0, lp_steps=-1, init=FOUNDATION)
        hp["lr"] = hp["lr"] * self.c.lr_scale
        model = create_model(self.c.arch, dataset.num_classes)
        head = _torch_head(model, dataset.num_classes, featurizer)
        fp = fingerprint("lp", dataset.identity, list(test_envs), steps, fhash, self._train_fp())
        res = self.train_group(self.workdir / "lp" / name, fp, dataset, test_envs, 0,
                               [{"featurizer": featurizer, "classifier": head}], batch_stats, [hp],
                               steps, freq, f"LP {name}", classifier_only=True)
        return soups.take_member(res.best_params, 0)

    def aux_pool(self, featurizer, batch_stats, fhash: str, target: DomainDataset) -> dict:
        """Stage A+B for every auxiliary dataset: {aux name: [featurizer_last of run r]}."""
        c = self.c
        pool_dir = pathlib.Path(c.get("aux_pool_dir") or self.workdir / "aux")
        pool = {}
        for name in sorted(c.aux.keys()):
            entry = c.aux[name]
            ds = self.dataset(entry)
            _leakage_guard(name, ds, target)
            lp_steps = c.lp_probe_steps if c.lp_probe_steps > 0 else entry.steps
            lp = self.linear_probe(f"{name}_notest", ds, [], featurizer, batch_stats, lp_steps,
                                   entry.checkpoint_freq, fhash)
            hps = []
            for h in range(c.n_aux_hparams):
                hp = self._hparams(h, 0, ds.name, -1)
                hp.update(lp_steps=-1, init=f"lp:{name}")
                hps.append(hp)
            fp = fingerprint("aux", ds.identity, hps, entry.steps, fhash, self._train_fp())
            res = self.train_group(pool_dir / f"{name}_notest", fp, ds, [], 0,
                                   [lp] * c.n_aux_hparams, batch_stats, hps, entry.steps,
                                   entry.checkpoint_freq, f"aux {name}")
            manifest = [{"dataset": name, "identity": ds.identity, "run": r, "hparams": hps[r],
                         "foundation": fhash, "nonfinite": bool(res.nonfinite[r])}
                        for r in range(c.n_aux_hparams)]
            _write_json(pool_dir / f"{name}_notest" / "manifest.json", manifest)
            _leakage_guard_manifest(manifest, target)
            pool[name] = {"featurizers": [soups.take_member(res.final_params, r)["featurizer"]
                                          for r in range(c.n_aux_hparams)],
                          "fingerprint": fp, "manifest": manifest}
        return pool

    def target_groups(self, target, k: int, trial: int, w_lp: dict, featurizer, batch_stats,
                      pool: dict, fhash: str) -> dict:
        """Stage D with the no-aux and fusing baselines for one (test env, trial), trained as ONE
        members run (one compiled step; per-member inits, hparams and LP schedules):
          noaux   foundation init, whole net from step 0 (vanilla fine-tuning / soups). They are also
                  Ratatouille's h % (A+1) == 0 members: same seed, hparams and init (§1.4.5);
          aux     aux-init members: 201 classifier-only updates, Adam reset, then the whole net;
          fusing  Σλ_j φ_j inits (§1.5) with the same LP phase.
        Returns {group: GroupResult}."""
        c = self.c
        names = sorted(pool)
        n_runs = c.n_aux_hparams
        head = w_lp["classifier"]
        hps, inits, tags = [], [], []
        for h in range(c.n_hparams):
            hps.append(dict(self._hparams(h, trial, target.name, k), lp_steps=-1, init=FOUNDATION,
                            h=h))
            inits.append({"featurizer": featurizer, "classifier": head})
            tags.append("noaux")
        for h in range(c.n_hparams):
            i = h % (len(names) + 1)
            if i == 0:
                continue
            aux_name, run = names[i - 1], h % n_runs
            hps.append(dict(self._hparams(h, trial, target.name, k), lp_steps=c.lp_steps,
                            init=f"aux:{aux_name}/run{run}", h=h))
            inits.append({"featurizer": pool[aux_name]["featurizers"][run], "classifier": head})
            tags.append("aux")
        if c.run_fusing and names:
            for h in range(c.n_hparams):
                hp = dict(self._hparams(h, trial, target.name, k), lp_steps=c.lp_steps, h=h)
                candidates = [featurizer] + [pool[n]["featurizers"][h % n_runs] for n in names]
                lam = soups.fusing_coefficients(hp["seed"], c.fusing_range, len(candidates))
                hp["init"] = "fusing:" + ",".join(f"{x:.3f}" for x in lam)
                hps.append(hp)
                inits.append({"featurizer": _np(soups.fuse(candidates, lam)), "classifier": head})
                tags.append("fusing")
        for hp, tag in zip(hps, tags):
            hp["group"] = tag
        pool_fp = [pool[n]["fingerprint"] for n in names]
        fp = fingerprint("target", target.identity, k, trial, hps, fhash, pool_fp, self._train_fp())
        res = self.train_group(self.workdir / "target" / f"{target.name}_test{k}_trial{trial}", fp,
                               target, [k], trial, inits, batch_stats, hps, c.target.steps,
                               c.target.checkpoint_freq, f"target env{k} trial{trial}")
        return {tag: res.subset([i for i, t in enumerate(tags) if t == tag])
                for tag in dict.fromkeys(tags)}

    def _hparams(self, h: int, trial: int, dataset_name: str, test_env: int) -> dict:
        hp = random_hparams(h, trial)
        hp["lr"] = hp["lr"] * self.c.lr_scale
        hp["seed"] = run_seed(dataset_name, test_env, h, trial)
        return {k: hp[k] for k in ("lr", "weight_decay", "resnet_dropout", "seed")}

    def _train_fp(self) -> list:
        c = self.c
        return [c.arch, c.image_size, c.batch_size, c.holdout_fraction, bool(c.validation_augment),
                c.get("max_eval_images", 0), c.lr_scale]

    # -- everything -----------------------------------------------------------------------
    def run(self) -> list[dict]:
        from rat_jax import selection
        c = self.c
        featurizer, batch_stats, fhash = self.foundation()
        target = self.dataset(c.target)
        test_envs = list(c.target.test_envs) or list(range(target.num_envs))
        for k in test_envs:
            if not 0 <= k < target.num_envs:
                raise ValueError(f"config.target.test_envs has {k}, but {target.name} has envs "
                                 f"0..{target.num_envs - 1} ({target.envs})")
        pool = self.aux_pool(featurizer, batch_stats, fhash, target) if len(c.aux) else {}
        rows = []
        per_env = {}
        for k in test_envs:
            lp_steps = c.lp_probe_steps if c.lp_probe_steps > 0 else c.target.steps
            w_lp = self.linear_probe(f"{target.name}_test{k}", target, [k], featurizer,
                                     batch_stats, lp_steps, c.target.checkpoint_freq, fhash)
            per_env[k] = {t: self.target_groups(target, k, t, w_lp, featurizer, batch_stats, pool,
                                                fhash) for t in c.trials}
            rows += selection.select_and_evaluate(self, target, k, per_env[k], batch_stats,
                                                  n_aux=len(pool))
        notes = selection.notes(c, target, self.trained_members, rows)
        md = report.table(rows) + "\n\n" + notes + "\n"
        if distributed.is_main_process():  # one writer and one printed table per run
            md = report.write(self.workdir, rows, notes)
            print(md, flush=True)
        return rows


def _torch_head(model, num_classes: int, featurizer) -> dict:
    """A fresh nn.Linear-style head (torch default init, seed 0) for the foundation's features."""
    from rat_jax.models.layers import torch_linear_init
    del featurizer
    n = model.num_features
    init = torch_linear_init(n)
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"kernel": np.asarray(init(k1, (n, num_classes))),
            "bias": np.asarray(init(k2, (num_classes,)))}


def _leakage_guard(aux_name: str, aux: DomainDataset, target: DomainDataset) -> None:
    if aux.identity == target.identity or aux.root == target.root:
        raise ValueError(
            f"auxiliary dataset {aux_name!r} is the target dataset {target.name!r} "
            f"(identity {aux.identity}): an auxiliary task must not see the target. Remove it "
            f"from config.aux.")


def _leakage_guard_manifest(manifest: list[dict], target: DomainDataset) -> None:
    for entry in manifest:
        if entry.get("identity") == target.identity:
            raise ValueError(
                f"auxiliary checkpoint {entry['dataset']} run {entry['run']} was trained on "
                f"{entry['identity']}, which is the target dataset: refusing to use it as an "
                "initialization (leakage). Remove that run from the auxiliary pool.")


def _write_json(path: pathlib.Path, obj) -> None:
    """Atomic JSON write by process 0 (the others wait for it)."""
    if distributed.is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(obj, indent=1, default=str))
        os.replace(tmp, path)
    distributed.barrier(f"json:{path}")


def _data_parallel(value) -> bool | None:
    """config.engine.data_parallel: "auto" (by backend) / "on" / "off" (booleans accepted too)."""
    if isinstance(value, bool):
        return value
    table = {"auto": None, "on": True, "off": False, "true": True, "false": False}
    if str(value).lower() not in table:
        raise ValueError(f"config.engine.data_parallel={value!r}: use 'auto', 'on' or 'off'")
    return table[str(value).lower()]
