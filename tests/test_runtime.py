"""Process set-up before JAX starts (rat_jax.runtime): XLA:CPU flags and per-step compile options,
glibc malloc settings, and what `setup` applies on which backend."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from rat_jax import runtime

REPO = pathlib.Path(__file__).resolve().parents[1]
OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}


def _python(code: str, env_overrides: dict | None = None, args=()) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "RAT_JAX_MALLOC", "JAX_PLATFORMS", runtime._REEXEC_MARK)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(env_overrides or {})
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_importing_runtime_imports_no_jax():
    out = _python("import sys, rat_jax.runtime; print('jax' in sys.modules)")
    assert out == "False"


# ---- XLA:CPU flags and compile options -----------------------------------------------------------
def test_cpu_xla_flags_added_once_and_user_flags_win(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    for mode in ("auto", "on"):  # XLA's defaults
        assert runtime.configure_cpu_xla_flags(mode) == "--xla_cpu_enable_fast_math=false"
    flags = runtime.configure_cpu_xla_flags("off")
    assert flags == "--xla_cpu_enable_fast_math=false --xla_cpu_experimental_ynn_fusion_type="
    assert os.environ["XLA_FLAGS"] == flags
    assert runtime.configure_cpu_xla_flags("off") == flags  # idempotent
    # a user's own value of the flag is kept as is
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
    assert runtime.configure_cpu_xla_flags("off") == (
        "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
    with pytest.raises(ValueError, match="cpu_ynn='sometimes'"):
        runtime.configure_cpu_xla_flags("sometimes")


class _Lowered:
    """A stand-in for a lowered step: a cost analysis, and a compile that rejects options."""

    def __init__(self, flops=1.0, reject_options=False):
        self.flops, self.reject_options, self.compiled_with = flops, reject_options, []

    def cost_analysis(self):
        return {"flops": self.flops}

    def compile(self, compiler_options=None):
        self.compiled_with.append(compiler_options)
        if compiler_options and self.reject_options:
            raise RuntimeError("INVALID_ARGUMENT: no such option")
        return "compiled"


def test_cpu_ynn_settings_reach_the_compile_options():
    low = _Lowered()
    assert runtime.cpu_compiler_options(low, 1, "cpu", "on") is None
    assert runtime.cpu_compiler_options(low, 1, "cpu", "off") == OFF
    for mode in runtime.CPU_YNN_MODES:  # other backends: XLA's options
        assert runtime.cpu_compiler_options(low, 1, "gpu", mode) is None

    class NoCost:
        def cost_analysis(self):
            raise NotImplementedError
    assert runtime.cpu_compiler_options(NoCost(), 1, "cpu", "auto") is None
    with pytest.raises(ValueError, match="cpu_ynn"):
        runtime.cpu_compiler_options(low, 1, "cpu", "0")


def test_compile_falls_back_to_xla_defaults_when_options_are_rejected(caplog):
    low = _Lowered(reject_options=True)
    with caplog.at_level("WARNING", logger="rat_jax"):
        compiled, used = runtime.compile_with_options(low, OFF)
    assert (compiled, used) == ("compiled", None) and low.compiled_with == [OFF, None]
    assert "compiling without them" in caplog.text
    ok = _Lowered()
    assert runtime.compile_with_options(ok, OFF) == ("compiled", OFF)
    assert runtime.compile_with_options(ok, None) == ("compiled", None)


def _tiny_engine(**kwargs):
    import jax

    from members_helpers import member_inits, tiny_model
    from rat_jax import trees
    from rat_jax.engine import members as members_lib
    model = tiny_model()
    params, bs = member_inits(model, 1)
    eng = members_lib.MemberEngine(model, bs, 1, members_lib.EngineConfig(
        batch_size=4, devices=jax.devices()[:1], **kwargs))
    state = members_lib.init_state(trees.stack(params))
    return eng, state, members_lib.make_hparams(1, lr=1e-3)


def _one_step(eng, state, hp):
    import jax
    import numpy as np

    from members_helpers import synthetic_batches
    batch = synthetic_batches(1, 4, 1)[0]
    state, metrics = eng.train_step(eng.place(state), eng.place(hp), batch)
    return jax.tree.map(np.asarray, state), np.asarray(metrics["loss"])


def test_engine_compiles_its_step_with_the_cpu_ynn_setting():
    results = {}
    for mode in ("on", "off"):
        eng, state, hp = _tiny_engine(cpu_ynn=mode)
        results[mode] = _one_step(eng, state, hp)
        assert eng.compiler_options == (OFF if mode == "off" else None)
    assert abs(float(results["on"][1][0]) - float(results["off"][1][0])) < 1e-5
    with pytest.raises(ValueError, match="cpu_ynn"):
        _tiny_engine(cpu_ynn="1")


def test_engine_step_compiles_when_xla_rejects_the_options(monkeypatch):
    """Options XLA does not know: the step compiles with XLA's defaults and trains."""
    monkeypatch.setattr(runtime, "cpu_compiler_options",
                        lambda *a, **k: {"xla_rat_jax_no_such_option": "1"})
    eng, state, hp = _tiny_engine(cpu_ynn="auto")
    state, loss = _one_step(eng, state, hp)
    assert eng.compiler_options is None and loss.shape == (1,) and bool((loss > 0).all())


# ---- setup(): what applies on which backend ------------------------------------------------------
def test_cpu_backend_possible_from_the_environment():
    assert runtime.cpu_backend_possible({})
    assert runtime.cpu_backend_possible({"JAX_PLATFORMS": "cpu"})
    assert runtime.cpu_backend_possible({"JAX_PLATFORMS": ""})
    assert not runtime.cpu_backend_possible({"JAX_PLATFORMS": "cuda"})
    assert not runtime.cpu_backend_possible({"JAX_PLATFORMS": "tpu,cpu"})
    assert not runtime.cpu_backend_possible({"JAX_PLATFORMS": "gpu"})


def test_cpu_backend_possible_from_installed_plugins_and_devices(monkeypatch, tmp_path):
    """No $JAX_PLATFORMS: an accelerator plugin with a device to drive means no CPU settings."""
    assert runtime.accelerator_present({}) is None  # this machine: no plugin, no device
    installed = set()
    monkeypatch.setattr(runtime, "_module_installed", lambda name: name in installed)
    nodes = []
    monkeypatch.setattr(runtime.glob, "glob",
                        lambda pattern: [n for n in nodes if n.startswith(pattern.split("*")[0]
                                                                          .split("[")[0])])
    installed.add("jax_cuda12_plugin")
    assert runtime.accelerator_present({}) is None          # a plugin but no GPU
    nodes.append("/dev/nvidia0")
    assert runtime.accelerator_present({}) == "gpu"
    assert not runtime.cpu_backend_possible({})
    assert runtime.cpu_backend_possible({"CUDA_VISIBLE_DEVICES": ""})  # every GPU hidden
    assert runtime.cpu_backend_possible({"JAX_PLATFORMS": "cpu"})       # the user's choice wins
    installed.add("libtpu")
    nodes.append("/dev/accel0")
    assert runtime.accelerator_present({}) == "tpu"


_SETUP = """
import json, os, types
from rat_jax import runtime
calls = []
runtime.apply_mallopt = lambda: calls.append("mallopt") or True
config = types.SimpleNamespace(engine={"cpu_ynn": "off", "cpu_devices": 1})
out = {}
for platforms in ("cuda", "cpu"):
    os.environ["JAX_PLATFORMS"], os.environ["XLA_FLAGS"] = platforms, ""
    calls.clear()
    runtime.setup(config)
    out[platforms] = [os.environ["XLA_FLAGS"], list(calls)]
print(json.dumps(out))
"""


def test_setup_applies_cpu_settings_only_where_jax_may_run_on_cpu(tmp_path):
    out = json.loads(_python(_SETUP, {"RAT_JAX_COMPILE_CACHE": str(tmp_path)}))
    assert out["cuda"] == ["", []]
    assert out["cpu"] == ["--xla_cpu_experimental_ynn_fusion_type=", ["mallopt"]]


# ---- glibc malloc settings ---------------------------------------------------------------------
glibc_only = pytest.mark.skipif(not runtime._is_glibc(), reason="glibc malloc tunables only")


def test_malloc_tunables_merge_with_the_users_and_can_be_turned_off():
    if not runtime._is_glibc():
        assert runtime.malloc_tunables({}) is None
        return
    # the default profile: transparent huge pages only (freed blocks still go back to the OS)
    assert runtime.malloc_tunables({}) == "glibc.malloc.hugetlb=1"
    tuned = {"RAT_JAX_MALLOC": "tuned"}
    value = runtime.malloc_tunables(tuned)
    assert [item.split("=")[0] for item in value.split(":")] == [
        "glibc.malloc.hugetlb", "glibc.malloc.mmap_max", "glibc.malloc.trim_threshold",
        "glibc.malloc.arena_max"]
    # the user's own value of a tunable is kept, and their other tunables stay first
    mine = runtime.malloc_tunables(
        dict(tuned, GLIBC_TUNABLES="glibc.malloc.arena_max=8:glibc.rtld.x=1"))
    assert mine.startswith("glibc.malloc.arena_max=8:glibc.rtld.x=1:")
    assert mine.count("arena_max") == 1 and "glibc.malloc.hugetlb=1" in mine
    assert runtime.malloc_tunables(dict(tuned, GLIBC_TUNABLES=value)) is None
    assert runtime.malloc_tunables({"RAT_JAX_MALLOC": "system"}) is None
    with pytest.raises(ValueError, match="RAT_JAX_MALLOC='fast'.*system"):
        runtime.malloc_tunables({"RAT_JAX_MALLOC": "fast"})


_REEXEC = """
import json, os, sys
from rat_jax import runtime
runtime.reexec_with_malloc_tunables()
print(json.dumps([os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:]]))
"""


@glibc_only
def test_reexec_sets_the_tunables_once_and_keeps_the_command_line():
    tunables, args = json.loads(_python(_REEXEC, args=("--x", "a b")))
    assert tunables == runtime.malloc_tunables({}) and args == ["--x", "a b"]
    # RAT_JAX_MALLOC=system, or a backend other than the CPU: no re-execution
    for env in ({"RAT_JAX_MALLOC": "system"}, {"JAX_PLATFORMS": "cuda"}):
        tunables, args = json.loads(_python(_REEXEC, env, args=("--x",)))
        assert tunables == "" and args == ["--x"]


_NOTEBOOK_SETUP = """
import json
from rat_jax import runtime
import rat_jax.distributed as distributed
calls = []
runtime.apply_mallopt = lambda: calls.append("mallopt") or True
distributed.initialize = lambda *a, **k: calls.append("distributed")
kind = runtime.setup_notebook(cpu_devices=2)
import jax
print(json.dumps([kind, calls, jax.device_count()]))
"""


def test_setup_notebook_neither_initializes_distributed_nor_tunes_malloc():
    res = subprocess.run([sys.executable, "-c", _NOTEBOOK_SETUP], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"},
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == ["cpu", [], 2]


def test_release_memory_collects_cycles_and_drops_compiled_programs_only_when_asked():
    import gc
    import weakref

    import jax
    import jax.numpy as jnp

    class Node:
        pass
    a, b = Node(), Node()
    a.other, b.other = b, a  # a reference cycle: only the cycle collector frees it
    gone = weakref.ref(a)
    gc.disable()
    try:
        del a, b
        assert gone() is not None
        f = jax.jit(lambda x: x * 2)
        f(jnp.ones(3))
        assert f._cache_size() == 1
        runtime.release_memory()
        assert gone() is None and f._cache_size() == 1  # programs stay between runs
        runtime.release_memory(compiled=True)
        assert f._cache_size() == 0  # reloaded from the persistent cache when next called
    finally:
        gc.enable()
