import pytest

from selfspec_vllm_cpu.state import reset


@pytest.fixture
def fresh_state():
    """The plugin's per-process state (selfspec_vllm_cpu/state.py), empty for one test."""
    reset()
    yield
    reset()
