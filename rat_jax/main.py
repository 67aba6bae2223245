"""python -m rat_jax.main --config=configs/NAME.py[:VARIANT] --workdir=DIR [--config.x=y ...] [--plan]

Runs every stage of the Ratatouille protocol for the configured target and prints the table; a
sweep config (configs/paper.py: `sweep.targets` and `datasets`) runs every target in turn through
the same stages, sharing the auxiliary pools, and prints the combined table (rat_jax/sweep.py).
`--plan` prints what the config would train (per stage and dataset: member runs, member-steps,
images) with an estimated time and a memory check, and trains nothing.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where every stage writes (resumable).")
flags.DEFINE_bool("plan", False, "Print the runs, their sizes, an estimated time and the memory "
                  "check, then stop without training.")
flags.DEFINE_float("plan_rate", 0.0, "With --plan: training images/s per device to estimate "
                   "with, instead of timing the member step on this machine.")
flags.DEFINE_integer("plan_devices", 0, "With --plan: the number of devices to estimate for "
                     "(default: this machine's).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = flags.FLAGS.config
    from rat_jax import runtime
    runtime.setup(config)  # before any JAX device use: CPU device emulation, distributed init
    logging.getLogger("rat_jax").setLevel(logging.INFO)
    from rat_jax import runs, sweep
    if flags.FLAGS.plan:
        sweep.plan(config, flags.FLAGS.workdir, rate=flags.FLAGS.plan_rate,
                   devices=flags.FLAGS.plan_devices)
    elif runs.is_sweep(config):
        sweep.run_sweep(config, flags.FLAGS.workdir)
    else:
        from rat_jax.pipeline import train_and_evaluate
        train_and_evaluate(config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from rat_jax import runtime
    runtime.reexec_with_malloc_tunables()  # glibc settings for XLA:CPU's per-step temporaries
    runtime.config_flag_on_path(sys.argv)  # `from configs import common` from any directory
    app.run(main)
