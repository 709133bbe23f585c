"""Tests for gbjax.data.batching: fixed-shape batches and map_batches."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gbjax.data import fixed_batches, map_batches


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 40), b=st.integers(1, 50))
def test_fixed_batches_cover_everything_once_with_one_shape(n, b):
    batches = list(fixed_batches(n, b))
    bs = min(b, n)
    assert all(len(x.index) == bs for x in batches)
    real = np.concatenate([x.index[x.mask] for x in batches])
    np.testing.assert_array_equal(real, np.arange(n))
    assert all(x.mask[: x.valid].all() and not x.mask[x.valid :].any() for x in batches)
    assert all(((x.index >= 0) & (x.index < n)).all() for x in batches)  # padding is valid data


@pytest.mark.parametrize("device", [False, True])
def test_map_batches_matches_whole_array_and_compiles_one_shape(device):
    x = np.arange(23 * 2, dtype=np.float32).reshape(23, 2)
    y = np.arange(23)
    arrays = (jnp.asarray(x), jnp.asarray(y)) if device else (x, y)
    shapes = set()

    def fn(batch):
        xb, yb = batch
        shapes.add(xb.shape)
        return {"s": xb.sum(-1), "y": yb * 2}

    out = map_batches(fn, arrays, batch_size=5)
    assert shapes == {(5, 2)}
    np.testing.assert_array_equal(np.asarray(out["s"]), x.sum(-1))
    np.testing.assert_array_equal(np.asarray(out["y"]), y * 2)


def test_map_batches_rejects_bad_input():
    with pytest.raises(ValueError, match="leading axis"):
        map_batches(lambda b: b, (np.zeros(3), np.zeros(4)), batch_size=2)
    with pytest.raises(ValueError, match="empty"):
        map_batches(lambda b: b, np.zeros((0, 2)), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        list(fixed_batches(3, 0))
