"""Tests for gbjax.noise: definitions, statistics, determinism, jit/vmap, errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gbjax import noise

KEY = jax.random.key(0)
# Every test uses this one shape: compiling random-number code takes about a
# second per program on CPU, so compiled functions must be reused across tests.
SHAPE = (8, 64, 64, 3)  # 98k elements: enough for the statistics below


def _flat_image(value=128):
    return jnp.full(SHAPE, value, jnp.uint8)


def _ramp():
    return jnp.asarray(np.arange(math.prod(SHAPE)).reshape(SHAPE) % 256, jnp.uint8)


# --------------------------------------------------------------------------- #
# Common contract: uint8 in/out, shape, determinism, jit, vmap
# --------------------------------------------------------------------------- #


def _corrupt3(x, k, *, kind):
    return noise.corrupt(x, k, kind=kind, severity=3)


ALL_FUNCS = {
    "gaussian_clip": lambda x, k: noise.gaussian(x, k, std=20.0),
    "gaussian_wrap": lambda x, k: noise.gaussian(x, k, mean=1.0, std=20.0, mode="wrap"),
    "salt_and_pepper": lambda x, k: noise.salt_and_pepper(x, k, amount=0.2),
    "salt_and_pepper_pixel": lambda x, k: noise.salt_and_pepper(
        x, k, amount=0.2, per_channel=False
    ),
    "additive_impulse": lambda x, k: noise.additive_impulse(x, k, p=0.3, v=100),
    **{f"corrupt_{kind}": functools.partial(_corrupt3, kind=kind) for kind in noise.CORRUPTIONS},
}


@pytest.mark.parametrize("fn", ALL_FUNCS.values(), ids=ALL_FUNCS.keys())
def test_contract(fn):
    x = _ramp()
    y = fn(x, KEY)
    assert y.shape == x.shape and y.dtype == jnp.uint8
    np.testing.assert_array_equal(fn(x, KEY), y)  # deterministic per key
    assert not np.array_equal(fn(x, jax.random.key(1)), y)  # key-dependent
    assert not np.array_equal(y, x)  # it did something


def test_jit_of_vmap_matches_eager_calls():
    # One program for all functions (compiles are slow): vmap over a stack of
    # two image batches with their own keys; each slice must equal the eager call.
    x = _ramp()
    xs, keys = jnp.stack([x, x[::-1]]), jnp.stack([KEY, jax.random.key(1)])

    @jax.jit
    def all_vmapped(xs, keys):
        return {name: jax.vmap(fn)(xs, keys) for name, fn in ALL_FUNCS.items()}

    out = all_vmapped(xs, keys)
    for name, fn in ALL_FUNCS.items():
        assert out[name].shape == xs.shape and out[name].dtype == jnp.uint8, name
        for i in range(2):
            np.testing.assert_array_equal(out[name][i], fn(xs[i], keys[i]), err_msg=name)


def test_rbg_keys():
    # rbg keys (much faster to compile on CPU) work too; poisson derives a threefry key
    x = _ramp()
    key = jax.random.key(0, impl="rbg")
    for name in ("gaussian_clip", "corrupt_shot_noise"):
        y = ALL_FUNCS[name](x, key)
        assert y.shape == x.shape and y.dtype == jnp.uint8 and not np.array_equal(y, x), name
        np.testing.assert_array_equal(ALL_FUNCS[name](x, key), y, err_msg=name)


def test_jit_with_traced_parameters():
    x = _ramp()

    @jax.jit
    def f(x, k, std, amount, p, v):
        return (
            noise.gaussian(x, k, std=std, mode="wrap"),
            noise.salt_and_pepper(x, k, amount=amount),
            noise.additive_impulse(x, k, p=p, v=v),
        )

    g, s, a = f(x, KEY, 5.0, 0.1, 0.1, 7)
    np.testing.assert_array_equal(g, noise.gaussian(x, KEY, std=5.0, mode="wrap"))
    np.testing.assert_array_equal(s, noise.salt_and_pepper(x, KEY, amount=0.1))
    np.testing.assert_array_equal(a, noise.additive_impulse(x, KEY, p=0.1, v=7))


# --------------------------------------------------------------------------- #
# Gaussian
# --------------------------------------------------------------------------- #


def test_gaussian_clip_statistics():
    x = _flat_image(128)
    y = noise.gaussian(x, KEY, mean=3.0, std=10.0)
    d = np.asarray(y, np.float64) - 128
    # rounding adds variance 1/12; 98k samples -> SE of mean 0.03, of std 0.02
    assert abs(d.mean() - 3.0) < 0.15
    assert abs(d.std() - math.sqrt(100 + 1 / 12)) < 0.15
    np.testing.assert_array_equal(d, np.round(d))


def test_gaussian_wrap_statistics():
    # Far from 0 and 255, wrap is x + trunc(n): mean shifts by E[trunc(n)].
    x = _flat_image(128)
    y = noise.gaussian(x, KEY, mean=0.0, std=10.0, mode="wrap")
    d = np.asarray(y, np.float64) - 128
    assert abs(d.mean()) < 0.15  # trunc of a symmetric noise is symmetric
    z = np.random.default_rng(0).normal(0, 10, 10**6)
    assert abs(d.std() - np.trunc(z).std()) < 0.15


def _reference(x, key, mean, std):
    z = np.asarray(jax.random.normal(key, x.shape, jnp.float32))
    n = np.float32(mean) + np.float32(std) * z
    x = np.asarray(x, np.int64)
    clip = np.clip(np.round(x + n.astype(np.float64)), 0, 255)
    wrap = (x + np.mod(np.trunc(n).astype(np.int64), 256)) % 256
    # elements whose noise sits within float error of a rounding/truncation edge
    frac = np.abs(n - np.floor(n))
    edge = (np.abs(frac - 0.5) < 1e-4) | (frac < 1e-4) | (frac > 1 - 1e-4)
    return clip, wrap, edge


@pytest.mark.parametrize("mean,std", [(0.0, 30.0), (-20.0, 15.0), (40.0, 80.0)])
def test_gaussian_clip_and_wrap_match_their_definitions(mean, std):
    x = _ramp()
    clip_ref, wrap_ref, edge = _reference(x, KEY, mean, std)
    y_clip = np.asarray(noise.gaussian(x, KEY, mean=mean, std=std, mode="clip"))
    y_wrap = np.asarray(noise.gaussian(x, KEY, mean=mean, std=std, mode="wrap"))
    assert edge.mean() < 1e-3
    np.testing.assert_array_equal(y_clip[~edge], clip_ref[~edge])
    np.testing.assert_array_equal(y_wrap[~edge], wrap_ref[~edge])
    # Where x + n stays inside [0, 255] the modes differ only by round vs trunc (<= 1 level);
    # where it leaves the range, clip saturates and wrap wraps round.
    z = np.asarray(jax.random.normal(KEY, x.shape, jnp.float32))
    s = np.asarray(x, np.float64) + mean + std * z
    inside = (s >= 0.5) & (s <= 254.5) & ~edge
    assert np.abs(y_clip[inside].astype(int) - y_wrap[inside].astype(int)).max() <= 1
    below = (s < -1) & (s > -255) & ~edge  # wraps once
    above = (s > 256) & (s < 510) & ~edge
    assert below.any() and (y_clip[below] == 0).all() and (y_wrap[below] > 0).all()
    if above.any():
        assert (y_clip[above] == 255).all() and (y_wrap[above] < 255).all()


def _tiled(values):
    """An array of SHAPE cycling through ``values`` (reuses the compiled functions)."""
    return jnp.asarray(np.resize(np.asarray(values, np.uint8), SHAPE))


def _check_tiled(y, values, want):
    y = np.asarray(y).ravel()
    np.testing.assert_array_equal(y[: len(values)], want)
    np.testing.assert_array_equal(y, np.resize(np.asarray(want, np.uint8), y.size))


def test_gaussian_exact_small_cases():
    v = [0, 2, 10, 250, 255]
    x = _tiled(v)
    # std=0 makes the noise exactly `mean` (as float32)
    _check_tiled(noise.gaussian(x, KEY, mean=-3.7, std=0.0), v, [0, 0, 6, 246, 251])
    _check_tiled(
        noise.gaussian(x, KEY, mean=-3.7, std=0.0, mode="wrap"), v, [253, 255, 7, 247, 252]
    )
    _check_tiled(noise.gaussian(x, KEY, mean=300.0, std=0.0), v, [255] * 5)
    _check_tiled(
        noise.gaussian(x, KEY, mean=300.0, std=0.0, mode="wrap"), v, (np.array(v) + 300) % 256
    )
    # |n| < 1 truncates to 0: wrap leaves the pixel alone
    _check_tiled(noise.gaussian(x, KEY, mean=-0.9, std=0.0, mode="wrap"), v, v)
    # huge noise must not hit an undefined float->int cast
    big = np.float32(3e9 + 7)
    _check_tiled(
        noise.gaussian(x, KEY, mean=big, std=0.0, mode="wrap"), v, (np.array(v) + int(big)) % 256
    )


@settings(max_examples=25, deadline=None)
@given(
    x=st.lists(st.integers(0, 255), min_size=6, max_size=6),
    mean=st.floats(-1e6, 1e6, width=32),
)
def test_gaussian_wrap_with_zero_std_is_modular_addition(x, mean):
    y = noise.gaussian(_tiled(x), KEY, mean=mean, std=0.0, mode="wrap")
    _check_tiled(y, x, (np.asarray(x, np.int64) + int(np.trunc(np.float32(mean)))) % 256)


# --------------------------------------------------------------------------- #
# Salt and pepper, additive impulse
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("amount,svp", [(0.05, 0.5), (0.3, 0.2), (0.7, 0.9)])
def test_salt_and_pepper_fractions(amount, svp):
    x = _flat_image(128)
    y = np.asarray(noise.salt_and_pepper(x, KEY, amount=amount, salt_vs_pepper=svp))
    n = y.size
    assert set(np.unique(y)) <= {0, 128, 255}
    hit = y != 128
    tol = 5 * math.sqrt(amount * (1 - amount) / n)
    assert abs(hit.mean() - amount) < tol
    assert abs((y[hit] == 255).mean() - svp) < 5 * math.sqrt(svp * (1 - svp) / hit.sum())


def test_salt_and_pepper_whole_pixels():
    x = _flat_image(128)
    y = np.asarray(noise.salt_and_pepper(x, KEY, amount=0.2, per_channel=False))
    assert (y == y[..., :1]).all()  # channels move together
    assert abs((y[..., 0] != 128).mean() - 0.2) < 0.01


def test_salt_and_pepper_edges():
    x = _ramp()
    np.testing.assert_array_equal(noise.salt_and_pepper(x, KEY, amount=0.0), x)
    np.testing.assert_array_equal(
        noise.salt_and_pepper(x, KEY, amount=1.0, salt_vs_pepper=1.0), 255
    )
    np.testing.assert_array_equal(noise.salt_and_pepper(x, KEY, amount=1.0, salt_vs_pepper=0.0), 0)


@pytest.mark.parametrize("v", [100, -30, 300])
def test_additive_impulse(v):
    x = _ramp()
    y = np.asarray(noise.additive_impulse(x, KEY, p=0.25, v=v)).astype(np.int64)
    x = np.asarray(x, np.int64)
    hit = y != x
    assert abs(hit.mean() - 0.25) < 0.02
    np.testing.assert_array_equal(y[hit], (x[hit] + v) % 256)
    np.testing.assert_array_equal(
        noise.additive_impulse(jnp.asarray(x, jnp.uint8), KEY, p=1.0, v=256), x
    )
    np.testing.assert_array_equal(
        noise.additive_impulse(jnp.asarray(x, jnp.uint8), KEY, p=0.0, v=5), x
    )


# --------------------------------------------------------------------------- #
# CIFAR-10-C corruptions
# --------------------------------------------------------------------------- #


def test_corrupt_gaussian_matches_reference_and_grows_with_severity():
    x = _ramp()
    stds = []
    for s, c in enumerate(noise.CIFAR10C_PARAMS["gaussian_noise"], 1):
        y = np.asarray(noise.corrupt(x, KEY, kind="gaussian_noise", severity=s)).astype(int)
        z = np.asarray(jax.random.normal(KEY, x.shape, jnp.float32), np.float64)
        ref = np.uint8(np.clip(np.asarray(x) / 255.0 + c * z, 0, 1) * 255).astype(
            int
        )  # make_cifar_c.py
        assert (np.abs(y - ref) <= 1).all() and (y == ref).mean() > 0.999
        mid = (np.asarray(x) > 80) & (np.asarray(x) < 175)  # no clipping here
        d = (y - np.asarray(x))[mid]
        assert abs(d.std() - c * 255) < 0.03 * c * 255
        stds.append(d.std())
    assert stds == sorted(stds)


def test_corrupt_shot_noise_statistics():
    x = _flat_image(128)
    for s, c in enumerate(noise.CIFAR10C_PARAMS["shot_noise"], 1):
        y = np.asarray(noise.corrupt(x, KEY, kind="shot_noise", severity=s), np.float64)
        lam = 128 / 255 * c
        # Poisson(lam) / c * 255, truncated: mean about x - 0.5, std sqrt(lam) / c * 255
        assert abs(y.mean() - (128 - 0.5)) < 0.3
        assert abs(y.std() - math.sqrt(lam) / c * 255) < 0.03 * math.sqrt(lam) / c * 255


def test_corrupt_speckle_matches_reference_and_is_multiplicative():
    x = _ramp()
    for s, c in enumerate(noise.CIFAR10C_PARAMS["speckle_noise"], 1):
        y = np.asarray(noise.corrupt(x, KEY, kind="speckle_noise", severity=s)).astype(int)
        z = np.asarray(jax.random.normal(KEY, x.shape, jnp.float32), np.float64)
        x01 = np.asarray(x) / 255.0
        ref = np.uint8(np.clip(x01 + x01 * c * z, 0, 1) * 255).astype(int)  # make_cifar_c.py
        assert (np.abs(y - ref) <= 1).all() and (y == ref).mean() > 0.999
    # black stays black (the noise scales with the pixel), unlike Gaussian noise
    black = jnp.zeros((4, 8, 8, 3), jnp.uint8)
    assert int(jnp.max(noise.corrupt(black, KEY, kind="speckle_noise", severity=5))) == 0


def test_corrupt_impulse_is_salt_and_pepper():
    x = _ramp()
    for s, c in enumerate(noise.CIFAR10C_PARAMS["impulse_noise"], 1):
        np.testing.assert_array_equal(
            noise.corrupt(x, KEY, kind="impulse_noise", severity=s),
            noise.salt_and_pepper(x, KEY, amount=c),
        )


def test_cifar10c_parameters_are_the_published_ones():
    assert noise.CIFAR10C_PARAMS == {
        "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
        "shot_noise": (500, 250, 100, 75, 50),
        "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
        "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),
    }


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "call,arg",
    [
        (lambda x: noise.gaussian(x, KEY, std=-1.0), "std"),
        (lambda x: noise.gaussian(x, KEY, std=float("nan")), "std"),
        (lambda x: noise.gaussian(x, KEY, mean=float("inf"), std=1.0), "mean"),
        (lambda x: noise.gaussian(x, KEY, std=1.0, mode="reflect"), "mode"),
        (lambda x: noise.salt_and_pepper(x, KEY, amount=1.5), "amount"),
        (lambda x: noise.salt_and_pepper(x, KEY, amount=-0.1), "amount"),
        (lambda x: noise.salt_and_pepper(x, KEY, amount=0.1, salt_vs_pepper=2), "salt_vs_pepper"),
        (lambda x: noise.additive_impulse(x, KEY, p=1.1, v=3), "p"),
        (lambda x: noise.additive_impulse(x, KEY, p=0.1, v=2.5), "v"),
        (lambda x: noise.corrupt(x, KEY, kind="gaussian_noise", severity=0), "severity"),
        (lambda x: noise.corrupt(x, KEY, kind="gaussian_noise", severity=6), "severity"),
        (lambda x: noise.corrupt(x, KEY, kind="gaussian_noise", severity=2.0), "severity"),
        (lambda x: noise.corrupt(x, KEY, kind="fog", severity=1), "kind"),
        (lambda x: noise.gaussian(x.astype(jnp.float32), KEY, std=1.0), "x"),
    ],
)
def test_bad_parameters_raise_value_error_naming_the_argument(call, arg):
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        call(_ramp())
