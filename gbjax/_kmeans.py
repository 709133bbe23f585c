"""k-means colour quantisation: the baseline the GB paper compares against (its Fig. 3)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("k", "iters"))
def _kmeans(x_NF, key, *, k, iters):
    N, F = x_NF.shape
    # k-means++ seeding with an explicit key.
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

    def assign(c):
        dd = jnp.sum(c * c, -1)[None, :] - 2.0 * x_NF @ c.T
        return jnp.argmin(dd, -1)

    def lloyd(_, c):
        oh = jax.nn.one_hot(assign(c), k, dtype=x_NF.dtype)
        n = oh.sum(0)
        return jnp.where(n[:, None] > 0, (oh.T @ x_NF) / jnp.maximum(n, 1)[:, None], c)

    c = jax.lax.fori_loop(0, iters, lloyd, c)
    return c, assign(c)


def kmeans_quantize(image_HWC, k: int, *, key: jax.Array, iters: int = 20) -> np.ndarray:
    """Paints every pixel with its k-means cluster's centre (colour features only).

    Args:
      image_HWC: uint8 image (H, W, C).
      k: number of clusters (>= 1).
      key: PRNG key for the k-means++ seeding.
      iters: Lloyd iterations.
    Returns the quantised image, uint8, same shape.
    """
    image_HWC = np.asarray(image_HWC)
    if image_HWC.ndim != 3:
        raise ValueError(f"image_HWC: expected (H, W, C), got shape {image_HWC.shape}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k!r}")
    H, W, C = image_HWC.shape
    x = jnp.asarray(image_HWC.reshape(-1, C), jnp.float32)
    c, lab = _kmeans(x, key, k=min(k, H * W), iters=iters)
    out = jnp.clip(jnp.round(c[lab]), 0, 255).astype(jnp.uint8)
    return np.asarray(out).reshape(H, W, C)
