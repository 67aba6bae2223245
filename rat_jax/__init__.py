"""rat_jax: Model Ratatouille in JAX/Flax.

The functional API (`rat_jax.api`, listed in its `__all__`) is importable from here:
`import rat_jax as rj; rj.train(...)`. It loads on first use, so `import rat_jax.runtime` (process
set-up that must run before JAX starts) does not import JAX. The training engine is the
subpackage `rat_jax.engine`.
"""
__version__ = "0.1.0"

import importlib as _importlib
import importlib.util as _importlib_util


def __getattr__(name):
    if name.startswith("__") and name != "__all__":  # module protocol probes: no API import
        raise AttributeError(f"module 'rat_jax' has no attribute {name!r}")
    if _importlib_util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: `from rat_jax
        return _importlib.import_module(f"{__name__}.{name}")       # import x` must not load the API
    api = _importlib.import_module("rat_jax.api")
    if name == "__all__":
        return list(api.__all__)
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'rat_jax' has no attribute {name!r}")


def __dir__():
    api = _importlib.import_module("rat_jax.api")
    return sorted(set(globals()) | set(api.__all__))
