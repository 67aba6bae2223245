"""Evaluation through the member engine (MemberEngine.logits, evaluation.StackEvaluator/EvalSplit):
the same logits as the one-device reference path on 8 emulated CPU devices, whatever the mesh and
local strategy; two processes on 127.0.0.1 each decode only their share of an evaluation split
and both get the full logits.

The two-process test starts this file as a script (`python tests/test_eval_engine.py worker ...`)
with 4 emulated CPU devices per process, as tests/test_distributed.py does.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_helpers  # noqa: E402  (no JAX at import: this file also runs as a script)

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE, CLASSES = 16, 5


def random_variables(seed, arch="resnet_tiny", num_classes=CLASSES):
    return model_helpers.random_variables(seed, arch, num_classes)


def make_folder(root: pathlib.Path, sizes=((7, 6), (5, 8))) -> pathlib.Path:
    """envs e0, e1 x classes a, b of small random RGB PNGs (n images per class)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for e, counts in enumerate(sizes):
        for c, n in zip(("a", "b"), counts):
            os.makedirs(root / f"e{e}" / c, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                    root / f"e{e}" / c / f"{i}.png")
    return root


# ----------------------------------------------------------------------------------------------
# The worker (a subprocess: nothing touches a device before distributed.initialize)
# ----------------------------------------------------------------------------------------------
def _worker(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["worker"])
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    from rat_jax import distributed, trees
    distributed.initialize()
    from rat_jax.data import load_folder
    from rat_jax.evaluation import SplitSpec, StackEvaluator, eval_split
    from rat_jax.models import create_model
    ds = load_folder(args.root)
    split = eval_split(ds, SplitSpec(envs=[0, 1], split="all", image_size=SIZE), cache_dir=None)
    read = []
    decode = split.store.eval_array

    def counted(env, idx, size):  # every image this process's store decodes
        read.append((int(env), int(idx)))
        return decode(env, idx, size)
    split.store.eval_array = counted
    vs = [random_variables(i) for i in range(2)]
    stacked = trees.stack([v["params"] for v in vs])
    ev = StackEvaluator(create_model("resnet_tiny", CLASSES), vs[0]["batch_stats"], 4)
    logits = ev.logits(stacked, split)
    mesh = ev.engine(2).mesh
    rows = {(int(e), int(i)): r for r, (e, i) in enumerate(zip(split.envs, split.index))}
    pid = jax.process_index()
    np.save(f"{args.out}.{pid}.npy", logits)
    pathlib.Path(f"{args.out}.{pid}.json").write_text(json.dumps(
        {"rows": sorted(rows[k] for k in read), "n": len(split),
         "mesh": list(mesh.devices.shape),
         "mesh_processes": [[d.process_index for d in r] for r in mesh.devices]}))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------
import jax  # noqa: E402  (conftest already gave this process 8 CPU devices)
import pytest  # noqa: E402

from rat_jax import evaluation as E, trees  # noqa: E402
from rat_jax.engine.members import plan_eval_mesh  # noqa: E402
from rat_jax.models import create_model  # noqa: E402


@pytest.fixture(scope="module")
def members():
    vs = [random_variables(i) for i in range(8)]
    return (create_model("resnet_tiny", CLASSES), trees.stack([v["params"] for v in vs]),
            vs[0]["batch_stats"])


def _reference(model, stacked, batch_stats, x, batch_size):
    """One member at a time on one device (evaluation.predict_logits)."""
    return np.stack([E.predict_logits(model, {"params": trees.take(stacked, i),
                                              "batch_stats": batch_stats}, x, batch_size)
                     for i in range(trees.num_members(stacked))])


def test_eval_mesh_layouts():
    assert jax.device_count() == 8
    assert plan_eval_mesh(8, data_parallel=False).devices.shape == (8, 1)
    assert plan_eval_mesh(3, data_parallel=False).devices.shape == (3, 1)
    assert plan_eval_mesh(11, data_parallel=False).devices.shape == (1, 1)
    assert plan_eval_mesh(3, data_parallel=True).devices.shape == (1, 8)
    assert plan_eval_mesh(2, data_parallel=True).devices.shape == (2, 4)
    assert plan_eval_mesh(16, data_parallel=True).devices.shape == (8, 1)


@pytest.mark.parametrize("strategy,data_parallel,m", [
    ("loop", False, 8),    # one member per device, the demo's and the benchmark's layout
    ("loop", False, 16),   # two per device: the parts machinery
    ("vmap", True, 2),     # 'data' splits the images over 4 devices per member
    ("map", True, 3),      # members looped on every device, images over 8
])
def test_engine_logits_match_one_by_one(members, strategy, data_parallel, m):
    model, stacked, bs = members
    stacked = trees.select(stacked, [i % 8 for i in range(m)])
    x = np.random.default_rng(1).integers(0, 256, (70, SIZE, SIZE, 3), dtype=np.uint8)
    ref = _reference(model, trees.select(stacked, range(min(m, 8))), bs, x, 32)
    ref = ref[[i % 8 for i in range(m)]]
    ev = E.StackEvaluator(model, bs, 32, strategy=strategy, data_parallel=data_parallel)
    got = ev.logits(stacked, x)
    assert got.shape == (m, 70, CLASSES) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
    if not data_parallel:  # per-device batches of the reference's shape: the same bits
        np.testing.assert_array_equal(got, ref)
    assert ev.logits(stacked, x[:0]).shape == (m, 0, CLASSES)


def test_eval_split_rows_and_logits(members, tmp_path):
    model, stacked, bs = members
    ds = E.load_dataset(str(make_folder(tmp_path / "folder")))
    cache = str(tmp_path / "cache")
    spec = E.SplitSpec(trial_seed=1, envs=[1, 0], split="in", image_size=SIZE)
    x, y = E.load_split(ds, spec, cache_dir=cache)
    split = E.eval_split(ds, spec, cache_dir=cache)
    np.testing.assert_array_equal(split.labels, y)
    np.testing.assert_array_equal(split.images(), x)
    sub = E.eval_split(ds, spec.replace(max_images=5), cache_dir=cache)
    keep = np.sort(np.random.RandomState(0).choice(len(y), 5, replace=False))
    np.testing.assert_array_equal(sub.images(), x[keep])
    ev = E.StackEvaluator(model, bs, 8, data_parallel=False)
    np.testing.assert_array_equal(ev.logits(stacked, split), ev.logits(stacked, x))
    np.testing.assert_array_equal(ev.logits(stacked, split), _reference(model, stacked, bs, x, 8))


def test_two_processes_decode_only_their_rows(members, tmp_path):
    """2 processes x 4 CPU devices, 2 members: 'model' within a process, 'data' over both, so
    each process decodes only its rows of the split; both get the one-device logits."""
    from test_distributed import _cluster, _env, _finish, free_port
    model, stacked, bs = members
    root = make_folder(tmp_path / "folder")
    out = tmp_path / "logits"
    port = free_port()
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, __file__, "worker", "--root", root, "--out", out],
                              cwd=REPO, env=_env(**env), stdout=open(log, "w"),
                              stderr=subprocess.STDOUT)
             for log, env in zip(logs, _cluster(2, port))]
    _finish(procs, logs, timeout=300)
    ds = E.load_dataset(str(root))
    x, _ = E.load_split(ds, E.SplitSpec(envs=[0, 1], split="all", image_size=SIZE),
                        cache_dir=None)
    ref = _reference(model, trees.select(stacked, [0, 1]), bs, x, 4)
    info = [json.loads(pathlib.Path(f"{out}.{p}.json").read_text()) for p in range(2)]
    n = info[0]["n"]
    assert n == len(x) == 26
    assert info[0]["mesh"] == [2, 4]
    assert [sorted(set(r)) for r in info[0]["mesh_processes"]] == [[0, 1], [0, 1]]
    rows = [r["rows"] for r in info]
    assert len(rows[0]) == len(set(rows[0])) and len(rows[1]) == len(set(rows[1]))
    assert not set(rows[0]) & set(rows[1])                  # no image decoded twice
    assert sorted(rows[0] + rows[1]) == list(range(n))      # and every one once
    assert 0 < len(rows[0]) < n and 0 < len(rows[1]) < n
    for p in range(2):
        got = np.load(f"{out}.{p}.npy")
        assert got.shape == (2, n, CLASSES)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
