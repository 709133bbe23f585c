"""APGD, L-inf (Croce & Hein 2020, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks"), with every iterate scored.

The algorithm, as in the paper and its reference implementation:

* start at ``x + eps * t / max|t|`` with ``t`` uniform in [-1, 1];
* step ``z = P(x_k + eta sign(grad))``, then momentum
  ``x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))``, ``a = 0.75``
  (``a = 1`` on the first step), ``eta`` starting at ``2 eps``;
* checkpoints after ``w_1 = 0.22 N`` steps, then windows shrinking by
  ``0.03 N`` down to ``0.06 N``; at a checkpoint an example halves its step
  size and restarts from its best point when the loss rose in at most 75% of
  the window's steps, or when its step was not halved at the previous
  checkpoint and its best loss has not improved since;
* losses ``"ce"``, ``"dlr"`` and ``"dlr-targeted"`` (:mod:`gbjax.attacks.losses`).

One deviation, documented: the first window compares the first iterate's loss
with the starting point's (the reference implementation compares it with an
uninitialised zero).

On CPU the loop runs as a host loop over compiled chunks of 10 unrolled steps
(XLA:CPU runs convolutions in a ``while`` loop about 3x slower, measured on
the airbench network); elsewhere as one compiled loop.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from gbjax import _random, _xla
from gbjax._batching import Shrinking, take_rows
from gbjax._callables import LogitsFn
from gbjax._checks import check_int, check_scalar
from gbjax.attacks._core import (
    as_logits_fn,
    call,
    check_attack_labels,
    check_clip,
    check_eot,
    check_loss,
    check_xy,
    chunk_plan,
    correct_from_logits,
    is_zero,
    num_classes_of,
    per_image,
    projection,
    value_grad,
)
from gbjax.attacks.losses import LOSSES, ranked_targets

__all__ = ["apgd", "APGD_LOSSES", "checkpoints"]

APGD_LOSSES = ("ce", "dlr", "dlr-targeted")


def checkpoints(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``(is_checkpoint (steps,) bool, window (steps,) int)``: after step ``i``
    (0-based) a checkpoint closes a window of ``window[i]`` steps."""
    k = max(int(0.22 * steps), 1)
    decr, kmin = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    is_ckpt, window = np.zeros(steps, bool), np.zeros(steps, np.int32)
    counter = 0
    for i in range(steps):
        counter += 1
        if counter == k:
            is_ckpt[i], window[i] = True, k
            k, counter = max(k - decr, kmin), 0
    return is_ckpt, window


class _State(NamedTuple):
    x_adv: Any
    x_prev: Any
    grad: Any
    loss: Any  # (B,) at x_adv
    x_best: Any
    loss_best: Any
    grad_best: Any
    step: Any  # (B,)
    n_incr: Any  # (B,) loss increases in the current window
    loss_best_last: Any
    reduced_last: Any
    robust: Any  # (B,) the scored model was right at every iterate so far
    x_found: Any  # last successful iterate: misclassified (classified as the target if targeted)
    found: Any


def _correct(eval_fn, x, y, logits, key):
    if logits is None:
        logits = call(eval_fn, x, key)
    return correct_from_logits(logits, y)  # NaN or inf logits count as wrong


def _b(v):
    return v[:, None, None, None]


def _hit(fn, x, y, target, logits, key, misclassified, loss_id):
    """Success for the returned images: misclassified, or classified as the target
    (the targeted loss, index 3 of LOSSES)."""
    if logits is None:
        logits = call(fn, x, key)
    on_target = correct_from_logits(logits, target)
    return jnp.where(loss_id == LOSSES.index("dlr-targeted"), on_target, misclassified)


def _init(fn, eval_fn, x, y, target, key, eps, lo, hi, loss, *, eot_samples, shared):
    k_start, k_grad, k_eval = jax.random.split(key, 3)
    t = _random.uniform(k_start, x.shape, x.dtype, -1.0, 1.0)
    t = (
        t
        / jnp.maximum(jnp.max(jnp.abs(t).reshape(x.shape[0], -1), axis=1), 1e-12)[
            :, None, None, None
        ]
    )
    x0 = jnp.clip(x + per_image(eps, x) * t, lo, hi).astype(x.dtype)
    per, g, logits = value_grad(fn, x0, y, k_grad, eot_samples, loss, target)
    ek = None if eot_samples is None else k_eval
    correct = _correct(eval_fn, x0, y, logits if shared else None, ek)
    hit = _hit(fn, x0, y, target, logits, k_eval, ~correct, loss)
    B = x.shape[0]
    return _State(
        x_adv=x0,
        x_prev=x0,
        grad=g,
        loss=per,
        x_best=x0,
        loss_best=per,
        grad_best=g,
        step=jnp.full((B,), 2.0, jnp.float32) * jnp.asarray(eps, jnp.float32),  # eps () or (B,)
        n_incr=jnp.zeros(B, jnp.int32),
        loss_best_last=per,
        reduced_last=jnp.ones(B, bool),
        robust=correct,
        x_found=x0,
        found=hit,
    )


def _chunk(
    fn,
    eval_fn,
    st,
    x,
    y,
    target,
    key,
    eps,
    i0,
    steps,
    is_ckpt,
    window,
    lo,
    hi,
    loss,
    *,
    n,
    unroll,
    eot_samples,
    shared,
):
    project = projection(x, eps, lo, hi)

    def body(j, st):
        i = i0 + j
        active = i < steps
        a = jnp.where(i > 0, 0.75, 1.0)
        z = project(st.x_adv + _b(st.step) * jnp.sign(st.grad))
        x_new = project(st.x_adv + a * (z - st.x_adv) + (1.0 - a) * (st.x_adv - st.x_prev))
        kg = None if eot_samples is None else jax.random.fold_in(key, 2 * i)
        ke = None if eot_samples is None else jax.random.fold_in(key, 2 * i + 1)
        per, g, logits = value_grad(fn, x_new, y, kg, eot_samples, loss, target)
        correct = _correct(eval_fn, x_new, y, logits if shared else None, ke)
        hit = _hit(fn, x_new, y, target, logits, ke, ~correct, loss)
        improved = per > st.loss_best
        loss_best = jnp.where(improved, per, st.loss_best)
        x_best = jnp.where(_b(improved), x_new, st.x_best)
        grad_best = jnp.where(_b(improved), g, st.grad_best)
        n_incr = st.n_incr + (per > st.loss).astype(jnp.int32)
        ic = jnp.clip(i, 0, is_ckpt.shape[0] - 1)
        ck, win = is_ckpt[ic], window[ic]
        osc = n_incr.astype(jnp.float32) <= 0.75 * win.astype(jnp.float32)
        no_impr = ~st.reduced_last & (st.loss_best_last >= loss_best)
        reduce = ck & (osc | no_impr)
        new = _State(
            x_adv=jnp.where(_b(reduce), x_best, x_new),
            x_prev=st.x_adv,
            grad=jnp.where(_b(reduce), grad_best, g),
            loss=per,
            x_best=x_best,
            loss_best=loss_best,
            grad_best=grad_best,
            step=jnp.where(reduce, st.step / 2, st.step),
            n_incr=jnp.where(ck, 0, n_incr),
            loss_best_last=jnp.where(ck, loss_best, st.loss_best_last),
            reduced_last=jnp.where(ck, osc | no_impr, st.reduced_last),
            robust=st.robust & correct,
            x_found=jnp.where(_b(hit), x_new, st.x_found),
            found=st.found | hit,
        )
        return jax.tree.map(lambda u, v: jnp.where(active, u, v), new, st)

    if n == 1:  # one step per call: no loop at all (programs that hold GB compile slowly)
        return body(0, st)
    return jax.lax.fori_loop(0, n, body, st, unroll=n if unroll else 1)


_STATIC = ("eot_samples", "shared")  # the loss is a traced index: CE and DLR share programs
_init_jit = _xla.conv_jit(_init, static_argnames=_STATIC)
_chunk_jit = _xla.conv_jit(_chunk, static_argnames=("n", "unroll") + _STATIC)


@_xla.conv_jit(static_argnames=("rank",))
def _targets(fn, x, y, *, rank):
    return ranked_targets(fn(x), y, rank)


def apgd_run(
    fn,
    eval_fn,
    x,
    y,
    key,
    eps,
    *,
    steps,
    loss,
    target_rank=1,
    lo=0.0,
    hi=1.0,
    eot_samples=None,
    shared=False,
    chunk=None,
    stop_early=True,
    compact=False,
):
    """``(robust_B, x_result)``: APGD on ``fn`` scored by ``eval_fn`` at every iterate
    (``robust``: right at all of them), and per example the last successful
    iterate (misclassified; classified as the target for ``"dlr-targeted"``), else
    the one with the highest loss. ``stop_early``: stop once every
    image has been misclassified (the result can no longer change ``robust``).
    ``compact`` (with ``stop_early``, deterministic attacks only): between compiled
    chunks, go on with the still-robust rows only, in a smaller batch
    (:class:`gbjax._batching.Shrinking`); the flags are those of the full batch, and
    a fallen row's result is its last successful iterate before it was dropped."""
    target = None
    k_targets, key = jax.random.split(key)
    if loss == "dlr-targeted":
        tk = None if eot_samples is None else k_targets
        k = num_classes_of(fn, x, tk)
        if k < 4:  # the loss would silently be 0 (loss_by_index has no index 3)
            raise ValueError(
                f"the targeted DLR loss (APGD-T) needs at least 4 classes; the model has "
                f"{k}: use loss='ce' or 'dlr'"
            )
        logits_fn = fn if tk is None else (lambda v: call(fn, v, tk))
        target = _targets(as_logits_fn(logits_fn), x, y, rank=int(target_rank))
    static = dict(eot_samples=eot_samples, shared=shared)
    loss_id = jnp.int32(LOSSES.index(loss))
    if target is None:
        target = jnp.zeros_like(jnp.asarray(y))  # unused by CE and DLR; one program shape
    st = _init_jit(fn, eval_fn, x, y, target, key, eps, lo, hi, loss_id, **static)
    n, unroll = chunk_plan(steps, chunk)
    # padded to a power of two: the chunk compiles for few step counts, not each one
    size = 1 << (steps - 1).bit_length()
    is_ckpt, window = (jnp.asarray(np.pad(a, (0, size - steps))) for a in checkpoints(steps))
    B = x.shape[0]
    rows = Shrinking(B) if compact and stop_early and eot_samples is None else None
    out = None  # (robust, x_result) of the first batch's rows, where rows were dropped
    for i0 in range(0, steps, n):
        st = _chunk_jit(
            fn,
            eval_fn,
            st,
            x,
            y,
            target,
            key,
            eps,
            i0,
            steps,
            is_ckpt,
            window,
            lo,
            hi,
            loss_id,
            n=n,
            unroll=unroll,
            **static,
        )
        alive = np.asarray(st.robust)
        if stop_early and not alive.any():
            break
        if rows is not None and i0 + n < steps:
            before = rows.pos
            sel = rows.keep(alive)
            if sel is not None:
                out = _scatter(out, before, st)
                st = _State(*take_rows(sel, *st))
                x, y, target, eps = take_rows(sel, x, y, target, eps)
    if rows is None:
        return st.robust, _result(st)
    robust, x_result = _scatter(out, rows.pos, st)
    return robust, x_result


def _result(st):
    return jnp.where(_b(st.found), st.x_found, st.x_best)


def _scatter(out, pos, st):
    """``out`` (the first batch's flags and results) with the rows ``pos`` set from ``st``."""
    if out is None:
        return st.robust, _result(st)  # the first batch: pos is every row, in order
    robust, x_result = out
    return robust.at[pos].set(st.robust), x_result.at[pos].set(_result(st))


def apgd(
    logits_fn: LogitsFn,
    x: ArrayLike,
    y: ArrayLike,
    *,
    eps: ArrayLike,
    steps: int = 100,
    loss: str = "ce",
    key: jax.Array | None = None,
    target_rank: int = 1,
    clip: tuple[float, float] = (0.0, 1.0),
    eot_samples: int | None = None,
    chunk: int | None = None,
) -> jax.Array:
    """APGD (L-inf, Croce & Hein 2020); see the module docstring.

    Args:
      logits_fn: logits function (see :mod:`gbjax.attacks`).
      x: float images ``(B, H, W, C)`` in ``[0, 1]``; ``y``: true labels ``(B,)``.
      eps: L-inf budget on the [0, 1] scale.
      steps: iterations ``N`` (the checkpoints scale with it).
      loss: ``"ce"``, ``"dlr"`` or ``"dlr-targeted"``; the targeted loss aims at
        the class with the ``target_rank``-th largest clean logit other than ``y``.
      key: PRNG key (random start; required).
      eot_samples: average gradients over random draws of a randomised model.
      chunk: steps per compiled call (default: 10 on CPU, all steps elsewhere).

    Returns:
      Per example the last successful iterate (misclassified; with
      ``"dlr-targeted"``, classified as the target), else the highest-loss one.

    Example:
      A two-class model on one-pixel images (class 1 above 0.5): the image at
      0.45 is within ``eps`` of the boundary and crosses it, the one at 0.1 is not.

      >>> import jax, jax.numpy as jnp
      >>> from gbjax import attacks
      >>> def logits(x):
      ...     v = x.reshape(-1, 1) - 0.5
      ...     return jnp.concatenate([-v, v], axis=1)
      >>> x = jnp.array([0.1, 0.45]).reshape(2, 1, 1, 1)
      >>> adv = attacks.apgd(logits, x, jnp.array([0, 0]), eps=0.1, steps=4, chunk=1,
      ...                    key=jax.random.key(0))
      >>> (jnp.argmax(logits(adv), -1) == 0).tolist()
      [True, False]
    """
    check_loss(loss, APGD_LOSSES)
    if key is None:
        raise ValueError("apgd needs an explicit PRNG key for its random start: key=...")
    check_scalar("eps", eps, strict=False)
    lo, hi = check_clip(clip)
    check_eot(eot_samples, key)
    check_xy(x, y, clip=(lo, hi))
    check_int("steps", steps)
    fn = as_logits_fn(logits_fn)
    check_attack_labels(fn, x, y, key, eot_samples)
    if is_zero(eps):
        return jnp.asarray(x)
    _, out = apgd_run(
        fn,
        fn,
        jnp.asarray(x),
        jnp.asarray(y),
        key,
        jnp.float32(eps),
        steps=int(steps),
        loss=loss,
        target_rank=target_rank,
        lo=lo,
        hi=hi,
        eot_samples=eot_samples,
        shared=True,
        chunk=chunk,
    )
    return out
