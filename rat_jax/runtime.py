"""Process set-up that must happen before JAX touches a device."""
from __future__ import annotations

import os

import jax

# On CPU, members spread over emulated host devices, one XLA stream each (bench/members.py).
DEFAULT_CPU_DEVICES = 8

# XLA:CPU sends dots to YNNPACK library fusions by default (jaxlib 0.10); on the im2col matmuls of
# our conv paths Eigen's matmul is faster: a ResNet-18 @ 64 px member step 1.06 s instead of 1.35 s,
# EfficientNet-Lite0 1.12 instead of 0.91 steps/s (bench/cpu_vs_torch.py, README). Set before the
# CPU backend starts; a user's own setting of the flag wins; RAT_JAX_CPU_YNN=1 keeps XLA's default.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def configure_cpu_xla_flags() -> str:
    """Add CPU_XLA_FLAGS to $XLA_FLAGS (flags the user already set are left alone); returns the
    resulting XLA_FLAGS. Only takes effect before the first JAX device use in the process."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("RAT_JAX_CPU_YNN", "") not in ("", "0"):
        return flags
    for flag in CPU_XLA_FLAGS:
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
