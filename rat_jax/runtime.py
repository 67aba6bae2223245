"""Process set-up that must happen before JAX touches a device."""
from __future__ import annotations

import os

import jax

# On CPU, members spread over emulated host devices, one XLA stream each (bench/members.py).
DEFAULT_CPU_DEVICES = 8


def setup(config=None) -> None:
    """Emulate `config.engine.cpu_devices` host devices on CPU (0 = default); idempotent."""
    engine = getattr(config, "engine", None) if config is not None else None
    n = int(engine.get("cpu_devices", 0)) if engine is not None else 0
    n = n or int(os.environ.get("RAT_JAX_CPU_DEVICES", DEFAULT_CPU_DEVICES))
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backend already initialised (e.g. in a notebook): keep what is there
        pass
