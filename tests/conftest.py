"""Test set-up: rat_jax's CPU settings and 8 emulated CPU devices, before any JAX device use."""
import importlib.util
import pathlib

import jax
import pytest

from rat_jax import runtime

runtime.configure_cpu_xla_flags("auto")  # the process-wide XLA:CPU flags of the default settings
runtime.apply_mallopt()  # `make test` starts pytest with the malloc tunables; a bare pytest gets these
jax.config.update("jax_num_cpu_devices", 8)
# XLA's persistent cache, as the CLI and notebooks use it ($RAT_JAX_COMPILE_CACHE or
# ~/.cache/rat_jax/xla): the tests compile the same programs as each other (pipelines rebuilt per
# test, the CLI subprocesses) and as the last run; a hit skips XLA's compile, not the tracing.
runtime.enable_compilation_cache()

REPO = pathlib.Path(__file__).resolve().parents[1]
PACS_ROOT = REPO.parent / "shared" / "datasets" / "PACS"


@pytest.fixture
def pacs_root():
    """The real PACS dataset beside the repo; tests using it skip when it is absent."""
    if not PACS_ROOT.is_dir():
        pytest.skip(f"PACS not found at {PACS_ROOT}")
    return PACS_ROOT


def load_script(path: pathlib.Path, name: str | None = None):
    """A script that is not a package module (launch/*.py), imported from its path."""
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
