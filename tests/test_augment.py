"""Tests for gbjax.augment: translation, flips, airbench's alternating flip and TTA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gbjax import augment

RNG = np.random.default_rng(0)


def _crops(img, pad, mode):
    h, w = img.shape[:2]
    p = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode=mode)
    return [p[a : a + h, b : b + w] for a in range(2 * pad + 1) for b in range(2 * pad + 1)]


@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_random_translate_is_some_padded_crop(mode):
    x = RNG.integers(0, 256, (12, 6, 7, 2)).astype(np.uint8)
    f = jax.jit(augment.random_translate, static_argnames=("pad", "mode"))
    y = np.asarray(f(jax.random.key(1), jnp.asarray(x), 2, mode=mode))
    assert y.shape == x.shape and y.dtype == np.uint8
    for i in range(len(x)):
        assert any(np.array_equal(y[i], c) for c in _crops(x[i], 2, mode))
    # different images get different offsets
    assert sum(np.array_equal(y[i], x[i]) for i in range(len(x))) < len(x)
    np.testing.assert_array_equal(augment.random_translate(jax.random.key(1), x, 0), x)
    with pytest.raises(ValueError, match="pad"):
        augment.random_translate(jax.random.key(1), x, -1)
    with pytest.raises(ValueError, match="reflect"):
        augment.random_translate(jax.random.key(1), x, 6)


def test_random_crop_flip():
    key = jax.random.key(0)
    x = jnp.asarray(RNG.integers(0, 256, (16, 6, 7, 2)), jnp.uint8)
    f = jax.jit(augment.random_crop_flip, static_argnames=("pad", "flip"))
    y = np.asarray(f(key, x, pad=2))
    assert y.shape == x.shape and y.dtype == np.uint8
    np.testing.assert_array_equal(f(key, x, pad=2), y)
    flips = 0
    for i in range(len(x)):  # each output is some crop of the zero-padded image, maybe mirrored
        crops = _crops(np.asarray(x[i]), 2, "constant")
        plain = any(np.array_equal(y[i], c) for c in crops)
        mirrored = any(np.array_equal(y[i], c[:, ::-1]) for c in crops)
        assert plain or mirrored
        flips += mirrored and not plain
    assert 0 < flips < len(x)
    np.testing.assert_array_equal(augment.random_crop_flip(key, x, pad=0, flip=False), x)
    with pytest.raises(ValueError, match="pad"):
        augment.random_crop_flip(key, x, pad=-1)


def test_alternating_flip_is_deterministic_and_flips_every_image_on_odd_epochs():
    x = RNG.integers(0, 256, (32, 4, 5, 3)).astype(np.uint8)
    base = np.asarray(jax.random.bernoulli(jax.random.key(3), 0.5, (32,)))
    assert 0 < base.sum() < 32
    f = jax.jit(augment.alternating_flip)
    even = [np.asarray(f(x, base, e)) for e in (0, 2, 4)]
    odd = [np.asarray(f(x, base, e)) for e in (1, 3)]
    for a in even[1:]:
        np.testing.assert_array_equal(a, even[0])  # deterministic per epoch parity
    np.testing.assert_array_equal(odd[0], odd[1])
    for i in range(32):
        want_even = x[i, :, ::-1] if base[i] else x[i]
        np.testing.assert_array_equal(even[0][i], want_even)
        # on odd epochs every image is the mirror of its even-epoch self
        np.testing.assert_array_equal(odd[0][i], even[0][i][:, ::-1])


@pytest.mark.parametrize("level", augment.TTA_LEVELS)
def test_tta_equals_the_weighted_mean_of_its_views(level):
    x = jnp.asarray(RNG.random((3, 6, 6, 2)), jnp.float32)
    w = jnp.asarray(RNG.normal(size=(6 * 6 * 2, 4)), jnp.float32)

    def logits(v):
        return v.reshape(v.shape[0], -1) @ w

    views = augment.tta_views(x, level)
    assert len(views) == {"none": 1, "flip": 2, "flip_translate": 6}[level]
    assert sum(wt for wt, _ in views) == pytest.approx(1.0)
    want = sum(wt * logits(v) for wt, v in views)
    np.testing.assert_allclose(augment.tta_logits(logits, x, level), want, rtol=1e-6, atol=1e-6)
    if level == "flip_translate":
        xn = np.asarray(x)
        pad = np.pad(xn, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
        down_right = pad[:, 0:6, 0:6]  # content moved by +1 px (airbench's [0:32, 0:32])
        up_left = pad[:, 2:8, 2:8]
        got = [np.asarray(v) for _, v in views]
        np.testing.assert_array_equal(got[2], down_right)
        np.testing.assert_array_equal(got[3], down_right[:, :, ::-1])
        np.testing.assert_array_equal(got[4], up_left)
        np.testing.assert_array_equal(got[5], up_left[:, :, ::-1])
        assert [wt for wt, _ in views] == [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    with pytest.raises(ValueError, match="tta level"):
        augment.tta_views(x, "rotate")
