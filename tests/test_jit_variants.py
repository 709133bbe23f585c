"""jit and non-jit calls give the same results (chex variants), with chex shape checks.

``gb_cluster`` runs a different Python path under ``jit`` (traced input: no
chunking, no value checks) than eagerly (validated, chunked, compiled per
chunk); the attacks likewise take the traced path inside a user's ``jit``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

import gbjax
from gbjax import attacks


def _images(seed, n=3, size=8):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, 3)).astype(np.float32)
    x[0, :4] = 200.0  # some structure: a flat block
    return x / 255.0


class GBVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_gb_cluster_float_images(self):
        x = _images(0)

        @self.variant
        def cluster(v):
            r = gbjax.gb_cluster(v, threshold=20.0, purity=0.9, capacity=32, scale=255.0)
            return r.labels, r.image, r.n_balls

        labels, image, n_balls = cluster(x)
        ref = gbjax.gb_cluster(x, threshold=20.0, purity=0.9, capacity=32, scale=255.0)
        chex.assert_shape(labels, (3, 8, 8))
        chex.assert_shape(image, x.shape)
        np.testing.assert_array_equal(labels, ref.labels)
        np.testing.assert_array_equal(n_balls, ref.n_balls)
        np.testing.assert_allclose(image, ref.image, rtol=0, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gb_defence_and_its_gradient(self):
        x = jnp.asarray(_images(1))
        g = gbjax.GB(threshold=20.0, capacity=32)

        @self.variant
        def value_and_grad(v):
            return jax.value_and_grad(lambda u: jnp.sum(g(u) ** 2))(v)

        val, grad = value_and_grad(x)
        ref_val, ref_grad = jax.value_and_grad(lambda u: jnp.sum(g(u) ** 2))(x)
        chex.assert_trees_all_close((val, grad), (ref_val, ref_grad), rtol=1e-5, atol=1e-6)
        chex.assert_tree_all_finite(grad)


def _linear(seed=0):
    w = jax.random.normal(jax.random.key(seed), (8 * 8 * 3, 4))
    return Partial(lambda w, v: v.reshape(v.shape[0], -1) @ w, w)


class AttackVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_fgsm(self):
        fn, x, y = _linear(), jnp.asarray(_images(2)), jnp.array([0, 1, 2])
        out = self.variant(lambda v: attacks.fgsm(fn, v, y, eps=0.03))(x)
        chex.assert_trees_all_close(out, attacks.fgsm(fn, x, y, eps=0.03), atol=1e-6)
        chex.assert_shape(out, x.shape)

    @chex.variants(with_jit=True, without_jit=True)
    def test_pgd(self):
        fn, x, y = _linear(1), jnp.asarray(_images(3)), jnp.array([3, 1, 0])
        kw = dict(eps=0.03, step_size=0.01, steps=3, key=jax.random.key(0))
        out = self.variant(lambda v: attacks.pgd(fn, v, y, **kw))(x)
        chex.assert_trees_all_close(out, attacks.pgd(fn, x, y, **kw), atol=1e-6)
        assert float(jnp.abs(out - x).max()) <= 0.03 + 1e-6
