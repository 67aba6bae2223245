"""python -m rat_jax.main --config=configs/NAME.py[:VARIANT] --workdir=DIR [--config.x=y ...]

Runs every stage of the Ratatouille protocol for the configured target and prints the table.
"""
from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where every stage writes (resumable).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = flags.FLAGS.config
    from rat_jax import runtime
    runtime.setup(config)  # before any JAX device use: CPU device emulation, distributed init
    logging.getLogger("rat_jax").setLevel(logging.INFO)
    from rat_jax.pipeline import train_and_evaluate
    train_and_evaluate(config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from rat_jax import runtime
    runtime.reexec_with_malloc_tunables()  # glibc settings for XLA:CPU's per-step temporaries
    app.run(main)
