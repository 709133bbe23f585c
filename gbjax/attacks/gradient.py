"""FGSM and PGD (L-inf), one ``jax.jit`` per input shape."""

from __future__ import annotations

import numbers
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from gbjax import _xla
from gbjax._callables import LogitsFn
from gbjax._checks import check_count, check_int, check_scalar, concrete, fail
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
    per_image,
    pgd_start,
    pgd_step,
    restart_key,
)
from gbjax.attacks.losses import per_example_loss


def _pgd_impl(
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
    loss="ce",
):
    x_adv, key = pgd_start(x, key, eps, lo, hi, random_start)
    step = pgd_step(fn, x, y, eps, step_size, lo, hi, targeted, eot_samples, loss)

    def body(i, x_adv):
        return step(i, x_adv, key)[0]

    if unroll == 1:
        x_adv = jax.lax.fori_loop(0, steps, body, x_adv)  # steps may be traced
    else:
        x_adv = jax.lax.fori_loop(0, steps, body, x_adv, unroll=unroll)  # static steps
    return jnp.where(per_image(eps, x) == 0, x, x_adv)


def _score(fn, x_adv, y, k, targeted, eot_samples, loss):
    """``(hit, score)`` of a restart's result: success (misclassified, or on target),
    then its loss (negated if targeted). With EOT, on one draw of the model."""
    k = None if eot_samples is None else jax.random.fold_in(k, 0x7FFFFFFF)
    logits = call(fn, x_adv, k)
    # NaN or inf logits are never a class: not on target, and a success if untargeted
    on_label = correct_from_logits(logits, y)
    hit = on_label if targeted else ~on_label
    per = per_example_loss(loss, logits, y)
    return hit, (-per if targeted else per)


def _keep_better(best, best_hit, best_score, cand, hit, sc):
    better = (hit & ~best_hit) | ((hit == best_hit) & (sc > best_score))
    best = jnp.where(better.reshape((-1,) + (1,) * (best.ndim - 1)), cand, best)
    return best, best_hit | hit, jnp.where(better, sc, best_score)


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
    args = (eps, step_size, steps, lo, hi, random_start, targeted, eot_samples, unroll, loss)
    best = _pgd_impl(fn, x, y, key, *args)
    if restarts == 1:
        return best
    best_hit, best_score = _score(fn, best, y, key, targeted, eot_samples, loss)
    # A static loop: restarts are few, and on CPU a while loop around the
    # (unrolled) PGD body would run its convolutions several times slower.
    for r in range(1, restarts):
        k = restart_key(key, r)
        cand = _pgd_impl(fn, x, y, k, *args)
        hit, sc = _score(fn, cand, y, k, targeted, eot_samples, loss)
        best, best_hit, best_score = _keep_better(best, best_hit, best_score, cand, hit, sc)
    return best


_fgsm_jit = _xla.conv_jit(fgsm_impl, static_argnames=("targeted", "eot_samples", "loss"))
_PGD_STATIC = ("random_start", "targeted", "eot_samples", "restarts", "loss")
_pgd_jit = _xla.conv_jit(_pgd_restarts_impl, static_argnames=_PGD_STATIC)
_pgd_jit_unrolled = _xla.conv_jit(
    _pgd_restarts_impl, static_argnames=("steps", "unroll") + _PGD_STATIC
)


# ---------------------------------------------------------------------------
# PGD as a host loop over compiled chunks of steps (chunk < steps)


@_xla.conv_jit(static_argnames=("random_start",))
def _chunked_start(x, key, eps, lo, hi, *, random_start):
    return pgd_start(x, key, eps, lo, hi, random_start)


@_xla.conv_jit(static_argnames=("n", "unroll", "targeted", "eot_samples", "loss"))
def _chunked_steps(
    fn,
    x,
    y,
    x_adv,
    key,
    eps,
    step_size,
    i0,
    steps,
    lo,
    hi,
    *,
    n,
    unroll,
    targeted,
    eot_samples,
    loss,
):
    """Steps ``i0 .. i0 + n - 1`` (those ``< steps``) from ``x_adv``."""
    step = pgd_step(fn, x, y, eps, step_size, lo, hi, targeted, eot_samples, loss)

    def body(j, x_adv):
        i = i0 + j
        return jnp.where(i < steps, step(i, x_adv, key)[0], x_adv)

    if n == 1:  # one step per call: no loop at all (programs that hold GB compile slowly)
        return body(0, x_adv)
    return jax.lax.fori_loop(0, n, body, x_adv, unroll=n if unroll else 1)


_score_jit = _xla.conv_jit(_score, static_argnames=("targeted", "eot_samples", "loss"))
_keep_better_jit = jax.jit(_keep_better)


def _pgd_chunked(
    fn,
    x,
    y,
    key,
    eps,
    step_size,
    steps,
    lo,
    hi,
    *,
    n,
    unroll,
    random_start,
    targeted,
    eot_samples,
    restarts,
    loss,
):
    """:func:`_pgd_restarts_impl` with the steps run ``n`` per compiled call."""
    static = dict(targeted=targeted, eot_samples=eot_samples, loss=loss)

    def run(k):
        x_adv, k = _chunked_start(x, k, eps, lo, hi, random_start=random_start)
        for i0 in range(0, steps, n):
            x_adv = _chunked_steps(
                fn, x, y, x_adv, k, eps, step_size, i0, steps, lo, hi, n=n, unroll=unroll, **static
            )
        return jnp.where(per_image(eps, x) == 0, x, x_adv)

    best = run(key)
    if restarts == 1:
        return best
    best_hit, best_score = _score_jit(fn, best, y, key, **static)
    for r in range(1, restarts):
        k = restart_key(key, r)
        cand = run(k)
        hit, sc = _score_jit(fn, cand, y, k, **static)
        best, best_hit, best_score = _keep_better_jit(best, best_hit, best_score, cand, hit, sc)
    return best


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
    logits_fn: LogitsFn,
    x: ArrayLike,
    y: ArrayLike,
    *,
    eps: ArrayLike,
    clip: tuple[float, float] = (0.0, 1.0),
    targeted: bool = False,
    key: jax.Array | None = None,
    eot_samples: int | None = None,
    loss: str = "ce",
) -> jax.Array:
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

    Example:
      A two-class model on one-pixel images (class 1 above 0.5): the step moves
      each pixel by ``eps`` towards the other class.

      >>> import jax.numpy as jnp
      >>> from gbjax import attacks
      >>> def logits(x):
      ...     v = x.reshape(-1, 1) - 0.5
      ...     return jnp.concatenate([-v, v], axis=1)
      >>> x = jnp.array([0.25, 0.75]).reshape(2, 1, 1, 1)
      >>> attacks.fgsm(logits, x, jnp.array([0, 1]), eps=0.125).ravel().tolist()
      [0.375, 0.625]
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
    logits_fn: LogitsFn,
    x: ArrayLike,
    y: ArrayLike,
    *,
    eps: ArrayLike,
    step_size: ArrayLike,
    steps: int,
    key: jax.Array | None = None,
    random_start: bool = True,
    clip: tuple[float, float] = (0.0, 1.0),
    targeted: bool = False,
    eot_samples: int | None = None,
    chunk: int | None = None,
    restarts: int = 1,
    loss: str = "ce",
    unroll: int | bool | None = None,
) -> jax.Array:
    """Projected Gradient Descent, L-inf (Madry et al.).

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
      chunk: steps per compiled call, as in the other attacks. ``None``
        (default): all steps in one call, unrolled on CPU when ``steps <= 50``
        (XLA:CPU runs convolutions in loop bodies several times slower,
        jax-ml/jax#12868), else a loop with ``steps`` traced (no recompile when
        it changes). ``k``: a host loop over compiled calls of ``k`` steps
        (unrolled on CPU), so one program serves every ``steps``; ``steps``
        must then be concrete.
      restarts: independent random starts (restart 0 uses ``key``, restart
        ``r`` uses ``fold_in(key, r)``); per example the result is the first
        iterate that succeeds (misclassified, or the target class if
        ``targeted``), else the one with the highest loss (lowest if targeted).
        Needs ``random_start`` (or ``eot_samples``) when > 1.
      loss: ``"ce"`` or ``"margin"`` (:mod:`gbjax.attacks.losses`).
      unroll: deprecated, use ``chunk``: the ``fori_loop`` unrolling of the one
        compiled call (``1`` a while loop, ``True`` all steps, ``k`` by ``k``).

    Returns:
      Adversarial images, same shape and dtype as ``x``.

    Example:
      A two-class model on one-pixel images (class 1 above 0.5): two steps of
      0.1 from the start, projected onto the 0.125-ball.

      >>> import jax.numpy as jnp
      >>> from gbjax import attacks
      >>> def logits(x):
      ...     v = x.reshape(-1, 1) - 0.5
      ...     return jnp.concatenate([-v, v], axis=1)
      >>> x = jnp.array([0.25, 0.75]).reshape(2, 1, 1, 1)
      >>> adv = attacks.pgd(logits, x, jnp.array([0, 1]), eps=0.125, step_size=0.1, steps=2,
      ...                   random_start=False)
      >>> adv.ravel().tolist()
      [0.375, 0.625]
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
    if unroll is not None:
        warnings.warn(
            "unroll= is deprecated: pass chunk= (steps per compiled call)",
            DeprecationWarning,
            stacklevel=2,
        )
        if chunk is not None:
            raise ValueError("pass chunk= or the deprecated unroll=, not both")
    n_steps = concrete(steps)
    if chunk is not None:
        check_int("chunk", chunk)
        if n_steps is None:
            raise ValueError("chunk needs a concrete integer steps, not a traced value")
        on_cpu = jax.default_backend() == "cpu"
        if chunk >= n_steps:  # one compiled call: unrolled on CPU, a loop elsewhere
            unroll = on_cpu
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
    if chunk is not None and chunk < n_steps:
        n = int(chunk)
        return _pgd_chunked(
            fn, x, y, key, eps, step_size, int(n_steps), lo, hi, n=n, unroll=on_cpu, **common
        )
    if unroll == 1:
        return _pgd_jit(fn, x, y, key, eps, step_size, steps, lo, hi, **common)
    return _pgd_jit_unrolled(
        fn, x, y, key, eps, step_size, int(steps), lo, hi, unroll=unroll, **common
    )
