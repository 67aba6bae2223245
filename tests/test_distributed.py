"""rat_jax.distributed: launch detection (pure), helpers, and real multi-process runs on CPU.

The multi-process tests start this file as a script (`python tests/test_distributed.py train ...`):
two processes on 127.0.0.1 with 4 emulated CPU devices each (Gloo collectives) train resnet_tiny
members over the global mesh and must end with the params of one process with 8 devices; a killed
process must take the other down within a bounded time instead of hanging.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
M, N, IMAGE, STEPS, CLASSES = 8, 4, 16, 3, 5  # "members" layout: one member per device


# ----------------------------------------------------------------------------------------------
# The worker (runs in a subprocess; imports nothing that touches a device before initialize)
# ----------------------------------------------------------------------------------------------
def _numpy_variables(model, seed: int):
    """Deterministic random variables without compiling model.init (shapes via eval_shape)."""
    import jax
    import jax.numpy as jnp
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3)))
    rng = np.random.RandomState(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']") or name.endswith("['var']"):
            return (1.0 + 0.1 * np.abs(rng.randn(*s.shape))).astype(np.float32)
        fan_in = int(np.prod(s.shape[:-1])) or 1
        return (rng.randn(*s.shape) / np.sqrt(fan_in)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(fill, shapes)


def _worker(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["train", "loop", "wait", "setup"])
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--layout", choices=["members", "data"], default="members")
    ap.add_argument("--out", default="")
    ap.add_argument("--workdir", default="")
    ap.add_argument("--ready", default="")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import jax
    if args.mode == "setup":  # as rat_jax.main does it (launch/local.sh)
        from rat_jax import runtime
        runtime.setup(None)
        return _hello()
    jax.config.update("jax_num_cpu_devices", args.devices)
    from rat_jax import distributed
    distributed.initialize()
    if args.mode == "wait":
        return _wait(args, distributed)
    if args.mode == "loop":
        return _loop(args, distributed)
    return _train(args, distributed)


def _wait(args, distributed):
    """Keep doing small cross-process collectives until killed (or 120 s)."""
    import jax
    from jax.sharding import Mesh, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()), ("x",))
    total = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, "x"), mesh=mesh, in_specs=P("x"),
                                  out_specs=P()))
    x = distributed.global_batch(np.ones((jax.local_device_count(),), np.float32), mesh, P("x"))
    assert float(np.asarray(total(x))[0]) == jax.device_count()
    pathlib.Path(f"{args.ready}.{jax.process_index()}").write_text("ready")
    t0 = time.time()
    while time.time() - t0 < 120:
        np.asarray(total(x))
        time.sleep(0.1)
    print("SURVIVED: no error although the peer is gone", flush=True)
    return 0


def _hello():
    """One cross-process sum, then a line from every process."""
    import jax
    from jax.sharding import Mesh, PartitionSpec as P
    from rat_jax import distributed
    mesh = Mesh(np.array(jax.devices()), ("x",))
    total = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, "x"), mesh=mesh, in_specs=P("x"),
                                  out_specs=P()))
    x = distributed.global_batch(np.ones((jax.local_device_count(),), np.float32), mesh, P("x"))
    print(f"hello from process {jax.process_index()} of {jax.process_count()}: "
          f"{jax.local_device_count()} local devices, psum {float(np.asarray(total(x))[0]):.0f}")
    distributed.print0(f"main process: {jax.device_count()} devices in all")
    return 0


def _interleaved(devices):
    """Devices ordered so that consecutive ones belong to different processes (p0d0, p1d0, ...);
    with 8 devices of one process, the same order by id ([0, 4, 1, 5, ...])."""
    import jax
    procs = jax.process_count()
    if procs > 1:
        key = lambda d: ([x.id for x in devices if x.process_index == d.process_index].index(d.id),
                         d.process_index)
        return sorted(devices, key=key)
    half = len(devices) // 2
    return [devices[i // 2 + (i % 2) * half] for i in range(len(devices))]


def _train(args, distributed):
    t0 = time.time()
    mark = lambda what: distributed.print0(f"[{time.time() - t0:6.1f} s] {what}", flush=True)
    import jax
    from rat_jax.models import create_model
    from rat_jax import trees
    from rat_jax.engine import members as members_lib
    from rat_jax.engine.resume import RunCheckpoints

    m = M if args.layout == "members" else 2
    model = create_model("resnet_tiny", CLASSES, conv_impl="xla")  # the quickest to compile
    variables = [_numpy_variables(model, 100 + i) for i in range(m)]
    params = trees.stack([v["params"] for v in variables])
    batch_stats = variables[0]["batch_stats"]
    rng = np.random.RandomState(0)
    batches = [{"images": rng.randn(m, N, IMAGE, IMAGE, 3).astype(np.float32),
                "labels": rng.randint(0, CLASSES, (m, N)).astype(np.int32)} for _ in range(STEPS)]
    eval_images = rng.randn(6, IMAGE, IMAGE, 3).astype(np.float32)
    eval_labels = rng.randint(0, CLASSES, 6).astype(np.int32)
    hparams = members_lib.make_hparams(m, lr=np.linspace(1e-3, 3e-2, m), dropout=0.1,
                                       weight_decay=1e-4, seed=list(range(m)))
    devices = jax.devices() if args.layout == "members" else _interleaved(jax.devices())
    # data_parallel explicitly: one CPU process does not split batches by default, and the
    # single-process reference must run the same mesh as the two processes
    engine = members_lib.MemberEngine(model, batch_stats, m, members_lib.EngineConfig(
        batch_size=N, devices=devices, data_parallel=True))
    assert engine.mesh.devices.size == jax.device_count() == 8

    state = engine.place(members_lib.init_state(params))
    hp = engine.place(hparams)
    mark("placed")
    losses = []
    for batch in batches:  # each process hands over only its members' (its rows') data
        local = distributed.local_part(batch, engine.mesh, engine.batch_spec)
        if jax.process_count() > 1 and args.layout == "members":
            assert local["images"].shape[0] == m // jax.process_count()
        state, metrics = engine.train_step(
            state, hp, distributed.global_batch(local, engine.mesh, engine.batch_spec))
        losses.append(distributed.to_host(metrics["loss"]))
        mark("step")
    correct = distributed.to_host(engine.evaluate_batch(state["members"]["params"], eval_images,
                                                        eval_labels))
    soup = jax.jit(lambda t: jax.tree.map(lambda x: x.mean(0), t),
                   out_shardings=engine.replicated)(state["members"]["params"])
    soup = jax.tree.map(np.asarray, soup)  # replicated: readable on every process
    final = distributed.to_host(state)
    mark("evaluated, averaged")

    if args.workdir:  # Orbax from every process; restore onto the same (global) shardings
        ckpts = RunCheckpoints(args.workdir)
        ckpts.save(STEPS - 1, state, {"step": STEPS - 1})
        ckpts.wait()
        restored, meta = ckpts.restore(ckpts.latest_step(), state)
        ckpts.close()
        assert meta["step"] == STEPS - 1
        same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), final,
                            distributed.to_host(restored))
        assert all(jax.tree.leaves(same)), "Orbax multi-process restore differs from the save"
    distributed.barrier("saved")
    mark("checkpointed")

    if distributed.is_main_process() and args.out:
        flat = {"params" + jax.tree_util.keystr(k): v for k, v in
                jax.tree_util.tree_leaves_with_path(final["members"]["params"])}
        flat.update({"soup" + jax.tree_util.keystr(k): v for k, v in
                     jax.tree_util.tree_leaves_with_path(soup)})
        np.savez(args.out, losses=np.stack(losses), correct=correct, **flat)
    distributed.print0(f"worker done: {jax.process_count()} process(es), "
                       f"mesh {dict(engine.mesh.shape)}")
    return 0


def _loop(args, distributed):
    """rat_jax.engine.loop.train_members as the pipeline calls it (host batches on every process),
    with evaluation, best-so-far selection, records and Orbax checkpoints in --workdir."""
    import jax
    from rat_jax.models import create_model
    from rat_jax.engine import loop as loop_lib
    from rat_jax.engine import members as members_lib

    model = create_model("resnet_tiny", CLASSES, conv_impl="xla")
    variables = [_numpy_variables(model, 100 + i) for i in range(M)]
    rng = np.random.RandomState(0)
    batches = [{"images": rng.randn(M, N, IMAGE, IMAGE, 3).astype(np.float32),
                "labels": rng.randint(0, CLASSES, (M, N)).astype(np.int32)} for _ in range(4)]
    eval_sets = {f"env{e}_{s}": [{"images": rng.randn(6, IMAGE, IMAGE, 3).astype(np.float32),
                                  "labels": rng.randint(0, CLASSES, 6).astype(np.int32)}]
                 for e in range(2) for s in ("in", "out")}
    hparams = members_lib.make_hparams(M, lr=np.linspace(1e-3, 3e-2, M), dropout=0.1,
                                       seed=list(range(M)))
    class OwnShard:  # the loader contract: load_only(members) -> the others' rows are not read
        local = None

        def load_only(self, members):
            self.local = [int(i) for i in members]

        def __iter__(self):
            for b in batches:
                if self.local is None:
                    yield b
                else:
                    keep = np.zeros((M,), bool)
                    keep[self.local] = True
                    yield {"images": np.where(keep[:, None, None, None, None], b["images"], np.nan),
                           "labels": np.where(keep[:, None], b["labels"], -1)}
    source = OwnShard()
    result = loop_lib.train_members(
        model, [v["params"] for v in variables], variables[0]["batch_stats"], hparams, source,
        loop_lib.LoopConfig(4, 2, eval_sets=eval_sets, val_names=["env0_out", "env1_out"]),
        loop_lib.RunOutput(workdir=args.workdir, quiet=True),
        members_lib.EngineConfig(batch_size=N))
    if jax.process_count() > 1:  # each process was told to load only its half of the members
        assert source.local is not None and len(source.local) == M // 2, source.local
    # every property is a to_host() of member-sharded arrays: a collective, so on every process
    final, best = result.final_params, result.best_params
    score, step = result.best_score, result.best_step
    if distributed.is_main_process():
        flat = {"final" + jax.tree_util.keystr(k): v
                for k, v in jax.tree_util.tree_leaves_with_path(final)}
        flat.update({"best" + jax.tree_util.keystr(k): v
                     for k, v in jax.tree_util.tree_leaves_with_path(best)})
        np.savez(args.out, best_score=score, best_step=step, **flat)
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------
import jax  # noqa: E402  (conftest already gave this process 8 CPU devices)
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from rat_jax import distributed  # noqa: E402
from rat_jax.engine import loop as loop_lib  # noqa: E402
from rat_jax.engine.members import EngineConfig  # noqa: E402
from rat_jax.engine import mesh as mesh_lib  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAT_JAX_", "SLURM_", "OMPI_", "JAX_COORDINATOR"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
               # every worker compiles resnet_tiny's step: halve XLA:CPU compile time
               XLA_FLAGS="--xla_backend_optimization_level=0 "
                         "--xla_llvm_disable_expensive_passes=true")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _start(args, log: pathlib.Path, **env):
    return subprocess.Popen([sys.executable, __file__, *map(str, args)], cwd=REPO,
                            env=_env(**env), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _cluster(n, port, **extra):
    return [dict(RAT_JAX_COORDINATOR=f"127.0.0.1:{port}", RAT_JAX_NUM_PROCESSES=n,
                 RAT_JAX_PROCESS_ID=i, **extra) for i in range(n)]


def _finish(procs, logs, timeout):
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("worker timed out:\n" + "\n".join(_tail(l) for l in logs))
    bad = [l for p, l in zip(procs, logs) if p.returncode != 0]
    assert not bad, "worker failed:\n" + "\n".join(_tail(l) for l in bad)


def _tail(log: pathlib.Path, n: int = 40) -> str:
    lines = [l for l in log.read_text(errors="replace").splitlines()
             if not l.startswith(("[Gloo]", "    @"))]
    return f"--- {log.name}\n" + "\n".join(lines[-n:])


# -- planning (pure) ---------------------------------------------------------------------------
SLURM = dict(SLURM_JOB_ID="42", SLURM_STEP_NODELIST="node[001-002]", SLURM_PROCID="5",
             SLURM_NODEID="1")


def test_single_process_is_a_no_op():
    assert distributed.plan(env={}) is None
    assert distributed.plan(env=dict(RAT_JAX_NUM_PROCESSES="1")) is None
    assert distributed.plan(env=dict(SLURM, SLURM_NTASKS="1", SLURM_LOCALID="0")) is None
    assert distributed.initialize() is None and distributed.is_main_process()
    assert not jax.distributed.is_initialized()


def test_explicit_from_env_and_config():
    env = dict(RAT_JAX_COORDINATOR="10.0.0.1:1234", RAT_JAX_NUM_PROCESSES="4",
               RAT_JAX_PROCESS_ID="2", RAT_JAX_HEARTBEAT_TIMEOUT="7")
    plan = distributed.plan(env=env)
    assert plan == dict(method="explicit", coordinator_address="10.0.0.1:1234", num_processes=4,
                        process_id=2, local_device_ids=None, initialization_timeout=300,
                        heartbeat_timeout_seconds=7, shutdown_timeout_seconds=300)
    import ml_collections
    config = ml_collections.ConfigDict(dict(distributed=dict(
        distributed.DEFAULTS, coordinator="h:1", num_processes=2, process_id=1,
        local_device_ids="0,1", initialization_timeout=30)))
    plan = distributed.plan(config, env=env)  # config fields win over the environment
    assert (plan["coordinator_address"], plan["num_processes"], plan["process_id"]) == ("h:1", 2, 1)
    assert plan["local_device_ids"] == [0, 1] and plan["initialization_timeout"] == 30
    assert plan["heartbeat_timeout_seconds"] == 7  # config at its default: the environment applies
    assert distributed.plan(env=dict(env, RAT_JAX_DISTRIBUTED="off")) is None
    with pytest.raises(ValueError, match="no coordinator"):
        distributed.plan(env=dict(RAT_JAX_NUM_PROCESSES="2", RAT_JAX_PROCESS_ID="0"))
    with pytest.raises(ValueError, match="must be in"):
        distributed.plan(env=dict(env, RAT_JAX_PROCESS_ID="4"))


@pytest.mark.parametrize("extra, ids", [
    (dict(SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_STEP_TASKS_PER_NODE="4(x2)",
          CUDA_VISIBLE_DEVICES="0,1,2,3"), [1]),                      # one process per GPU
    (dict(SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_STEP_TASKS_PER_NODE="1(x2)",
          CUDA_VISIBLE_DEVICES="0,1,2,3"), [0, 1, 2, 3]),             # one process per node
    (dict(SLURM_NTASKS="4", SLURM_LOCALID="1", SLURM_STEP_TASKS_PER_NODE="2(x2)",
          SLURM_GPUS_ON_NODE="4"), [2, 3]),                           # two GPUs per process
    (dict(SLURM_NTASKS="8", SLURM_LOCALID="3", SLURM_STEP_TASKS_PER_NODE="4(x2)",
          CUDA_VISIBLE_DEVICES="3"), [0]),                            # srun bound one GPU
    (dict(SLURM_NTASKS="8", SLURM_LOCALID="3", SLURM_STEP_TASKS_PER_NODE="4(x2)",
          RAT_JAX_LOCAL_DEVICE_IDS="5"), [5]),                        # explicit override
])
def test_slurm_local_device_ids(extra, ids):
    plan = distributed.plan(env={**SLURM, **extra})
    assert plan["method"] == "slurm" and "coordinator_address" not in plan  # jax finds it
    assert plan["local_device_ids"] == ids


@pytest.mark.parametrize("env, metadata, expect", [
    ({}, None, None),                                          # Colab / Kaggle: no metadata
    ({}, "10.0.0.2:8470", None),                               # a v4-8 VM: one worker
    ({}, "10.0.0.2:8470,10.0.0.3:8470", "tpu"),                # a v4-16 slice: two workers
    ({"TPU_WORKER_HOSTNAMES": "w-0"}, "a,b", None),            # GKE single host wins
    ({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}, None, "tpu"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.9"}, None, "tpu"),
])
def test_single_host_tpu_skips_distributed_initialization(monkeypatch, env, metadata, expect):
    monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: True)
    got = distributed.plan(env=env, tpu_metadata=lambda: metadata)
    assert (got or {}).get("method") == expect
    monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: False)  # no TPU: never
    assert distributed.plan(env=env, tpu_metadata=lambda: metadata) is None


def test_slurm_tasks_per_node_parsing():
    assert distributed._expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert distributed.slurm_tasks_on_node(dict(SLURM_STEP_TASKS_PER_NODE="2(x3),1",
                                                SLURM_NODEID="3")) == 1
    with pytest.raises(ValueError, match="GPUs are visible"):
        distributed.slurm_local_device_ids(dict(SLURM, SLURM_LOCALID="0", SLURM_NODEID="0",
                                                CUDA_VISIBLE_DEVICES="0,1,2",
                                                SLURM_STEP_TASKS_PER_NODE="2"))


# -- helpers in one process (8 devices) ----------------------------------------------------------
def test_global_batch_local_part_and_to_host_single_process():
    mesh = mesh_lib.plan_mesh(4, batch_size=8)  # ('model' 4, 'data' 2)
    spec = P("model", "data")
    x = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4, 8, 3)
    idx = distributed.process_indices(mesh, spec, x.shape)
    assert [list(i) for i in idx] == [list(range(4)), list(range(8)), list(range(3))]
    local = distributed.local_part({"x": x}, mesh, spec)
    g = distributed.global_batch(local, mesh, spec)["x"]
    assert g.shape == x.shape and g.sharding.spec == spec
    np.testing.assert_array_equal(distributed.to_host(g), x)
    rep = distributed.global_batch(x, mesh, P(), global_shape=x.shape)
    np.testing.assert_array_equal(distributed.to_host({"a": rep})["a"], x)


# -- real processes --------------------------------------------------------------------------
def _run_layout(tmp_path, layout):
    port = free_port()
    logs = [tmp_path / f"{layout}_{i}.log" for i in range(3)]
    ref = _start(["train", "--devices", 8, "--layout", layout, "--out", tmp_path / "one.npz"],
                 logs[2])
    procs = [_start(["train", "--devices", 4, "--layout", layout, "--out", tmp_path / "two.npz",
                     "--workdir", tmp_path / "ckpt"], logs[i], **env)
             for i, env in enumerate(_cluster(2, port))]
    _finish(procs + [ref], logs, timeout=600)
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert sorted(one.files) == sorted(two.files) and len(one.files) > 10
    assert (tmp_path / "ckpt").is_dir()
    return one, two


def test_two_processes_train_members_like_one(tmp_path):
    """Members 0-3 on process 0, 4-7 on process 1 (default mesh): same params, losses, eval counts
    and uniform soup as one process with 8 devices; Orbax saves/restores the global state."""
    one, two = _run_layout(tmp_path, "members")
    for k in one.files:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert np.all(np.isfinite(one["losses"])) and one["losses"].shape == (STEPS, M)


@pytest.mark.slow
def test_two_processes_split_each_members_batch(tmp_path):
    """Each member's batch split over devices of both processes: gradients summed over the
    'data' axis cross processes (Gloo) and still match one process."""
    one, two = _run_layout(tmp_path, "data")
    for k in one.files:
        # summation order differs across processes (Gloo): the 1e-5 fp32 bound of the
        # equivalence tests, absolute
        np.testing.assert_allclose(two[k], one[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_local_sh_starts_processes_through_runtime_setup(tmp_path):
    """launch/local.sh -n 2 -c 2: two processes, 2 CPU devices each, joined by runtime.setup."""
    env = _env(MODULE="test_distributed", LOG_DIR=tmp_path, PYTHON=sys.executable,
               PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
    proc = subprocess.run(["bash", str(REPO / "launch" / "local.sh"), "-n", "2", "-c", "2", "--",
                           "setup"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "hello from process 0 of 2: 2 local devices, psum 4" in proc.stdout
    assert "main process: 4 devices in all" in proc.stdout
    other = (tmp_path / "process_1.log").read_text()
    assert "hello from process 1 of 2: 2 local devices, psum 4" in other
    assert "main process" not in other


@pytest.mark.slow
@pytest.mark.skipif("distributed" not in vars(loop_lib),
                    reason="rat_jax/engine/loop.py does not fetch multi-process arrays yet")
def test_two_processes_run_loop_like_one(tmp_path):
    """train_members end to end in two processes: same final/best params and scores as one
    process, and the same results.jsonl records (written once, by process 0)."""
    import json
    port = free_port()
    logs = [tmp_path / f"loop_{i}.log" for i in range(3)]
    ref = _start(["loop", "--devices", 8, "--out", tmp_path / "one.npz", "--workdir",
                  tmp_path / "one"], logs[2])
    procs = [_start(["loop", "--devices", 4, "--out", tmp_path / "two.npz", "--workdir",
                     tmp_path / "two"], logs[i], **env) for i, env in enumerate(_cluster(2, port))]
    _finish(procs + [ref], logs, timeout=900)
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    for k in one.files:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for i in range(M):
        recs = [[{k: v for k, v in json.loads(line).items() if k != "step_time"}
                 for line in (tmp_path / run / f"member_{i}" / "results.jsonl").open()]
                for run in ("one", "two")]
        assert recs[0] == recs[1] and len(recs[0]) == 3  # steps 0, 2, 3
    assert (tmp_path / "two" / "checkpoints").is_dir()


@pytest.mark.parametrize("victim", [1, 0])
def test_killed_process_stops_the_other(tmp_path, victim):
    """SIGKILL one process mid-run: the other exits non-zero with JAX's 'another task died' error
    within the heartbeat timeout (here 5 s), never hangs."""
    port = free_port()
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    ready = tmp_path / "ready"
    procs = [_start(["wait", "--devices", 2, "--ready", ready], logs[i],
                    RAT_JAX_HEARTBEAT_TIMEOUT=5, **env) for i, env in enumerate(_cluster(2, port))]
    try:
        deadline = time.time() + 240
        while not all((tmp_path / f"ready.{i}").exists() for i in range(2)):
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                pytest.fail("workers did not start:\n" + "\n".join(_tail(l) for l in logs))
            time.sleep(0.2)
        procs[victim].kill()
        survivor = procs[1 - victim]
        t0 = time.time()
        try:
            survivor.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the surviving process hung for 60 s after its peer was killed")
        elapsed = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out = logs[1 - victim].read_text(errors="replace")
    assert survivor.returncode != 0 and "SURVIVED" not in out
    assert "distributed service detected fatal errors" in out or "another task died" in out, \
        _tail(logs[1 - victim])
    assert elapsed < 60
