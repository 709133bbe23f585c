"""Tests for gbjax.data.batching: fixed-shape batches and map_batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gbjax import attacks
from gbjax._batching import row_bucket_size
from gbjax.data import fixed_batches, map_batches
from gbjax.data.batching import bucket_size


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


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 3000), b=st.integers(1, 300), q=st.sampled_from([1, 8, 16, 32]))
def test_bucket_size_with_quantum_pads_little_in_the_fewest_batches(n, b, q):
    size = bucket_size(n, b, minimum=q, quantum=q)
    k = -(-n // size)
    assert q <= size <= b or size == b  # never above batch_size
    assert k == -(-n // b)  # as few batches as batch_size allows
    if size < b:
        assert size % q == 0
        assert k * size - n < k * q  # under one quantum of padding per batch
    # the pow-2 default is unchanged
    assert bucket_size(n, b) == min(b, max(32, 1 << (n - 1).bit_length()))


def test_row_bucket_size_is_near_equal_on_cpu_and_pow2_elsewhere(monkeypatch):
    assert row_bucket_size(813, 250) == 208  # CPU (the test machine)
    assert row_bucket_size(130, 250) == 144
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert row_bucket_size(813, 250) == 250
    assert row_bucket_size(130, 250) == 250
    assert row_bucket_size(100, 250) == 128


def test_attack_loops_batch_still_robust_rows_near_equally():
    """130 rows at batch <= 250: one batch of 144 rows (pow-2 buckets: 250)."""
    shapes = set()

    def logits(x):
        shapes.add(x.shape[0])  # at trace time: one entry per compiled batch shape
        v = x.mean((1, 2, 3))[:, None]
        return jnp.concatenate([v, 1 - v], axis=1)

    x = np.full((130, 2, 2, 1), 0.2, np.float32)
    y = np.ones(130, np.int32)  # class 1 (logit 0.8) at every pixel value near 0.2
    res = attacks.accuracy_under_attack(
        logits, x, y, eps_list=[0.01], attack="pgd", steps=2, batch_size=250,
        key=jax.random.key(0), progress=False,
    )  # fmt: skip
    # (130: the input checks call the function once on the set as given)
    assert shapes - {130} == {144}
    np.testing.assert_allclose(res, [1.0])


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 1000), b=st.integers(16, 300), cur=st.integers(16, 300))
def test_row_bucket_size_keeps_the_current_size_while_it_pads_little(n, b, cur):
    size = row_bucket_size(n, b, current=cur)
    fresh = row_bucket_size(n, b)
    k = -(-n // size)
    assert size <= b and k == -(-n // b)  # never above batch_size, never more batches
    if size != fresh:  # kept: the size used last, padding at most a quarter
        assert size == cur and 4 * (k * size - n) <= k * size


def test_row_bucket_size_shrinking_set_compiles_few_sizes():
    """A set falling from 250 to 1 row one at a time: pow-2 buckets use 4 sizes; the
    near-equal sizes without memory would use 16; with it 10, none padding more than a
    quarter of its rows unless the fresh size does."""
    sizes, bs = [], None
    for n in range(250, 0, -1):
        bs = row_bucket_size(n, 250, current=bs)
        assert 4 * (bs - n) <= bs or bs == row_bucket_size(n, 250)  # else a fresh size
        sizes.append(bs)
    assert len(set(sizes)) == 10
    assert len({row_bucket_size(n, 250) for n in range(1, 251)}) == 16


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.data(), st.booleans())
def test_shrinking_keeps_exactly_the_alive_rows_in_fewer_slots(batch, data, on_cpu):
    from gbjax._batching import CPU_QUANTUM, Shrinking

    rows = Shrinking(batch, on_cpu=on_cpu)
    alive = np.asarray(data.draw(st.lists(st.booleans(), min_size=batch, max_size=batch)))
    if not alive.any():
        with pytest.raises(ValueError, match="alive"):
            rows.keep(alive)
        return
    sel = rows.keep(alive)
    r = int(alive.sum())
    if sel is None:  # kept: the smaller size would not save enough
        assert rows.pos.tolist() == list(range(batch))
        size = rows.size_for(r)
        assert size == batch
        return
    assert set(sel.tolist()) == set(np.flatnonzero(alive).tolist())  # every alive row, no other
    assert sel[:r].tolist() == np.flatnonzero(alive).tolist()  # in order, then padding
    assert rows.pos.tolist() == sel.tolist()  # the first batch's positions
    n = len(sel)
    if on_cpu:
        assert 4 * n <= 3 * batch
        assert n == (1 << (r - 1).bit_length() if r < CPU_QUANTUM else -(-r // 16) * 16)
    else:
        assert 2 * n <= batch and n == 1 << (r - 1).bit_length()
    # a second shrink maps through the first
    alive2 = np.zeros(n, bool)
    alive2[0] = True
    sel2 = rows.keep(alive2)
    if sel2 is not None:
        assert rows.pos.tolist() == [int(np.flatnonzero(alive)[0])] * len(sel2)


def test_shrinking_refuses_a_wrong_shape():
    from gbjax._batching import Shrinking

    with pytest.raises(ValueError, match="shape"):
        Shrinking(8).keep(np.ones(4, bool))
