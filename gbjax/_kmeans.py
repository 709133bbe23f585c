"""k-means colour quantisation: the one k-means of gbjax.

Used by the CLI's ``--compare`` figure (the baseline the GB paper compares
against, its Fig. 3, through :func:`kmeans_quantize`) and by the
:class:`gbjax.defences.KMeans` defence. Plain Lloyd iterations on colour
features, with one of two initialisations:

* :func:`init_quantiles` (deterministic, no key): the pixels at evenly spaced
  ranks ``floor((2 i + 1) N / (2 k))``, ``i = 0..k-1``, of the pixels sorted
  (stably) by the sum of their channels;
* :func:`init_kmeanspp`: k-means++ seeding with an explicit PRNG key.

:func:`lloyd` runs a fixed number of iterations (assign each pixel to its
nearest centre, then move each centre to the mean of its pixels; a centre that
loses all its pixels stays where it is) and returns the centres and the labels
assigned to them. Everything is jittable and vmappable; the gradient of the
centres w.r.t. the pixels is that of the cluster means with the assignment held
fixed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gbjax._checks import check_int

__all__ = ["init_quantiles", "init_kmeanspp", "lloyd", "kmeans_quantize"]


def init_quantiles(x_NF, k: int):
    """``k`` initial centres: pixels at evenly spaced ranks of the channel sum (deterministic)."""
    N = x_NF.shape[0]
    order = jnp.argsort(jax.lax.stop_gradient(jnp.sum(x_NF, -1)), stable=True)
    ranks = (2 * np.arange(k) + 1) * N // (2 * k)
    return x_NF[order[ranks]]


def init_kmeanspp(x_NF, k: int, key):
    """``k`` initial centres by k-means++ seeding (Arthur & Vassilvitskii 2007) with ``key``."""
    N, F = x_NF.shape
    first = jax.random.randint(key, (), 0, N)
    c0 = jnp.zeros((k, F), x_NF.dtype).at[0].set(x_NF[first])
    d0 = jnp.sum((x_NF - x_NF[first]) ** 2, -1)

    def seed(i, carry):
        c, d, key = carry
        key, sub = jax.random.split(key)
        p = jnp.where(jnp.sum(d) > 0, d / jnp.maximum(jnp.sum(d), 1e-12), 1.0 / N)
        j = jax.random.choice(sub, N, p=p)
        c = c.at[i].set(x_NF[j])
        return c, jnp.minimum(d, jnp.sum((x_NF - x_NF[j]) ** 2, -1)), key

    c, _, _ = jax.lax.fori_loop(1, k, seed, (c0, d0, key))
    return c


def _assign(x_NF, c_KF):
    dd = jnp.sum(c_KF * c_KF, -1)[None, :] - 2.0 * jnp.matmul(
        x_NF, c_KF.T, precision=jax.lax.Precision.HIGHEST
    )
    return jnp.argmin(jax.lax.stop_gradient(dd), -1)


def lloyd(x_NF, c_KF, iters: int):
    """``iters`` Lloyd iterations from centres ``c_KF``; returns ``(centres, labels)``.

    The labels are the nearest centres to the final centres (as scikit-learn's
    ``KMeans`` reports them). An empty cluster keeps its previous centre.
    """
    k = c_KF.shape[0]

    def step(_, c):
        oh = jax.nn.one_hot(_assign(x_NF, c), k, dtype=x_NF.dtype)
        n = oh.sum(0)
        sums = jnp.matmul(oh.T, x_NF, precision=jax.lax.Precision.HIGHEST)
        return jnp.where(n[:, None] > 0, sums / jnp.maximum(n, 1)[:, None], c)

    c = jax.lax.fori_loop(0, iters, step, c_KF)
    return c, _assign(x_NF, c)


@functools.partial(jax.jit, static_argnames=("k", "iters"))
def _kmeans(x_NF, key, *, k, iters):
    c0 = init_quantiles(x_NF, k) if key is None else init_kmeanspp(x_NF, k, key)
    return lloyd(x_NF, c0, iters)


def kmeans_quantize(image_HWC, k: int, *, key: jax.Array | None = None, iters: int = 20):
    """Paints every pixel with its k-means cluster's centre (colour features only).

    Args:
      image_HWC: uint8 image (H, W, C).
      k: number of clusters (>= 1; at most the number of pixels are used).
      key: PRNG key for k-means++ seeding; ``None``: the deterministic
        :func:`init_quantiles` initialisation.
      iters: Lloyd iterations (>= 1).
    Returns the quantised image, uint8, same shape.
    """
    image_HWC = np.asarray(image_HWC)
    if image_HWC.ndim != 3:
        raise ValueError(f"image_HWC: expected (H, W, C), got shape {image_HWC.shape}")
    check_int("k", k)
    check_int("iters", iters)
    H, W, C = image_HWC.shape
    x = jnp.asarray(image_HWC.reshape(-1, C), jnp.float32)
    c, lab = _kmeans(x, key, k=min(int(k), H * W), iters=int(iters))
    out = jnp.clip(jnp.round(c[lab]), 0, 255).astype(jnp.uint8)
    return np.asarray(out).reshape(H, W, C)
