"""Square attack, L-inf (Andriushchenko et al. 2020): score-based, no gradients.

It needs only the logits, so it is the attack for defences whose gradient is
zero or useless, such as GB, whose partition is piecewise constant.

* Start: ``x + eps * s`` with a random sign ``s`` per image, column and channel
  (vertical stripes), clipped to the box.
* Query ``i`` (of ``queries``): a square window of side
  ``round(sqrt(p_i * H * W))`` (at least 1, at most ``H - 1``) at a random
  position per image gets a new perturbation ``+-eps`` per channel; the
  candidate is kept when it lowers the margin ``z_y - max_{j != y} z_j``.
  ``p_i`` follows the published schedule: ``p_init`` halved at 10, 50, 200,
  500, 1000, 2000, 4000, 6000 and 8000 (iterations rescaled to 10,000).
* An image is finished once it is misclassified (margin <= 0); logits with a
  NaN or inf give the margin -inf (never counted as a class).

Deviation, documented: when the new window equals the current one (both signs
clipped the same way), the reference implementation redraws until it differs;
here the opposite sign is tried once.

Images that are already misclassified are dropped from the batch between
chunks of queries (compacted into fewer fixed-size batches), so the cost
follows the number of images still standing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from gbjax import _random, _xla
from gbjax._batching import fixed_batches, row_bucket_size
from gbjax._callables import LogitsFn
from gbjax._checks import check_int, check_scalar
from gbjax.attacks._core import (
    as_logits_fn,
    check_attack_labels,
    check_clip,
    check_xy,
    is_zero,
    margins,
    per_image,
)

__all__ = ["square", "p_schedule"]

_P_BOUNDARIES = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(p_init: float, i, queries: int):
    """The fraction of pixels a window covers at iteration ``i`` of ``queries``."""
    it = jnp.floor(jnp.asarray(i, jnp.float32) / queries * 10000.0)
    halvings = jnp.sum(jnp.asarray(_P_BOUNDARIES, jnp.float32) < it)
    return p_init / (2.0 ** halvings.astype(jnp.float32))


@_xla.conv_jit
def _start(fn, x, y, key, eps, lo, hi):
    b, _, w, c = x.shape
    s = jnp.where(_random.bernoulli(key, 0.5, (b, 1, w, c)), 1.0, -1.0)
    x0 = jnp.clip(x + per_image(eps, x) * s, lo, hi).astype(x.dtype)
    return x0, margins(fn, x0, y)


def _draws(key, i, queries, p_init, shape):
    """Query ``i``'s window side, position ``(vh, vw)`` per image and sign per image and
    channel."""
    b, h, w, c = shape
    k_h, k_w, k_s = jax.random.split(jax.random.fold_in(key, i), 3)
    p = p_schedule(p_init, i, queries)
    side = jnp.clip(jnp.round(jnp.sqrt(p * h * w)), 1, min(h, w) - 1).astype(jnp.int32)
    vh = jax.random.randint(k_h, (b,), 0, h - side + 1)
    vw = jax.random.randint(k_w, (b,), 0, w - side + 1)
    sign = jnp.where(_random.bernoulli(k_s, 0.5, (b, 1, 1, c)), 1.0, -1.0)
    return side, vh, vw, sign


@_xla.conv_jit(static_argnames=("n",))
def _queries(fn, x, y, x_best, margin, key, eps, i0, queries, p_init, lo, hi, *, n):
    """``n`` queries (iterations ``i0 .. i0 + n - 1``), unrolled; ``n=1`` for models
    with GB inside (several copies of the engine in one program compile slowly).

    The ``n`` queries' random draws are made at once, vectorised over ``i`` (the
    values of ``n`` separate draws, in one random-number kernel instead of ``n``:
    XLA:CPU compiled each query's draws in about 0.25 s)."""
    b, h, w, c = x.shape
    eps = per_image(eps, x)  # () or one per image
    rows = jnp.arange(h)[None, :, None, None]
    cols = jnp.arange(w)[None, None, :, None]
    if n == 1:
        sides, vhs, vws, signs = (v[None] for v in _draws(key, i0, queries, p_init, x.shape))
    else:
        draws = jax.vmap(_draws, in_axes=(None, 0, None, None, None))
        sides, vhs, vws, signs = draws(key, i0 + jnp.arange(n), queries, p_init, x.shape)
    for j in range(n):
        i = i0 + j
        side, sign = sides[j], signs[j]
        vh, vw = vhs[j][:, None, None, None], vws[j][:, None, None, None]
        mask = (rows >= vh) & (rows < vh + side) & (cols >= vw) & (cols < vw + side)
        delta = x_best - x
        cand = jnp.clip(x + jnp.where(mask, eps * sign, delta), lo, hi)
        same = jnp.all(jnp.where(mask, jnp.abs(cand - x_best) < 1e-7, True), axis=(1, 2, 3))
        flipped = jnp.clip(x + jnp.where(mask, -eps * sign, delta), lo, hi)
        cand = jnp.where(same[:, None, None, None], flipped, cand).astype(x.dtype)
        m = margins(fn, cand, y)
        active = (i < queries) & (margin > 0)
        better = active & (m < margin)
        x_best = jnp.where(better[:, None, None, None], cand, x_best)
        margin = jnp.where(better, m, margin)
    return x_best, margin


def square_run(
    fn,
    x,
    y,
    key,
    eps,
    *,
    queries=5000,
    p_init=0.8,
    lo=0.0,
    hi=1.0,
    batch_size=256,
    chunk=25,
    progress=False,
):
    """``(margin_N, x_best_N)`` over a whole set; an image is robust iff its final
    margin is > 0 (every query was classified correctly)."""
    x, y = jnp.asarray(x), jnp.asarray(y).astype(jnp.int32)
    n = x.shape[0]
    k_start, key = jax.random.split(key)
    eps = jnp.asarray(eps, jnp.float32)  # () or (N,): one budget per image

    def eps_of(idx):
        return eps[idx] if eps.ndim else eps

    xb_parts, m_parts = [], []
    for bt in fixed_batches(n, row_bucket_size(n, batch_size), shrink=False):
        idx = jnp.asarray(bt.index)
        k = jax.random.fold_in(k_start, bt.start)
        x0, m0 = _start(fn, x[idx], y[idx], k, eps_of(idx), lo, hi)
        xb_parts.append(x0[: bt.valid])
        m_parts.append(m0[: bt.valid])
    x_best, margin = jnp.concatenate(xb_parts), jnp.concatenate(m_parts)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=queries - 1, desc="square", unit="query", leave=False)
    # never more unrolled queries than there are: a short attack (a smoke run's 6
    # queries) would otherwise compile and run a whole chunk of no-op iterations
    chunk = max(1, min(int(chunk), queries - 1))
    bs = None
    try:
        for i0 in range(1, queries, chunk):
            alive = np.flatnonzero(np.asarray(margin) > 0)
            if len(alive) == 0:
                break
            bs = row_bucket_size(len(alive), batch_size, current=bs)  # few shapes as images fall
            for bt in fixed_batches(len(alive), bs, shrink=False):
                rows = alive[bt.index]
                idx = jnp.asarray(rows)
                xb, mb = _queries(
                    fn,
                    x[idx],
                    y[idx],
                    x_best[idx],
                    margin[idx],
                    jax.random.fold_in(key, bt.start),
                    eps_of(idx),
                    i0,
                    queries,
                    p_init,
                    lo,
                    hi,
                    n=chunk,
                )
                # the padded rows go to an index past the end and are dropped: the
                # update's shape is the batch's, not the count of its real rows (which
                # changes as images fall, and each new count compiled a slice and two
                # scatters)
                keep = jnp.asarray(np.where(bt.mask, rows, n))
                x_best = x_best.at[keep].set(xb, mode="drop")
                margin = margin.at[keep].set(mb, mode="drop")
            if bar is not None:
                bar.update(min(chunk, queries - i0))
    finally:
        if bar is not None:
            bar.close()
    return margin, x_best


def square(
    logits_fn: LogitsFn,
    x: ArrayLike,
    y: ArrayLike,
    *,
    eps: float,
    queries: int = 5000,
    key: jax.Array | None = None,
    p_init: float = 0.8,
    clip: tuple[float, float] = (0.0, 1.0),
    batch_size: int = 256,
    chunk: int | None = None,
    progress: bool = False,
) -> jax.Array:
    """Square attack, L-inf; see the module docstring. Returns the adversarial images.

    ``queries``: model evaluations per image (the start counts as one);
    ``p_init``: the starting window fraction (0.8, as AutoAttack uses for L-inf);
    ``chunk``: queries per compiled call (default 25; never more than the attack has).

    Example:
      A two-class model on 2x2 images (class 1 when the mean exceeds 0.5): moving
      the pixels of an image at 0.48 by ``eps = 0.1`` flips it.

      >>> import jax, jax.numpy as jnp
      >>> from gbjax import attacks
      >>> def logits(x):
      ...     v = x.mean((1, 2, 3))[:, None] - 0.5
      ...     return jnp.concatenate([-v, v], axis=1)
      >>> x = jnp.full((1, 2, 2, 1), 0.48)
      >>> adv = attacks.square(logits, x, jnp.array([0]), eps=0.1, queries=8, chunk=1,
      ...                      key=jax.random.key(0))
      >>> float(jnp.abs(adv - x).max()) <= 0.1 + 1e-6, int(jnp.argmax(logits(adv), -1)[0])
      (True, 1)
    """
    if key is None:
        raise ValueError("square needs an explicit PRNG key: key=jax.random.key(...)")
    check_scalar("eps", eps, strict=False)
    lo, hi = check_clip(clip)
    check_xy(x, y, clip=(lo, hi))
    check_int("queries", queries)
    if not 0 < p_init <= 1:
        raise ValueError(f"p_init must be in (0, 1], got {p_init!r}")
    fn = as_logits_fn(logits_fn)
    check_attack_labels(fn, x, y)
    if is_zero(eps):
        return jnp.asarray(x)
    _, out = square_run(
        fn,
        x,
        y,
        key,
        eps,
        queries=int(queries),
        p_init=float(p_init),
        lo=lo,
        hi=hi,
        batch_size=batch_size,
        chunk=25 if chunk is None else check_int("chunk", chunk),
        progress=progress,
    )
    return out
