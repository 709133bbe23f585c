"""Smooth surrogates of granular-ball painting, for attacks built against GB itself
(docs/methods.md, section 9).

GB is piecewise constant in its partition: the end-to-end gradient holds the
partition fixed, and identity BPDA ignores GB. :class:`SoftGB` is a smooth
stand-in for BPDA's backward pass (``attacks.bpda(gb, SoftGB(gb))``: the forward
pass stays GB, exactly):

* **soft assignment** (``soft_purity=False``): every pixel is painted with a
  ``softmax(-d^2 / tau)`` mix of the current partition's kept ball centres
  (``d`` in pixel units), so the gradient sees pixels moving between balls as
  well as the centres moving with their members;
* **partition surrogate** (``soft_purity=True``): also a soft purity test per
  ball, ``keep = sigmoid((frac - purity) / purity_width)`` with
  ``frac`` the fraction of its members within the threshold (GB's own test
  forward; the slope of ``sigmoid((threshold - d) / width)`` backward), and
  the painting ``keep * soft + (1 - keep) * x``: a ball that fails the test
  splits, and its members move towards their own colours. Its gradient pushes
  pixels across the threshold wherever splitting a ball (or keeping it) raises
  the attacker's loss: an attack on the partition itself.

The partition (ball ids) is computed on the current iterate and held constant
inside the surrogate; centres are recomputed from the members, so they are
differentiable.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

__all__ = ["SoftGB"]


@dataclasses.dataclass(frozen=True)
class SoftGB:
    """A smooth surrogate of a :class:`gbjax.defences.GB` painting (see the module).

    Args:
      defence: the GB defence whose partition is used.
      tau: soft-assignment temperature in squared pixel units (``d^2 / tau``).
      soft_purity: add the soft purity test (the partition surrogate).
      width: softness of the within-threshold test, pixel units.
      purity_width: softness of the purity test, in fractions of a ball.

    Called on ``(B, H, W, C)`` floats in ``[0, 1]``; returns the surrogate
    painting, same shape. Hashable, so it can stand in ``jit``-ed programs.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gbjax import attacks, defences
      >>> gb = defences.GB(threshold=20.0)
      >>> x = jax.random.uniform(jax.random.key(0), (1, 8, 8, 3))
      >>> g = attacks.bpda(gb, attacks.SoftGB(gb, tau=100.0))
      >>> bool(jnp.array_equal(g(x), gb(x)))  # the forward pass is GB, exactly
      True
    """

    defence: object
    tau: float = 100.0
    soft_purity: bool = False
    width: float = 2.0
    purity_width: float = 0.05

    def __post_init__(self):
        for name in ("tau", "width", "purity_width"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: expected a finite number > 0, got {v!r}")

    def __call__(self, x):
        gb = self.defence
        B, H, W, C = x.shape
        res = gb.cluster(jax.lax.stop_gradient(x))
        K = res.counts.shape[1]
        X = x.reshape(B, H * W, C).astype(jnp.float32) * 255.0
        onehot = jax.nn.one_hot(res.labels.reshape(B, H * W), K, dtype=jnp.float32)
        cnt = jnp.sum(onehot, axis=1)  # (B, K)
        cent = jnp.einsum("bnk,bnc->bkc", onehot, X) / jnp.maximum(cnt, 1.0)[..., None]
        kept = cnt >= gb.min_ball_size
        d2 = jnp.sum((X[:, :, None, :] - cent[:, None, :, :]) ** 2, axis=-1)  # (B, N, K)
        w = jax.nn.softmax(jnp.where(kept[:, None, :], -d2 / self.tau, -jnp.inf), axis=-1)
        w = jnp.where(jnp.any(kept, axis=1)[:, None, None], w, onehot)  # no kept ball
        paint = jnp.einsum("bnk,bkc->bnc", w, cent)
        if self.soft_purity:
            d2_own = jnp.sum(onehot * d2, axis=-1)  # (B, N)
            soft = jax.nn.sigmoid((gb.threshold - jnp.sqrt(d2_own + 1e-6)) / self.width)
            hard = (d2_own < gb.threshold**2).astype(jnp.float32)
            # GB's own within test forward, the sigmoid's slope backward: the purity
            # margin is GB's, and the gradient still sees pixels near the threshold
            inside = hard + soft - jax.lax.stop_gradient(soft)
            frac = jnp.einsum("bnk,bn->bk", onehot, inside) / jnp.maximum(cnt, 1.0)
            keep = jax.nn.sigmoid((frac - gb.purity) / self.purity_width)
            keep_own = jnp.einsum("bnk,bk->bn", onehot, keep)[..., None]
            paint = keep_own * paint + (1.0 - keep_own) * X
        return (paint / 255.0).reshape(x.shape).astype(x.dtype)
