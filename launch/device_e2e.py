"""The last row of launch/device_check.py: a target-only protocol run through the library's own
path (rat_jax.pipeline.Pipeline with a config from configs/common.py): foundation, linear probe,
one members run of `members` target members (`steps` steps, evaluation every `eval_every`),
selection and soups; no auxiliary tasks. Random initialization (no foundation weights travel):
its accuracies mean nothing, its time per member-step is the measurement.

Its workdir, decoded-image cache and console log stay under `root` (outside the session's output
folder); the row holds the time per member-step, read from the members run's records
(`step_time`: the mean time of the steps after the last-but-one evaluation, all members together).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import pathlib
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class E2E:
    data: str                # DomainBed-layout folder: the target (env 0 is its test env)
    root: str                # workdir, cache and log go here
    arch: str = "resnet50"
    image: int = 224
    batch: int = 32          # per training domain (the reference's)
    members: int = 7
    steps: int = 150
    eval_every: int = 50
    probe_steps: int = 20
    dtype: str = "bfloat16"
    conv_impl: str = "auto"


def _common():
    spec = importlib.util.spec_from_file_location("rat_jax_configs_common",
                                                  REPO / "configs" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config(e: E2E):
    """The reference config (configs/common.py base) reduced to one target-only run."""
    common = _common()
    c = common.base()
    c.arch, c.foundation, c.conv_impl = e.arch, "random", e.conv_impl
    c.image_size, c.batch_size, c.eval_batch_size = e.image, e.batch, 256
    c.engine.compute_dtype = e.dtype
    c.n_hparams, c.trials, c.run_fusing, c.make_plots, c.quiet = e.members, (0,), False, False, True
    c.lp_probe_steps = e.probe_steps
    c.cache_dir = str(pathlib.Path(e.root) / "cache")
    c.target = common.dataset(e.data, test_envs=(0,), steps=e.steps,
                              checkpoint_freq=e.eval_every)
    return c


def _records(workdir: pathlib.Path) -> list[dict]:
    out = []
    for path in sorted((workdir / "target").rglob("results.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def e2e_row(e: E2E) -> dict:
    """Run it; the row: seconds per member-step (and per step), images/s, the total wall time."""
    from rat_jax.pipeline import Pipeline
    root = pathlib.Path(e.root)
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "e2e.log"
    logger = logging.getLogger("rat_jax")
    level = logger.level
    t0 = time.perf_counter()
    with open(log_path, "w") as log, contextlib.redirect_stdout(log):
        handler = logging.StreamHandler(log)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        try:
            Pipeline(config(e), root / "workdir").run()
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = True
    wall = time.perf_counter() - t0
    recs = _records(root / "workdir")
    if not recs:
        raise RuntimeError(f"no target records under {root / 'workdir'} (log: {log_path})")
    last = max(recs, key=lambda r: r["step"])
    step_s = float(last["step_time"])
    per_member = step_s / e.members
    train_envs = sum(p.is_dir() for p in pathlib.Path(e.data).iterdir()) - 1  # env 0 held out
    images = e.members * e.batch * train_envs / step_s
    return dict(seconds_per_member_step=per_member, step_s=step_s, wall_s=wall,
                images_per_s=images, members=e.members, steps=e.steps, arch=e.arch,
                image=e.image, dtype=e.dtype, log=str(log_path),
                value=f"{per_member * 1e3:.1f} ms per member-step",
                detail=f"{e.arch} {e.image}px {e.dtype}, {e.members} members x {e.steps} steps, "
                       f"{images:.0f} img/s in training, whole run {wall:.0f} s "
                       "(random init: timing only)")
