"""Tests for gbjax.models: shapes, the pixel-embedding index formula, modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gbjax import models


def rngs(seed=0):
    # "rbg" keys: threefry random ops take ~15 s each to compile on jax 0.10 CPU.
    return nnx.Rngs(params=jax.random.key(seed, impl="rbg"))


def np_pixel_indices(x, mean, std, scale=1000.0, num_embeddings=2001):
    """Reference: the authors' formula in numpy, float32 arithmetic."""
    half = (num_embeddings - 1) // 2
    z = (np.float32(x) - np.float32(mean)) / np.float32(std) * np.float32(scale)
    return (np.clip(np.trunc(z), -half, half) + half).astype(np.int32)


# ---------------------------------------------------------------- pixel_indices


def test_pixel_indices_edge_values():
    mean, std = 100.0, 50.0
    x = np.array(
        [
            100.0,  # mean -> centre index
            150.0,  # mean + std -> +1000 -> last index
            50.0,  # mean - std -> first index
            125.0,  # +0.5 std -> 1500
            75.0,  # -0.5 std -> 500
            100.04,  # +0.8 -> trunc 0 -> 1000
            99.96,  # -0.8 -> trunc towards zero 0 -> 1000
            100.06,  # +1.2 -> 1001
            99.94,  # -1.2 -> 999
            0.0,
            255.0,  # clip both ends
        ],
        np.float32,
    )
    expect = np.array([1000, 2000, 0, 1500, 500, 1000, 1000, 1001, 999, 0, 2000])
    got = np.asarray(models.pixel_indices(x, mean=mean, std=std))
    np.testing.assert_array_equal(got, expect)
    np.testing.assert_array_equal(got, np_pixel_indices(x, mean, std))
    assert got.dtype == np.int32


@pytest.mark.parametrize(
    "mean,std,scale,n",
    [
        (33.318421, 78.567490, 1000.0, 2001),  # MNIST statistics, paper settings
        (127.5, 127.5, 1000.0, 2001),
        (10.0, 3.0, 10.0, 101),  # small table: heavy clipping
        (200.0, 1.0, 1.0, 2001),
    ],
)
def test_pixel_indices_matches_numpy_all_pixel_values(mean, std, scale, n):
    x = np.arange(256, dtype=np.float32)
    got = np.asarray(models.pixel_indices(x, mean=mean, std=std, scale=scale, num_embeddings=n))
    np.testing.assert_array_equal(got, np_pixel_indices(x, mean, std, scale, n))
    assert got.min() >= 0 and got.max() <= n - 1


def test_pixel_indices_mnist_saturates_above_one_std():
    # METHODS.md: every pixel above mean + 1 std lands on the last index.
    m, s = models.MNIST_MEAN, models.MNIST_STD
    x = np.arange(256, dtype=np.float32)
    idx = np.asarray(models.pixel_indices(x, mean=m, std=s))
    assert np.all(idx[x > m + s] == 2000)
    assert np.all(idx[x < m + s - 1] < 2000)


def test_pixel_indices_rejects_even_table():
    with pytest.raises(ValueError, match="odd"):
        models.pixel_indices(np.zeros(3), mean=0.0, std=1.0, num_embeddings=2000)


# ---------------------------------------------------------------- embedding


def test_pixel_embedding_table_and_dataset_stats():
    emb = models.PixelEmbedding(stats="dataset", mean=40.0, std=80.0, rngs=rngs())
    table = np.asarray(emb.embedding[...])
    assert table.shape == (2001, 64)
    assert table.min() >= -1.0 and table.max() <= 1.0 and table.std() > 0.5
    x = np.random.default_rng(0).integers(0, 256, (3, 5, 5, 1)).astype(np.uint8)
    out = np.asarray(emb(jnp.asarray(x)))
    assert out.shape == (3, 5, 5, 64)
    np.testing.assert_array_equal(out, table[np_pixel_indices(x[..., 0], 40.0, 80.0)])
    # dataset statistics: an image's embedding does not depend on the batch
    np.testing.assert_array_equal(np.asarray(emb(jnp.asarray(x[:1]))), out[:1])


def test_pixel_embedding_batch_stats():
    emb = models.PixelEmbedding(stats="batch", rngs=rngs())
    x = np.random.default_rng(1).integers(0, 256, (4, 6, 6, 1)).astype(np.uint8)
    idx = np.asarray(emb.indices(jnp.asarray(x)))
    xf = x.astype(np.float32)
    ref = np_pixel_indices(xf, xf.mean(), xf.std())
    # float32 reductions may differ in the last bit: allow rare off-by-one
    assert np.mean(idx != ref) < 0.01 and np.max(np.abs(idx - ref)) <= 1
    # the authors' batch statistics make one image's indices depend on the others
    assert not np.array_equal(np.asarray(emb.indices(jnp.asarray(x[:1]))), idx[:1])


def test_uint8_and_unit_float_inputs_agree():
    net = models.PaperConvNet("raw", rngs=rngs())
    x = np.random.default_rng(2).integers(0, 256, (2, 28, 28, 1)).astype(np.uint8)
    a = net(jnp.asarray(x))
    b = net(jnp.asarray(x, jnp.float32) / 255.0)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("kind", ["raw", "normalized", "embedding"])
@pytest.mark.parametrize("stats", ["dataset", "batch"])
def test_paper_convnet_shapes(kind, stats):
    net = models.PaperConvNet(kind, stats=stats, rngs=rngs())
    out = net(jnp.zeros((2, 28, 28, 1), jnp.uint8))
    assert out.shape == (2, 10) and out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))


def test_paper_convnet_layer_shapes():
    net = models.PaperConvNet("embedding", rngs=rngs())
    assert net.conv1.kernel.shape == (3, 3, 64, 64)
    assert net.head.kernel.shape == (7 * 7 * 64, 10)  # flatten 3136 -> 10


def test_bad_model_args():
    with pytest.raises(ValueError, match="kind"):
        models.PaperConvNet("bogus", rngs=rngs())
    with pytest.raises(ValueError, match="stats"):
        models.PixelEmbedding(stats="global", rngs=rngs())


def test_resnet20_forward():
    net = models.ResNet20(10, in_channels=3, rngs=rngs())
    net.eval()
    out = nnx.jit(lambda m, x: m(x))(net, jnp.zeros((2, 32, 32, 3), jnp.uint8))
    assert out.shape == (2, 10) and np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("ctor,size", [(models.ResNet20, 0.27e6), (models.ResNet18, 11.17e6)])
@pytest.mark.parametrize("shape", [(2, 28, 28, 1), (2, 32, 32, 3)])
def test_resnet_shapes_and_sizes(ctor, size, shape):
    # abstract evaluation: shapes without compiling the big networks
    net = nnx.eval_shape(lambda: ctor(10, in_channels=shape[-1], rngs=rngs()))
    n = sum(a.size for a in jax.tree.leaves(nnx.state(net, nnx.Param)))
    assert abs(n - size) / size < 0.01
    net.eval()
    out = nnx.eval_shape(lambda m, x: m(x), net, jax.ShapeDtypeStruct(shape, jnp.float32))
    assert out.shape == (2, 10)


def test_batchnorm_train_eval_modes():
    net = models.ResNet((1,), (8,), 10, in_channels=1, mean=0.0, std=1.0, rngs=rngs())
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 8, 8, 1)), jnp.float32)
    before = np.asarray(net.stem_bn.mean[...]).copy()
    net.eval()
    net(x)
    np.testing.assert_array_equal(np.asarray(net.stem_bn.mean[...]), before)
    net.train()
    net(x)
    assert not np.array_equal(np.asarray(net.stem_bn.mean[...]), before)
