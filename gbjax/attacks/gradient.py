"""FGSM and PGD (L-inf), one ``jax.jit`` per input shape."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from gbjax import _xla
from gbjax._checks import check_count, check_scalar, concrete, fail
from gbjax.attacks._core import (
    as_logits_fn,
    call,
    check_attack_labels,
    check_clip,
    check_eot,
    check_loss,
    check_restarts,
    check_xy,
    correct_from_logits,
    fgsm_impl,
    is_zero,
    pgd_start,
    pgd_step,
    restart_key,
)
from gbjax.attacks.losses import per_example_loss


def _pgd_impl(
    fn, x, y, key, eps, step_size, steps, lo, hi, random_start, targeted, eot_samples, unroll=1,
    loss="ce",
):  # fmt: skip
    x_adv, key = pgd_start(x, key, eps, lo, hi, random_start)
    step = pgd_step(fn, x, y, eps, step_size, lo, hi, targeted, eot_samples, loss)

    def body(i, x_adv):
        return step(i, x_adv, key)[0]

    if unroll == 1:
        x_adv = jax.lax.fori_loop(0, steps, body, x_adv)  # steps may be traced
    else:
        x_adv = jax.lax.fori_loop(0, steps, body, x_adv, unroll=unroll)  # static steps
    return jnp.where(eps == 0, x, x_adv)


def _pgd_restarts_impl(
    fn,
    x,
    y,
    key,
    eps,
    step_size,
    steps,
    lo,
    hi,
    random_start,
    targeted,
    eot_samples,
    unroll=1,
    restarts=1,
    loss="ce",
):
    """Best of ``restarts`` PGD runs per example: one that succeeds (misclassified,
    or classified as the target) first, then the highest loss (lowest if targeted)."""
    best = _pgd_impl(
        fn, x, y, key, eps, step_size, steps, lo, hi, random_start, targeted, eot_samples, unroll,
        loss,
    )  # fmt: skip
    if restarts == 1:
        return best

    def score(x_adv, k):
        # With EOT the candidates are scored on one draw of the randomised model.
        k = None if eot_samples is None else jax.random.fold_in(k, 0x7FFFFFFF)
        logits = call(fn, x_adv, k)
        # NaN or inf logits are never a class: not on target, and a success if untargeted
        on_label = correct_from_logits(logits, y)
        hit = on_label if targeted else ~on_label
        per = per_example_loss(loss, logits, y)
        return hit, (-per if targeted else per)

    best_hit, best_score = score(best, key)
    # A static loop: restarts are few, and on CPU a while loop around the
    # (unrolled) PGD body would run its convolutions several times slower.
    for r in range(1, restarts):
        k = restart_key(key, r)
        cand = _pgd_impl(
            fn, x, y, k, eps, step_size, steps, lo, hi, random_start, targeted, eot_samples,
            unroll, loss,
        )  # fmt: skip
        hit, sc = score(cand, k)
        better = (hit & ~best_hit) | ((hit == best_hit) & (sc > best_score))
        best = jnp.where(better.reshape((-1,) + (1,) * (x.ndim - 1)), cand, best)
        best_hit, best_score = best_hit | hit, jnp.where(better, sc, best_score)
    return best


_fgsm_jit = _xla.conv_jit(fgsm_impl, static_argnames=("targeted", "eot_samples", "loss"))
_pgd_jit = _xla.conv_jit(
    _pgd_restarts_impl,
    static_argnames=("random_start", "targeted", "eot_samples", "restarts", "loss"),
)
_pgd_jit_unrolled = _xla.conv_jit(
    _pgd_restarts_impl,
    static_argnames=("steps", "random_start", "targeted", "eot_samples", "unroll", "restarts",
                     "loss"),
)  # fmt: skip


# XLA:CPU runs convolutions inside a while loop several times slower than the
# same ops outside one (jax-ml/jax#12868; about 3.5x for a small CNN here, and
# partial unrolling does not help), so on CPU short PGD loops are unrolled.
_CPU_UNROLL_MAX_STEPS = 50


def _resolve_unroll(unroll, steps) -> int:
    """``fori_loop`` unroll factor: 1 means a while loop with ``steps`` traced;
    anything larger needs a concrete ``steps`` (``steps`` itself = full unroll)."""
    c = concrete(steps)
    if unroll is None:
        on_cpu = jax.default_backend() == "cpu"
        unroll = bool(on_cpu and c is not None and c <= _CPU_UNROLL_MAX_STEPS)
    if isinstance(unroll, (bool, np.bool_)):
        if not unroll:
            return 1
        if c is None:
            raise ValueError("unroll=True needs a concrete integer steps, not a traced value")
        return max(int(c), 1)
    if not isinstance(unroll, numbers.Integral) or unroll < 1:
        fail("unroll", "None, a bool or an int >= 1", unroll)
    if unroll > 1 and c is None:
        raise ValueError("unroll > 1 needs a concrete integer steps, not a traced value")
    return int(unroll)


def fgsm(
    logits_fn,
    x,
    y,
    *,
    eps,
    clip: tuple[float, float] = (0.0, 1.0),
    targeted: bool = False,
    key=None,
    eot_samples: int | None = None,
    loss: str = "ce",
):
    """Fast Gradient Sign Method (L-inf, one step).

    ``x' = clip(x + eps * sign(grad_x L(logits_fn(x), y)), *clip)``; with
    ``targeted=True`` the step is ``-eps * sign(...)`` towards the labels ``y``.

    Args:
      logits_fn: logits function (see module docstring); ``f(x, key)`` when
        ``eot_samples`` is given.
      x: float images ``(B, H, W, C)`` in ``[0, 1]``.
      y: integer labels ``(B,)`` (targets when ``targeted``).
      eps: L-inf budget on the [0, 1] scale, ``>= 0``; ``eps == 0`` returns ``x``.
      clip: valid pixel range ``(low, high)``.
      targeted: minimise the loss towards ``y`` instead of maximising it.
      key: PRNG key, required with ``eot_samples``.
      eot_samples: average the gradient over this many random draws (EOT).
      loss: ``"ce"`` (cross-entropy) or ``"margin"`` (Carlini-Wagner,
        :mod:`gbjax.attacks.losses`).

    Returns:
      Adversarial images, same shape and dtype as ``x``.
    """
    check_scalar("eps", eps, strict=False)
    lo, hi = check_clip(clip)
    check_eot(eot_samples, key)
    check_xy(x, y, clip=(lo, hi))
    check_loss(loss)
    fn = as_logits_fn(logits_fn)
    check_attack_labels(fn, x, y, key, eot_samples)
    if is_zero(eps):
        return jnp.asarray(x)
    return _fgsm_jit(
        fn,
        x,
        y,
        key,
        eps,
        lo,
        hi,
        targeted=bool(targeted),
        eot_samples=eot_samples,
        loss=loss,
    )


def pgd(
    logits_fn,
    x,
    y,
    *,
    eps,
    step_size,
    steps,
    key=None,
    random_start: bool = True,
    clip: tuple[float, float] = (0.0, 1.0),
    targeted: bool = False,
    eot_samples: int | None = None,
    unroll: int | bool | None = None,
    restarts: int = 1,
    loss: str = "ce",
):
    """Projected Gradient Descent, L-inf (Madry et al.), one ``jit`` per shape.

    Starting from ``x`` (or a uniform random point of the eps-ball when
    ``random_start``), takes ``steps`` signed-gradient steps of ``step_size``,
    projecting onto ``{|x' - x|_inf <= eps} ∩ [clip]`` after each.  Returns
    the last iterate.

    Args:
      logits_fn: logits function (see module docstring).
      x: float images ``(B, H, W, C)`` in ``[0, 1]``.
      y: integer labels ``(B,)`` (targets when ``targeted``).
      eps: L-inf budget ``>= 0``; ``eps == 0`` returns ``x``.
      step_size: step length ``> 0`` (a common choice is ``2.5 * eps / steps``).
      steps: number of iterations, an integer ``>= 1``.
      key: PRNG key; required when ``random_start`` or ``eot_samples``.
      random_start: start from a uniform point of the eps-ball.
      clip: valid pixel range ``(low, high)``.
      targeted: descend the loss towards labels ``y``.
      eot_samples: average each step's gradient over this many random draws;
        step ``i`` uses ``fold_in(key', i)`` split into ``eot_samples`` keys.
      unroll: ``fori_loop`` unrolling.  ``1``: a while loop, with ``steps``
        traced (no recompile when it changes).  An int > 1 or ``True``: unrolled,
        ``steps`` static (one compile per value).  ``None`` (default): ``True``
        on CPU when ``steps <= 50`` (XLA:CPU runs convolutions in loop bodies
        several times slower, jax-ml/jax#12868), else ``1``.
      restarts: independent random starts (restart 0 uses ``key``, restart
        ``r`` uses ``fold_in(key, r)``); per example the result is the first
        iterate that succeeds (misclassified, or the target class if
        ``targeted``), else the one with the highest loss (lowest if targeted).
        Needs ``random_start`` (or ``eot_samples``) when > 1.
      loss: ``"ce"`` or ``"margin"`` (:mod:`gbjax.attacks.losses`).

    Returns:
      Adversarial images, same shape and dtype as ``x``.
    """
    check_scalar("eps", eps, strict=False)
    check_scalar("step_size", step_size)
    check_count("steps", steps)
    lo, hi = check_clip(clip)
    check_eot(eot_samples, key)
    if random_start and key is None:
        raise ValueError(
            "random_start=True needs an explicit PRNG key: pass key=jax.random.key(...) "
            "or random_start=False"
        )
    check_xy(x, y, clip=(lo, hi))
    restarts = check_restarts(restarts, random_start, eot_samples)
    unroll = _resolve_unroll(unroll, steps)
    check_loss(loss)
    fn = as_logits_fn(logits_fn)
    check_attack_labels(fn, x, y, key, eot_samples)
    if is_zero(eps):
        return jnp.asarray(x)
    common = dict(
        random_start=bool(random_start),
        targeted=bool(targeted),
        eot_samples=eot_samples,
        restarts=restarts,
        loss=loss,
    )
    if unroll == 1:
        return _pgd_jit(fn, x, y, key, eps, step_size, steps, lo, hi, **common)
    return _pgd_jit_unrolled(
        fn, x, y, key, eps, step_size, int(steps), lo, hi, unroll=unroll, **common
    )
