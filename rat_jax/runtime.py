"""Process set-up that must happen before JAX touches a device."""
from __future__ import annotations

import ctypes
import os
import platform
import sys
from typing import Mapping

import jax

# Emulated CPU devices (one XLA stream each): by default one per core this process may use, at
# most CPU_DEVICES_CAP. The engine spreads members over them (one member per device at a time,
# `loop` within a device) and splits no member's batch over them (members.default_data_parallel).
# Measured on 2 cores (bench/engine_step.py, 2 members, batch 96, 64 px, idle, before the malloc
# settings below): 2 devices against 1 ran ResNet-18 at 1.048 vs 0.867 member-steps/s (+21%),
# ResNet-50 at 0.371 vs 0.320 (+16%), EfficientNet-Lite0 at 0.951 vs 1.011 (-6%); with them,
# 2 Lite0 members on 2 devices ran x1.07-1.11 of one jitted member step called twice
# (bench/members.py). Each device holds one member's activations at a time,
# so memory grows with the device count (ResNet-50 @ 224 px, batch 96: 9.1 GiB per member);
# `engine.cpu_devices=1` (or RAT_JAX_CPU_DEVICES=1) keeps one. Small steps gain from more devices
# than cores (EfficientNet-Lite0 @ 32 px, 8 devices: 12.6 vs 10.5 member-steps/s on one):
# configs/demo.py and the :cpu variants set engine.cpu_devices = 8.
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

# glibc malloc settings for XLA:CPU. XLA allocates every step's temporaries (activations, gradients)
# afresh and frees them at its end; glibc serves blocks over 32 MiB with mmap and returns them with
# munmap, so each step page-faults all of its temporary memory back in, 4 KiB at a time, serialised
# on the process's memory map: 37.6k faults and 0.11 s of kernel time per resnet_tiny step at 64 px
# (152 ms), 339k faults and 1.05 s per EfficientNet-Lite0 step (1.32 s). With these tunables
# (transparent huge pages for malloc'd memory, no mmap for large blocks, freed memory kept, one
# arena) the same steps took 112 ms and 0.68 s, and a ResNet-18 @ 64 px step 1.07 s instead of
# 1.38 s, with no page faults (one jitted member step, batch 96, one device, idle machine;
# `python bench/malloc.py`). The cost: the process keeps its peak heap until it exits (peak RSS
# for Lite0: 2.96 vs 3.19 GB).
# glibc reads GLIBC_TUNABLES only at process start, so the entry points re-execute themselves with
# it (reexec_with_malloc_tunables); a process that cannot (a notebook) gets the mallopt part
# (apply_mallopt, no huge pages). RAT_JAX_MALLOC=system leaves glibc's defaults alone.
MALLOC_TUNABLES = (("glibc.malloc.hugetlb", "1"), ("glibc.malloc.mmap_max", "0"),
                   ("glibc.malloc.trim_threshold", str(1 << 40)), ("glibc.malloc.arena_max", "1"))
MALLOC_MODES = ("tuned", "system")
_REEXEC_MARK = "_RAT_JAX_MALLOC_REEXEC"


def _malloc_mode(env: Mapping[str, str]) -> str:
    mode = env.get("RAT_JAX_MALLOC", "tuned") or "tuned"
    if mode not in MALLOC_MODES:
        raise ValueError(f"RAT_JAX_MALLOC={mode!r} is not a malloc mode; use one of {MALLOC_MODES} "
                         "('system' keeps glibc's defaults)")
    return mode


def _is_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def malloc_tunables(env: Mapping[str, str] | None = None) -> str | None:
    """The GLIBC_TUNABLES value rat_jax runs with: `env`'s own setting plus the MALLOC_TUNABLES it
    lacks (a tunable the user set keeps the user's value). None when nothing needs to change:
    RAT_JAX_MALLOC=system, not glibc, or every tunable already set."""
    env = os.environ if env is None else env
    if _malloc_mode(env) == "system" or not _is_glibc():
        return None
    current = env.get("GLIBC_TUNABLES", "")
    present = {item.split("=", 1)[0] for item in current.split(":") if item}
    missing = [f"{k}={v}" for k, v in MALLOC_TUNABLES if k not in present]
    if not missing:
        return None
    return ":".join([current] + missing if current else missing)


def reexec_with_malloc_tunables(argv: list[str] | None = None) -> None:
    """Re-execute this process (same pid, same command line) with malloc_tunables() in its
    environment; returns when there is nothing to change. Call it first thing in a `__main__`,
    before JAX starts or any thread exists; never from a library function."""
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
    """In-process part of the malloc settings (mallopt: no mmap for large blocks, no trimming,
    one arena) for a process started without them; huge pages need GLIBC_TUNABLES at start.
    Returns whether it changed anything."""
    if malloc_tunables() is None:  # opted out, not glibc, or started with the tunables
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    ok = [libc.mallopt(m_arena_max, 1), libc.mallopt(m_trim_threshold, 2 ** 31 - 1),
          libc.mallopt(m_mmap_max, 0)]
    return all(r == 1 for r in ok)


# XLA:CPU sends dots to YNNPACK library fusions by default (jaxlib 0.10). They are faster for small
# member steps and slower for large ones (measurements at members.CPU_YNN_MAX_FLOPS). XLA's default
# stays process-wide (the member engine turns them off per compiled step above
# members.CPU_YNN_MAX_FLOPS); RAT_JAX_CPU_YNN=0 turns the YNNPACK fusions off for every step (set
# before the CPU backend starts; a user's own setting of the flag in XLA_FLAGS wins).
CPU_XLA_FLAGS_WITHOUT_YNN = ("--xla_cpu_experimental_ynn_fusion_type=",)


def configure_cpu_xla_flags() -> str:
    """With RAT_JAX_CPU_YNN=0, add CPU_XLA_FLAGS_WITHOUT_YNN to $XLA_FLAGS (flags the user already
    set are left alone); returns the resulting XLA_FLAGS. Only takes effect before the first JAX
    device use in the process."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("RAT_JAX_CPU_YNN", "1") != "0":
        return flags
    for flag in CPU_XLA_FLAGS_WITHOUT_YNN:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags
    return flags


def enable_compilation_cache(path: str | None = None) -> None:
    """Persist compiled XLA programs across processes ($RAT_JAX_COMPILE_CACHE or ~/.cache/rat_jax/xla):
    reruns, resumes and tests skip recompiling the same steps."""
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
    """Set the CPU XLA flags (configure_cpu_xla_flags) and the malloc settings a running process can
    still take (apply_mallopt), emulate `config.engine.cpu_devices` host devices on CPU
    (0 = default), enable the compilation cache, quiet library logs, then join the other processes
    of a multi-process run (rat_jax.distributed.initialize: a no-op for one process); idempotent."""
    configure_cpu_xla_flags()
    apply_mallopt()
    enable_compilation_cache()
    quiet_logs()
    engine = getattr(config, "engine", None) if config is not None else None
    n = int(engine.get("cpu_devices", 0)) if engine is not None else 0
    n = n or int(os.environ.get("RAT_JAX_CPU_DEVICES", DEFAULT_CPU_DEVICES))
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backend already initialised (e.g. in a notebook): keep what is there
        pass
    from rat_jax import distributed
    distributed.initialize(config)


if __name__ == "__main__":  # `export $(python -m rat_jax.runtime)`: the environment entry points use
    print(f"GLIBC_TUNABLES={malloc_tunables() or os.environ.get('GLIBC_TUNABLES', '')}")
