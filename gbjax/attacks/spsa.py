"""SPSA: a gradient-free L-inf attack (Uesato et al. 2018, "Adversarial Risk and the
Dangers of Evaluating Against Weak Attacks"; docs/methods.md, section 9).

Each step estimates the gradient of the margin loss
``z_y - max_{k != y} z_k`` by simultaneous perturbation: ``samples`` evaluations
at ``x +- delta * v`` for random sign vectors ``v`` (antithetic pairs), and

    g ~= mean_v [(L(x + delta v) - L(x - delta v)) / (2 delta)] * v.

Adam (learning rate ``lr``) descends the estimated gradient, and the iterate is
projected back to the eps-ball and to ``[lo, hi]``. A NaN or inf margin counts
as misclassified (``square._margin``). Only the model's outputs
are used, so SPSA sees whatever a non-differentiable defence (quantisation,
GB's partition) does, where a gradient would see nothing. Defaults follow the
paper (``lr = delta = 0.01``); the paper used 8,192 samples per step on GPUs,
ours default to 128 so that a CPU run is feasible (state it when reporting).

Every iterate is scored (:func:`spsa_run` returns per-image robust flags); the
perturbed queries are not iterates. One jitted call evaluates ``group`` pairs
for a whole batch; a host loop runs the groups and steps, so a model with GB
inside holds one copy of the engine per program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from gbjax import _random, _xla
from gbjax._batching import fixed_batches, row_bucket_size
from gbjax._callables import LogitsFn
from gbjax._checks import check_count, check_int, check_scalar
from gbjax.attacks._core import as_logits_fn, check_attack_labels, check_xy, margins, per_image

__all__ = ["spsa", "spsa_run"]

_B1, _B2, _ADAM_EPS = 0.9, 0.999, 1e-8


@_xla.conv_jit(static_argnames=("group",))
def _estimate(fn, x, y, key, delta, *, group):
    """Sum over ``group`` antithetic pairs of ``(L(x + d v) - L(x - d v)) / (2 d) * v``."""
    v = jnp.where(_random.bernoulli(key, 0.5, (group,) + x.shape), 1.0, -1.0)
    xs = jnp.concatenate([x[None] + delta * v, x[None] - delta * v]).astype(x.dtype)
    m = margins(fn, xs.reshape((-1,) + x.shape[1:]), jnp.tile(y, 2 * group))
    m = m.reshape(2, group, x.shape[0])
    diff = (m[0] - m[1]) / (2.0 * delta)
    return jnp.sum(diff[:, :, None, None, None] * v, axis=0)


@_xla.conv_jit
def _update(fn, x, x_adv, y, g, m, s, t, eps, lr, lo, hi, robust):
    """One Adam step down the estimated margin gradient, projected; scores the new
    iterate (robust stays True only while the margin is > 0)."""
    m = _B1 * m + (1 - _B1) * g
    s = _B2 * s + (1 - _B2) * g * g
    m_hat = m / (1 - _B1**t)
    s_hat = s / (1 - _B2**t)
    x_adv = x_adv - lr * m_hat / (jnp.sqrt(s_hat) + _ADAM_EPS)
    eps = per_image(eps, x)  # () or one per image
    x_adv = jnp.clip(jnp.clip(x_adv, x - eps, x + eps), lo, hi).astype(x.dtype)
    robust = robust & (margins(fn, x_adv, y) > 0)
    return x_adv, m, s, robust


def _run_batch(fn, x, y, key, eps, *, steps, samples, lr, delta, lo, hi, group):
    pairs = max(1, samples // 2)
    group = max(1, min(group, pairs))
    n_groups = -(-pairs // group)
    x_adv, m, s = x, jnp.zeros_like(x), jnp.zeros_like(x)
    robust = jnp.ones(x.shape[0], bool)
    for t in range(1, steps + 1):
        g = jnp.zeros_like(x)
        for j in range(n_groups):
            g = g + _estimate(
                fn, x_adv, y, jax.random.fold_in(key, t * n_groups + j), delta, group=group
            )
        g = g / (n_groups * group)
        x_adv, m, s, robust = _update(
            fn, x, x_adv, y, g, m, s, jnp.float32(t), eps, lr, lo, hi, robust
        )
        if not bool(jnp.any(robust)):
            break
    return robust, x_adv


def spsa_run(
    fn,
    x,
    y,
    key,
    eps,
    *,
    steps=100,
    samples=128,
    lr=0.01,
    delta=0.01,
    lo=0.0,
    hi=1.0,
    batch_size=256,
    group=None,
    progress=False,
):
    """``(robust_N, x_adv_N)`` over a set: robust iff the margin stayed > 0 at every
    iterate (the clean point is the caller's to score). ``group`` pairs per call
    (default: about 512 images per call)."""
    x, y = jnp.asarray(x), jnp.asarray(y).astype(jnp.int32)
    n = x.shape[0]
    bs = row_bucket_size(n, batch_size)
    group = group or max(1, 256 // bs)
    eps, lr, delta = jnp.asarray(eps, jnp.float32), jnp.float32(lr), jnp.float32(delta)
    robust, adv = np.ones(n, bool), []
    batches = list(fixed_batches(n, bs, shrink=False))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches), desc="spsa", unit="batch", leave=False)
    try:
        for b in batches:
            idx = jnp.asarray(b.index)
            r, xa = _run_batch(
                fn,
                x[idx],
                y[idx],
                jax.random.fold_in(key, b.start),
                eps[idx] if eps.ndim else eps,  # () or one budget per image
                steps=steps,
                samples=samples,
                lr=lr,
                delta=delta,
                lo=lo,
                hi=hi,
                group=group,
            )
            robust[b.index[: b.valid]] = np.asarray(r)[: b.valid]
            adv.append(xa[: b.valid])
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return robust, jnp.concatenate(adv)


def spsa(
    logits_fn: LogitsFn,
    x: ArrayLike,
    y: ArrayLike,
    *,
    eps: float,
    steps: int = 100,
    samples: int = 128,
    key: jax.Array,
    lr: float = 0.01,
    delta: float = 0.01,
    clip: tuple[float, float] = (0.0, 1.0),
    batch_size: int = 256,
) -> jax.Array:
    """SPSA adversarial examples (untargeted, L-inf, margin loss, Adam).

    Args:
      logits_fn: the model queried (callable, ``Partial`` or nnx module); it is
        never differentiated.
      x: float images in ``[0, 1]``, ``(B, H, W, C)``.
      y: integer labels ``(B,)``.
      eps: L-inf budget.
      steps: Adam steps.
      samples: model evaluations per step for the gradient estimate (antithetic
        pairs, so rounded down to an even number).
      key: PRNG key (required).
      lr, delta: Adam learning rate and perturbation size (0.01 each, the paper's).
      clip: valid pixel range.
      batch_size: images per compiled call.

    Returns:
      The adversarial images, same shape and dtype as ``x``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gbjax import attacks
      >>> f = lambda x: jnp.stack([x.mean((1, 2, 3)), 0.5 - x.mean((1, 2, 3))], -1)
      >>> x = jnp.full((2, 4, 4, 1), 0.3)
      >>> adv = attacks.spsa(f, x, jnp.zeros(2, int), eps=0.1, steps=5, samples=4,
      ...                    key=jax.random.key(0))
      >>> bool(jnp.all(jnp.abs(adv - x) <= 0.1 + 1e-6))
      True
    """
    check_xy(x, y)
    check_count("steps", steps)
    check_scalar("eps", eps)
    check_int("samples", samples, 2)
    check_int("batch_size", batch_size)
    check_scalar("lr", lr)
    check_scalar("delta", delta)
    if key is None:
        raise ValueError("spsa needs an explicit PRNG key (key=...)")
    lo, hi = float(clip[0]), float(clip[1])
    fn = as_logits_fn(logits_fn)
    check_attack_labels(fn, x, y)
    _, adv = spsa_run(
        fn,
        x,
        y,
        key,
        eps,
        steps=int(steps),
        samples=int(samples),
        lr=lr,
        delta=delta,
        lo=lo,
        hi=hi,
        batch_size=int(batch_size),
    )
    return adv.astype(jnp.asarray(x).dtype)
