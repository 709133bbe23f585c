"""gbjax._random returns exactly what jax.random returns, for every key kind."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gbjax import _random

KINDS = ("threefry", "raw", "rbg")


def _keys(seed):
    return (
        jax.random.key(seed),
        jax.random.PRNGKey(seed),  # a legacy uint32 key: the default threefry
        jax.random.key(seed, impl="rbg"),
    )


def _per_row(shape, lo, hi):
    """A parameter that broadcasts against ``shape`` (one value per leading row)."""
    rows = jnp.linspace(lo, hi, shape[0], dtype=jnp.float32)
    return rows.reshape((shape[0],) + (1,) * (len(shape) - 1))


@jax.jit
def _pairs(keys, shape_of):
    """(ours, jax.random's) for every draw and key kind, in one program (each eager
    draw would compile a program of its own)."""
    shape = shape_of.shape
    out = {}
    for kind, key in zip(KINDS, keys):
        out[kind, "uniform"] = (
            _random.uniform(key, shape, jnp.float32, -2.0, 3.0),
            jax.random.uniform(key, shape, jnp.float32, -2.0, 3.0),
        )
        out[kind, "normal"] = (_random.normal(key, shape), jax.random.normal(key, shape))
        out[kind, "bernoulli"] = (
            _random.bernoulli(key, 0.3, shape),
            jax.random.bernoulli(key, 0.3, shape),
        )
        out[kind, "randint"] = (
            _random.randint(key, shape, -3, 40),
            jax.random.randint(key, shape, -3, 40),
        )
        if shape and shape[0]:  # parameters that broadcast: per-image budgets, rates
            lo, hi = -_per_row(shape, 0.1, 0.5), _per_row(shape, 0.1, 0.5)
            p, top = _per_row(shape, 0.0, 1.0), _per_row(shape, 2, 9).astype(jnp.int32)
            out[kind, "uniform per row"] = (
                _random.uniform(key, shape, jnp.float32, lo, hi),
                jax.random.uniform(key, shape, jnp.float32, lo, hi),
            )
            out[kind, "bernoulli per row"] = (
                _random.bernoulli(key, p, shape),
                jax.random.bernoulli(key, p, shape),
            )
            out[kind, "randint per row"] = (
                _random.randint(key, shape, 0, top),
                jax.random.randint(key, shape, 0, top),
            )
    return out


@pytest.mark.parametrize(
    "shape, partitionable",
    [((), True), ((5,), True), ((6, 1, 1, 3), True), ((2, 0, 3), True), ((2, 3, 4, 2), False)],
)
def test_draws_equal_jax_random(shape, partitionable):
    """Every draw the package makes, the shapes it draws (an image batch, a mask per
    image and channel, an empty batch), in both of threefry's modes."""
    old = jax.config.jax_threefry_partitionable
    jax.config.update("jax_threefry_partitionable", partitionable)
    try:
        pairs = _pairs(_keys(len(shape)), jnp.zeros(shape, jnp.int8))
    finally:
        jax.config.update("jax_threefry_partitionable", old)
    assert len(pairs) == (7 if shape and shape[0] else 4) * len(KINDS)
    for (kind, name), (ours, theirs) in pairs.items():
        assert ours.shape == theirs.shape == shape, (kind, name)
        assert ours.dtype == theirs.dtype, (kind, name)
        np.testing.assert_array_equal(ours, theirs, err_msg=f"{kind} {name} {shape}")


def test_equal_under_vmap_and_grad():
    shape = (4, 3, 2)

    def ours(key, s):
        return s * _random.uniform(key, shape, jnp.float32, -1.0, 1.0)

    def theirs(key, s):
        return s * jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)

    @jax.jit
    def both(keys):
        return [
            (
                jax.vmap(f, in_axes=(0, None))(keys, 2.0),
                jax.jacfwd(lambda s, f=f: f(keys[1], s))(1.5),
            )
            for f in (ours, theirs)
        ]

    (a, da), (b, db) = both(jax.random.split(jax.random.key(0), 5))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(da, db)


def test_flat_draw_compiles_to_a_one_axis_program():
    """The point of the module: a threefry draw of several axes becomes one of one axis
    (checked in the lowered program, not by timing), and other keys keep their draw."""
    shape = (8, 4, 4, 3)
    text = jax.jit(lambda k: _random.uniform(k, shape)).lower(jax.random.key(0)).as_text()
    assert "iota" in text and "tensor<384xui32>" in text
    assert "tensor<8x4x4x3xui32>" not in text
    plain = jax.jit(lambda k: jax.random.uniform(k, shape)).lower(jax.random.key(0)).as_text()
    assert "tensor<8x4x4x3xui32>" in plain  # jax.random draws over the shape itself
    rbg = jax.jit(lambda k: _random.uniform(k, shape)).lower(jax.random.key(0, impl="rbg"))
    assert "tensor<8x4x4x3xui32>" in rbg.as_text()
