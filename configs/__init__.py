"""Experiment configs, one module per experiment, each exposing `get_config(arg=None)` (arg: the
variant after the colon of `--config=configs/NAME.py:VARIANT`); `common` holds the shared pieces.

A package, as flax's and big_vision's configs are: a config imports `from configs import common`,
so the repository root must be on the import path. `python -m rat_jax.main` run from the
repository root puts it there, pytest.ini does for the tests; from elsewhere, set PYTHONPATH.
"""
