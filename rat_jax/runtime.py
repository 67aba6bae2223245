"""Process set-up that must happen before JAX touches a device."""
from __future__ import annotations

import os

import jax

# Emulated CPU devices (one XLA stream each): by default one per core this process may use, at
# most CPU_DEVICES_CAP. The engine spreads members over them (one member per device at a time,
# `loop` within a device) and splits no member's batch over them (members.default_data_parallel).
# Measured on 2 cores (bench/engine_step.py, 2 members, batch 96, 64 px, idle): 2 devices against
# 1 ran ResNet-18 at 1.048 vs 0.867 member-steps/s (+21%), ResNet-50 at 0.371 vs 0.320 (+16%),
# EfficientNet-Lite0 at 0.951 vs 1.011 (-6%). Each device holds one member's activations at a time,
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

# XLA:CPU sends dots to YNNPACK library fusions by default (jaxlib 0.10). Measured here (one
# member step, batch b, one device): YNNPACK is 2.8x faster for small steps (EfficientNet-Lite0 @ 32
# px, b = 24: 10.5 vs 3.8 steps/s) and Eigen's matmul 1.2x faster for large ones (ResNet-18 @ 64 px,
# b = 96: 0.97 vs 0.78; Lite0 @ 64 px: 1.12 vs 0.91). XLA's default stays process-wide (the member
# engine turns them off per compiled step above members.CPU_YNN_MAX_FLOPS); RAT_JAX_CPU_YNN=0 turns
# the YNNPACK fusions off for large per-member steps (set before the CPU backend starts; a user's
# own setting of the flag in XLA_FLAGS wins).
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
    """Set the CPU XLA flags (configure_cpu_xla_flags), emulate `config.engine.cpu_devices` host
    devices on CPU (0 = default), enable the compilation cache, quiet library logs, then join the other processes of a multi-process run
    (rat_jax.distributed.initialize: a no-op for one process); idempotent."""
    configure_cpu_xla_flags()
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
