"""rat_jax: Model Ratatouille in JAX/Flax. The functional API is importable from here."""
__version__ = "0.1.0"

import sys as _sys
import types as _types

from rat_jax import api as _api
from rat_jax.api import *  # noqa: F401,F403
from rat_jax.api import __all__  # noqa: F401


class _TrainPackage(_types.ModuleType):
    """`rat_jax.train` is both the API function (`rat_jax.train(ds, inits, hparams, ...)`, i.e.
    rat_jax.api.train) and the training subpackage (`rat_jax.train.members`, `import
    rat_jax.train.members as members`): the package module, callable."""

    def __call__(self, *args, **kwargs):
        return _api.train(*args, **kwargs)

    __call__.__doc__ = _api.train.__doc__


_train_package = _sys.modules["rat_jax.train"]  # imported by rat_jax.api
_train_package.__class__ = _TrainPackage
_train_package.__wrapped__ = _api.train  # inspect.signature(rat_jax.train) is the function's
train = _train_package
