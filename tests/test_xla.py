"""gbjax._xla: compiled-code mapping relief (a long attack sweep once hit vm.max_map_count)."""

import sys

import jax
import jax.numpy as jnp
import pytest

from gbjax import _xla

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@linux
def test_map_counts_are_read():
    n, cap = _xla._map_counts()
    assert 0 < n < cap


@linux
def test_relieve_clears_caches_only_above_the_fraction():
    f = jax.jit(lambda x: jnp.sin(x) * 3)
    f(jnp.ones(3))
    assert f._cache_size() == 1
    assert not _xla.relieve_map_pressure(1.0)  # far below the cap: nothing happens
    assert f._cache_size() == 1
    assert _xla.relieve_map_pressure(0.0)  # any count is above 0: caches cleared
    assert f._cache_size() == 0
    f(jnp.ones(3))  # and it compiles again
    assert f._cache_size() == 1


@linux
def test_clearing_unmaps_compiled_code():
    _xla.relieve_map_pressure(0.0)
    before = _xla._map_counts()[0]
    fs = [jax.jit(lambda x, i=i: jnp.cumsum(x * i) @ x) for i in range(30)]
    for f in fs:
        f(jnp.ones(64))
    grown = _xla._map_counts()[0]
    assert grown > before + 30  # compiled code is mapped in
    assert _xla.relieve_map_pressure(0.0)
    after = _xla._map_counts()[0]
    assert after <= before + (grown - before) // 2  # most of the growth is gone


def test_no_counts_is_a_no_op(monkeypatch):
    monkeypatch.setattr(_xla, "_map_counts", lambda: None)
    assert not _xla.relieve_map_pressure(0.0)
