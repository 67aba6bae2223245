"""Experiment configs, one module per experiment, each exposing `get_config(arg=None)` (arg: the
variant after the colon of `--config=configs/NAME.py:VARIANT`); `common` holds the shared pieces.

A package, as flax's and big_vision's configs are: a config imports `from configs import common`,
so the folder holding configs/ must be on the import path: `python -m rat_jax.main` and
`python -m rat_jax.status` put it there for the config file they are given (whatever the working
directory), pytest.ini does for the tests; your own scripts set PYTHONPATH.
"""
