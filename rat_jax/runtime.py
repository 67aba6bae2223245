"""Process set-up that must happen before JAX touches a device, and the XLA:CPU tuning.

Importing this module imports no JAX (entry points call it before JAX starts); functions that need
JAX import it themselves. What lives here:
  - emulated CPU devices (default_cpu_devices),
  - glibc malloc profiles for XLA:CPU (MALLOC_PROFILES, reexec_with_malloc_tunables, apply_mallopt),
  - XLA:CPU's YNNPACK dot fusions, process-wide (configure_cpu_xla_flags) and per compiled member
    step (cpu_compiler_options, compile_with_options),
  - the compilation cache, library logs, and `setup(config)` that applies all of it.
bench/*.py measure each setting; docs/benchmarks.md holds the current numbers.
"""
from __future__ import annotations

import ctypes
import glob
import importlib.util
import logging
import os
import platform
import sys
from typing import Any, Mapping

logger = logging.getLogger("rat_jax")

# Emulated CPU devices (one XLA stream each): by default one per core this process may use, at
# most CPU_DEVICES_CAP. The engine spreads members over them, one member per device at a time
# (bench/engine_step.py, bench/members.py). Each device holds one member's activations at a time,
# so memory grows with the device count: `engine.cpu_devices=1` (or RAT_JAX_CPU_DEVICES=1) keeps
# one; configs/demo.py and the :cpu variants set more for small steps.
CPU_DEVICES_CAP = 4


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_cpu_devices() -> int:
    """Emulated CPU devices when neither the config nor $RAT_JAX_CPU_DEVICES sets them."""
    return max(1, min(usable_cores(), CPU_DEVICES_CAP))


DEFAULT_CPU_DEVICES = default_cpu_devices()


def config_package_on_path(config_file: str) -> None:
    """Put the folder holding a config package (configs/ with its __init__.py) on sys.path, so
    that a config file given by any path (`--config=/src/rat_jax/configs/pacs.py:cpu`) can do
    `from configs import common` whatever the working directory."""
    folder = os.path.dirname(os.path.abspath(config_file.split(":", 1)[0]))
    if os.path.exists(os.path.join(folder, "__init__.py")):
        root = os.path.dirname(folder)
        if root not in sys.path:
            sys.path.insert(0, root)


def config_flag_on_path(argv: list[str]) -> None:
    """config_package_on_path for the `--config=FILE` / `--config FILE` of a command line."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            config_package_on_path(arg.split("=", 1)[1])
        elif arg == "--config" and i + 1 < len(argv):
            config_package_on_path(argv[i + 1])


def _module_installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def accelerator_present(env: Mapping[str, str] | None = None) -> str | None:
    """"tpu", "gpu" or None: whether JAX, once started, will find an accelerator -- a plugin
    installed for it (libtpu; jax's CUDA or ROCm plugins) and a device node it can drive
    (/dev/accel* or /dev/vfio/N; /dev/nvidiaN unless CUDA_VISIBLE_DEVICES hides every GPU;
    /dev/kfd). Decided without importing JAX."""
    env = os.environ if env is None else env
    if _module_installed("libtpu") and (glob.glob("/dev/accel*") or [
            p for p in glob.glob("/dev/vfio/*") if os.path.basename(p).isdigit()]):
        return "tpu"
    if env.get("CUDA_VISIBLE_DEVICES", "x").strip() not in ("", "-1"):
        cuda = any(_module_installed(m) for m in (
            "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12",
            "jax_plugins.xla_cuda13"))
        if cuda and glob.glob("/dev/nvidia[0-9]*"):
            return "gpu"
        rocm = any(_module_installed(m) for m in ("jax_rocm60_plugin", "jax_rocm7_plugin",
                                                  "jax_plugins.xla_rocm60",
                                                  "jax_plugins.xla_rocm7"))
        if rocm and os.path.exists("/dev/kfd"):
            return "gpu"
    return None


def cpu_backend_possible(env: Mapping[str, str] | None = None) -> bool:
    """Whether JAX's default backend may be the CPU, decided before JAX starts: $JAX_PLATFORMS
    when set (its first, default, platform), else whether an accelerator is present
    (accelerator_present). CPU-only settings (malloc re-exec, XLA:CPU flags) apply only then."""
    env = os.environ if env is None else env
    platforms = [p.strip().lower() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms[0] == "cpu"
    return accelerator_present(env) is None


# glibc malloc settings for XLA:CPU, by profile ($RAT_JAX_MALLOC). XLA allocates every step's
# temporaries afresh (one block per device and step, hundreds of MB for a member's backward pass)
# and frees them at its end. With glibc's defaults ("system") such blocks are mmap-ed and returned
# at each step, and the next step page-faults them in again, 4 KiB at a time. "huge" (the default)
# only asks glibc for transparent huge pages: the blocks still go back to the OS, so the process
# holds what its live steps need, and faulting them in takes 2 MiB at a time. "tuned" also keeps
# freed memory in one never-trimmed heap: no faults at all, but the process keeps (and fragments)
# its peak heap until it exits. bench/malloc.py measures the three side by side
# (docs/benchmarks.md). glibc reads GLIBC_TUNABLES only at process start, so the entry points
# re-execute themselves with it (reexec_with_malloc_tunables); a process that cannot (a notebook)
# gets the profile's mallopt part, if any (apply_mallopt).
MALLOC_PROFILES = {
    "huge": (("glibc.malloc.hugetlb", "1"),),
    "tuned": (("glibc.malloc.hugetlb", "1"), ("glibc.malloc.mmap_max", "0"),
              ("glibc.malloc.trim_threshold", str(1 << 40)), ("glibc.malloc.arena_max", "1")),
    "system": (),
}
MALLOC_DEFAULT = "huge"
MALLOC_MODES = tuple(MALLOC_PROFILES)
# mallopt(param, value) equivalents of a profile (glibc's M_ARENA_MAX, M_TRIM_THRESHOLD, M_MMAP_MAX)
_MALLOPT = {"tuned": ((-8, 1), (-1, 2 ** 31 - 1), (-4, 0))}
_REEXEC_MARK = "_RAT_JAX_MALLOC_REEXEC"


def _malloc_mode(env: Mapping[str, str]) -> str:
    mode = env.get("RAT_JAX_MALLOC", MALLOC_DEFAULT) or MALLOC_DEFAULT
    if mode not in MALLOC_MODES:
        raise ValueError(f"RAT_JAX_MALLOC={mode!r} is not a malloc profile; use one of "
                         f"{MALLOC_MODES} ('system' keeps glibc's defaults)")
    return mode


def _is_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def malloc_tunables(env: Mapping[str, str] | None = None) -> str | None:
    """The GLIBC_TUNABLES value rat_jax runs with: `env`'s own setting plus the tunables of the
    $RAT_JAX_MALLOC profile (MALLOC_PROFILES) it lacks (a tunable the user set keeps the user's
    value). None when nothing needs to change: RAT_JAX_MALLOC=system, not glibc, or every tunable
    already set."""
    env = os.environ if env is None else env
    mode = _malloc_mode(env)
    if not MALLOC_PROFILES[mode] or not _is_glibc():
        return None
    current = env.get("GLIBC_TUNABLES", "")
    present = {item.split("=", 1)[0] for item in current.split(":") if item}
    missing = [f"{k}={v}" for k, v in MALLOC_PROFILES[mode] if k not in present]
    if not missing:
        return None
    return ":".join([current] + missing if current else missing)


def reexec_with_malloc_tunables(argv: list[str] | None = None) -> None:
    """Re-execute this process (same pid, same command line) with malloc_tunables() in its
    environment; returns when there is nothing to change (or JAX will not run on the CPU).
    Call it first thing in a `__main__`, before JAX starts or any thread exists; never from a
    library function."""
    if not cpu_backend_possible():
        return
    value = malloc_tunables()
    if value is None or os.environ.get(_REEXEC_MARK) == str(os.getpid()):  # exec keeps the pid
        return
    argv = list(sys.orig_argv if argv is None else argv)
    env = dict(os.environ, GLIBC_TUNABLES=value, **{_REEXEC_MARK: str(os.getpid())})
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable] + argv[1:], env)
    except OSError as e:  # keep running with glibc's defaults rather than fail the job
        print(f"rat_jax: could not re-execute with GLIBC_TUNABLES={value} ({e}); CPU steps will "
              "page-fault their temporaries (set it in the environment)", file=sys.stderr)


def apply_mallopt() -> bool:
    """In-process part of the $RAT_JAX_MALLOC profile for a process started without its tunables
    ("tuned": mallopt's no mmap for large blocks, no trimming, one arena; "huge" and "system" have
    none: huge pages need GLIBC_TUNABLES at start). Returns whether it changed anything."""
    settings = _MALLOPT.get(_malloc_mode(os.environ), ())
    if not settings or malloc_tunables() is None:  # none, not glibc, or started with them
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def release_memory(compiled: bool = False) -> None:
    """Between stages: collect Python's reference cycles (finished runs' engines, loaders and
    params) and hand glibc's free pages back to the OS (malloc_trim, every arena), so that the
    next stage starts from what is live instead of the previous stages' peak. `compiled`: also
    drop JAX's in-memory compilation caches (programs of the same shapes are then reloaded from
    the persistent compilation cache: worth it between test envs, not between runs)."""
    import gc
    if compiled and "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Hand glibc's free pages back to the OS (malloc_trim, every arena; a no-op elsewhere).
    glibc returns freed memory on its own only from the top of a heap, so the pages of large
    blocks freed in the middle (a checkpoint's host copies, XLA's temporaries) stay resident
    until the process reuses them or this is called; after such a burst is the time."""
    if _is_glibc():
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


# XLA:CPU sends dots to YNNPACK library fusions by default. They are faster for small member steps
# and slower for large ones (bench/engine_step.py --cpu-ynn on|off; docs/benchmarks.md), so the
# member engine decides per compiled step from XLA's cost analysis ("auto"): fusions off above
# CPU_YNN_MAX_FLOPS per member. "on" keeps XLA's default for every step; "off" turns them off for
# every step, per compiled step and process-wide (configure_cpu_xla_flags, before JAX starts).
CPU_YNN_MODES = ("auto", "on", "off")
CPU_YNN_MAX_FLOPS = 4e10
CPU_XLA_FLAGS_WITHOUT_YNN = ("--xla_cpu_experimental_ynn_fusion_type=",)
_WITHOUT_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}


def check_cpu_ynn(mode: str) -> str:
    """`mode` if it is one of CPU_YNN_MODES, else a ValueError."""
    if mode not in CPU_YNN_MODES:
        raise ValueError(f"cpu_ynn={mode!r}: use one of {CPU_YNN_MODES} ('auto' decides per step "
                         "from its cost)")
    return mode


def configure_cpu_xla_flags(mode: str = "auto") -> str:
    """For cpu_ynn `mode` "off", add CPU_XLA_FLAGS_WITHOUT_YNN to $XLA_FLAGS (flags the user
    already set are left alone); "auto" and "on" change nothing. Returns the resulting XLA_FLAGS.
    Only takes effect before the first JAX device use in the process."""
    check_cpu_ynn(mode)
    flags = os.environ.get("XLA_FLAGS", "")
    if mode != "off":
        return flags
    for flag in CPU_XLA_FLAGS_WITHOUT_YNN:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags
    return flags


def cpu_compiler_options(lowered, num_members: int, platform: str,
                         mode: str = "auto") -> dict | None:
    """Per-program XLA options for a lowered member train step holding `num_members` members.

    CPU only (other platforms: None). `mode` "on": None (XLA's defaults); "off": YNNPACK dot
    fusions off; "auto": off when a member's step costs more than CPU_YNN_MAX_FLOPS by XLA's own
    cost analysis of `lowered` (None when there is no cost analysis)."""
    check_cpu_ynn(mode)
    if platform != "cpu" or mode == "on":
        return None
    if mode == "off":
        return dict(_WITHOUT_YNN)
    try:
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0))
    except Exception:  # no cost analysis: XLA's defaults
        return None
    if flops / max(num_members, 1) > CPU_YNN_MAX_FLOPS:
        return dict(_WITHOUT_YNN)
    return None


def compile_with_options(lowered, options: dict | None) -> tuple[Any, dict | None]:
    """`lowered.compile(compiler_options=options)`; if XLA rejects the options (e.g. a jaxlib
    without the flag), a warning and a compile with XLA's defaults. Returns (compiled, the options
    actually used)."""
    if options is None:
        return lowered.compile(compiler_options=None), None
    try:
        return lowered.compile(compiler_options=options), options
    except Exception as e:  # noqa: BLE001 - any rejection: XLA's defaults still compile the step
        logger.warning("compiling with XLA options %s failed (%s: %s); compiling without them",
                       options, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return lowered.compile(), None


def enable_compilation_cache(path: str | None = None) -> None:
    """Persist compiled XLA programs across processes ($RAT_JAX_COMPILE_CACHE or ~/.cache/rat_jax/xla):
    reruns, resumes and tests skip recompiling the same steps."""
    import jax
    path = path or os.environ.get("RAT_JAX_COMPILE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "rat_jax", "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def quiet_logs() -> None:
    """Orbax logs every save at INFO through absl; keep the console for progress and the table."""
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)


def setup(config=None) -> None:
    """Before any JAX device use: on a CPU backend (unless $JAX_PLATFORMS names another one), the
    process-wide XLA:CPU flags of `config.engine.cpu_ynn` (default "auto": configure_cpu_xla_flags)
    and the malloc settings a running process can still take (apply_mallopt); emulate
    `config.engine.cpu_devices` host devices on CPU (0 = default), enable the compilation cache,
    quiet library logs, then join the other processes of a multi-process run
    (rat_jax.distributed.initialize: a no-op for one process); idempotent."""
    import jax
    engine = getattr(config, "engine", None) if config is not None else None
    get = engine.get if engine is not None else (lambda key, default: default)
    cpu_ynn = check_cpu_ynn(str(get("cpu_ynn", "auto")))
    if cpu_backend_possible():
        configure_cpu_xla_flags(cpu_ynn)
        apply_mallopt()
    enable_compilation_cache()
    quiet_logs()
    n = int(get("cpu_devices", 0))
    n = n or int(os.environ.get("RAT_JAX_CPU_DEVICES", DEFAULT_CPU_DEVICES))
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backend already initialised (e.g. in a notebook): keep what is there
        pass
    import rat_jax.distributed as distributed
    distributed.initialize(config)


def setup_notebook(cpu_devices: int = 0) -> str:
    """A notebook's set-up (Colab, Kaggle, Jupyter): what `setup` does for one process, without
    its process-level parts -- no distributed initialization (a notebook is one process) and no
    malloc tuning (it would outlive the notebook's cells in the shared kernel). On a CPU runtime:
    the XLA:CPU flags and `cpu_devices` emulated devices (0 = default). Returns the runtime kind
    ("cpu", "gpu" or "tpu"), decided before JAX starts; call before any JAX device use."""
    import jax
    kind = "cpu" if cpu_backend_possible() else (accelerator_present() or "gpu")
    if kind == "cpu":
        configure_cpu_xla_flags("auto")
        n = int(cpu_devices) or int(os.environ.get("RAT_JAX_CPU_DEVICES", DEFAULT_CPU_DEVICES))
        try:
            jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError:  # backend already initialised: keep what is there
            pass
    enable_compilation_cache()
    quiet_logs()
    return kind


if __name__ == "__main__":  # `export $(python -m rat_jax.runtime)`: the environment entry points use
    print(f"GLIBC_TUNABLES={malloc_tunables() or os.environ.get('GLIBC_TUNABLES', '')}")
