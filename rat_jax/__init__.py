"""rat_jax: Model Ratatouille in JAX/Flax. The functional API is importable from here."""
__version__ = "0.1.0"

from rat_jax.api import *  # noqa: F401,F403
from rat_jax.api import __all__  # noqa: F401
