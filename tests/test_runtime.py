"""CPU XLA flags set before JAX starts, and the engine.data_parallel setting."""
import pytest

from rat_jax import pipeline, runtime


def test_cpu_xla_flags_added_once_and_user_flags_win(monkeypatch):
    monkeypatch.delenv("RAT_JAX_CPU_YNN", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    assert runtime.configure_cpu_xla_flags() == "--xla_cpu_enable_fast_math=false"  # XLA's default
    monkeypatch.setenv("RAT_JAX_CPU_YNN", "0")
    flags = runtime.configure_cpu_xla_flags()
    assert flags == "--xla_cpu_enable_fast_math=false --xla_cpu_experimental_ynn_fusion_type="
    assert runtime.configure_cpu_xla_flags() == flags  # idempotent
    # a user's own value of the flag is kept as is
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
    assert runtime.configure_cpu_xla_flags() == "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
    # RAT_JAX_CPU_YNN=1 (or unset) leaves XLA's defaults alone
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("RAT_JAX_CPU_YNN", "1")
    assert runtime.configure_cpu_xla_flags() == ""


def test_data_parallel_setting():
    assert pipeline._data_parallel("auto") is None
    assert pipeline._data_parallel("on") is True
    assert pipeline._data_parallel("off") is False
    assert pipeline._data_parallel(True) is True
    with pytest.raises(ValueError, match="engine.data_parallel"):
        pipeline._data_parallel("sometimes")
