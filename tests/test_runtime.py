"""CPU XLA flags and glibc malloc settings set before JAX starts, and the engine.data_parallel
setting."""
import os
import pathlib
import subprocess
import sys

import pytest

from rat_jax import pipeline, runtime


def test_cpu_xla_flags_added_once_and_user_flags_win(monkeypatch):
    monkeypatch.delenv("RAT_JAX_CPU_YNN", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    assert runtime.configure_cpu_xla_flags() == "--xla_cpu_enable_fast_math=false"  # XLA's default
    monkeypatch.setenv("RAT_JAX_CPU_YNN", "0")
    flags = runtime.configure_cpu_xla_flags()
    assert flags == "--xla_cpu_enable_fast_math=false --xla_cpu_experimental_ynn_fusion_type="
    assert runtime.configure_cpu_xla_flags() == flags  # idempotent
    # a user's own value of the flag is kept as is
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
    assert runtime.configure_cpu_xla_flags() == "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
    # RAT_JAX_CPU_YNN=1 (or unset) leaves XLA's defaults alone
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("RAT_JAX_CPU_YNN", "1")
    assert runtime.configure_cpu_xla_flags() == ""


def test_default_cpu_devices_one_per_core_capped(monkeypatch):
    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    assert runtime.default_cpu_devices() == 2
    monkeypatch.setattr(runtime, "usable_cores", lambda: 1)
    assert runtime.default_cpu_devices() == 1
    monkeypatch.setattr(runtime, "usable_cores", lambda: 64)
    assert runtime.default_cpu_devices() == runtime.CPU_DEVICES_CAP
    assert 1 <= runtime.usable_cores()


def test_data_parallel_setting():
    assert pipeline._data_parallel("auto") is None
    assert pipeline._data_parallel("on") is True
    assert pipeline._data_parallel("off") is False
    assert pipeline._data_parallel(True) is True
    with pytest.raises(ValueError, match="engine.data_parallel"):
        pipeline._data_parallel("sometimes")


def test_cpu_compiler_options_follow_the_step_cost(monkeypatch):
    """YNNPACK fusions off only for member steps above CPU_YNN_MAX_FLOPS; per member, not per call."""
    from rat_jax.engine import members as members_lib

    class Lowered:
        def __init__(self, flops):
            self.flops = flops

        def cost_analysis(self):
            return {"flops": self.flops}

    monkeypatch.delenv("RAT_JAX_CPU_YNN", raising=False)
    big, off = 2 * members_lib.CPU_YNN_MAX_FLOPS, {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert members_lib.cpu_compiler_options(Lowered(big), 1, "cpu") == off
    assert members_lib.cpu_compiler_options(Lowered(big), 4, "cpu") is None  # 4 members share it
    assert members_lib.cpu_compiler_options(Lowered(1e6), 1, "cpu") is None
    assert members_lib.cpu_compiler_options(Lowered(big), 1, "gpu") is None
    monkeypatch.setenv("RAT_JAX_CPU_YNN", "1")
    assert members_lib.cpu_compiler_options(Lowered(big), 1, "cpu") is None
    monkeypatch.setenv("RAT_JAX_CPU_YNN", "0")
    assert members_lib.cpu_compiler_options(Lowered(1e6), 1, "cpu") == off


@pytest.mark.parametrize("arch,ynn", [("resnet18", False), ("efficientnet_lite0", True)])
def test_engine_compiles_a_large_member_step_without_ynnpack(arch, ynn):
    """Real member steps at 64 px, batch 96: XLA's cost analysis puts ResNet-18 (80 GFLOP) above the
    limit and EfficientNet-Lite0 (19 GFLOP) below it."""
    import jax
    import numpy as np

    from rat_jax.models import create_model
    from rat_jax.engine import members as members_lib
    model = create_model(arch, 7)
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32))
    zeros = lambda t: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), t)
    eng = members_lib.MemberEngine(model, zeros(shapes["batch_stats"]), 1, batch_size=96,
                                   devices=jax.devices()[:1])
    state = eng.place(members_lib.init_state(members_lib.stack_trees([zeros(shapes["params"])])))
    images = jax.ShapeDtypeStruct((1, 96, 64, 64, 3), np.float32, sharding=eng.batch_sharding)
    labels = jax.ShapeDtypeStruct((1, 96), np.int32, sharding=eng.batch_sharding)
    lowered = eng._train_jit.lower(state["members"], eng.place(members_lib.make_hparams(1)),
                                   images, labels, eng.batch_stats)
    assert members_lib.cpu_compiler_options(lowered, 1, "cpu") == (
        None if ynn else {"xla_cpu_experimental_ynn_fusion_type": ""})


# ---- glibc malloc settings ---------------------------------------------------------------------
REPO = pathlib.Path(__file__).resolve().parents[1]
glibc_only = pytest.mark.skipif(not runtime._is_glibc(), reason="glibc malloc tunables only")

_FAULTS = """
import ctypes, resource, sys
sys.path.insert(0, {repo!r})
from rat_jax import runtime
if {reexec}:
    runtime.reexec_with_malloc_tunables()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def block():  # a 256 MiB temporary, written and freed: what an XLA:CPU step does with its temps
    p = libc.malloc(1 << 28)
    ctypes.memset(p, 1, 1 << 28)
    libc.free(p)

block()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    block()
import os
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0, os.environ.get("GLIBC_TUNABLES", ""),
      " ".join(sys.argv[1:]))
"""


def _run_faults(tmp_path, reexec, **env_overrides):
    script = tmp_path / "faults.py"
    script.write_text(_FAULTS.format(repo=str(REPO), reexec=reexec))
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "RAT_JAX_MALLOC", runtime._REEXEC_MARK)}
    env.update(env_overrides)
    out = subprocess.run([sys.executable, "-u", str(script), "--x", "a b"], env=env,
                         capture_output=True, text=True, check=True).stdout.split(" ", 2)
    return int(out[0]), out[1], out[2].strip()


def test_malloc_tunables_merge_with_the_users_and_can_be_turned_off():
    keys = [k for k, _ in runtime.MALLOC_TUNABLES]
    if not runtime._is_glibc():
        assert runtime.malloc_tunables({}) is None
        return
    value = runtime.malloc_tunables({})
    assert [item.split("=")[0] for item in value.split(":")] == keys
    # the user's own value of a tunable is kept, and their other tunables stay first
    mine = runtime.malloc_tunables({"GLIBC_TUNABLES": "glibc.malloc.arena_max=8:glibc.rtld.x=1"})
    assert mine.startswith("glibc.malloc.arena_max=8:glibc.rtld.x=1:")
    assert mine.count("arena_max") == 1 and "glibc.malloc.hugetlb=1" in mine
    assert runtime.malloc_tunables({"GLIBC_TUNABLES": value}) is None  # already set: no change
    assert runtime.malloc_tunables({"RAT_JAX_MALLOC": "system"}) is None
    with pytest.raises(ValueError, match="RAT_JAX_MALLOC='fast'.*system"):
        runtime.malloc_tunables({"RAT_JAX_MALLOC": "fast"})


@glibc_only
def test_reexec_sets_the_tunables_keeps_the_command_and_stops_the_page_faults(tmp_path):
    # glibc's default: every fresh 256 MiB block is mmapped and faulted in again (65k pages each)
    faults, tunables, args = _run_faults(tmp_path, reexec=False)
    assert faults > 4 * 30000 and tunables == ""
    # an entry point re-executes itself once with the tunables, same arguments; freed blocks are
    # then reused without faulting
    faults, tunables, args = _run_faults(tmp_path, reexec=True)
    assert tunables == runtime.malloc_tunables({}) and args == "--x a b"
    assert faults < 1000
    # RAT_JAX_MALLOC=system: no re-execution, glibc's defaults
    faults, tunables, _ = _run_faults(tmp_path, reexec=True, RAT_JAX_MALLOC="system")
    assert tunables == "" and faults > 4 * 30000
