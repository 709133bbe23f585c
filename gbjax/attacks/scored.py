"""Attacks that score every iterate: per image, is the scored model right at all of them?

Carlini et al. (2019) and AutoAttack count an image as robust only if the model
under evaluation classifies it correctly at every point the attack visits, not
just at the final iterate, which is judged by the *attacked* function: under
the oblivious and BPDA protocols that is not the defended model, and an
intermediate iterate that fooled the defended model would otherwise be thrown
away. These drivers return ``robust_B`` for a batch: the scored model
(``eval_fn``) was right at every iterate (clean correctness is checked by the
caller, once). When the attacked and scored functions are the same
(``shared``), the logits of the gradient pass are reused.

PGD runs as a host loop over compiled chunks of steps (see
``gbjax.attacks._core.chunk_plan``); FGSM and the random-sign control are one
compiled call each; a deterministic FGSM sweep over several budgets is one call
for all of them (:func:`fgsm_sweep_robust`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gbjax import _random, _xla
from gbjax._batching import Shrinking, take_rows
from gbjax.attacks._core import (
    call,
    chunk_plan,
    correct_from_logits,
    fgsm_impl,
    grad_impl,
    per_image,
    pgd_start,
    pgd_step,
)


def _correct(eval_fn, x, y, logits, key):
    if logits is None:
        logits = call(eval_fn, x, key)
    return correct_from_logits(logits, y)  # a NaN or inf logit counts as wrong


def _keys(key, eot_samples):
    if key is None:
        return None, None
    k_attack, k_eval = jax.random.split(key)
    return k_attack, (None if eot_samples is None else k_eval)


@_xla.conv_jit(static_argnames=("eot_samples",))
def correct(eval_fn, x, y, key, *, eot_samples):
    """``(B,)`` the scored model is right on ``x`` (a randomised one: on one draw)."""
    _, ek = _keys(key, eot_samples)
    return _correct(eval_fn, x, y, None, ek)


@_xla.conv_jit(static_argnames=("eot_samples", "loss", "targeted"))
def fgsm_robust(fn, eval_fn, x, y, key, eps, lo, hi, *, eot_samples, loss, targeted=False):
    ka, ek = _keys(key, eot_samples)
    x_adv = fgsm_impl(fn, x, y, ka, eps, lo, hi, targeted, eot_samples, loss)
    return _correct(eval_fn, x_adv, y, None, ek)


@_xla.conv_jit(static_argnames=("loss", "targeted"))
def fgsm_sweep_robust(fn, eval_fn, x, y, eps_E, lo, hi, *, loss, targeted=False):
    """``(E, B)``: the scored model is right on FGSM's image at each budget of
    ``eps_E``. FGSM's step direction ``sign(grad)`` is taken at the clean image, so
    it does not depend on eps: one gradient serves every budget (deterministic
    attacks only, no EOT), then one scoring pass per budget."""
    g = grad_impl(fn, x, y, None, None, loss)
    direction = -jnp.sign(g) if targeted else jnp.sign(g)

    def at(eps):
        x_adv = jnp.clip(x + eps * direction, lo, hi).astype(x.dtype)
        return _correct(eval_fn, jnp.where(eps == 0, x, x_adv), y, None, None)

    return jax.lax.map(at, eps_E)


@jax.jit
def sign_noise(x, key, eps, lo, hi):
    """The random-sign control's images: ``clip(x + eps * s)``, ``s`` uniform in {-1, +1}
    (scored with :func:`correct`, so no model program is compiled for it)."""
    s = jnp.where(_random.bernoulli(key, 0.5, x.shape), 1.0, -1.0)
    return jnp.clip(x + per_image(eps, x) * s, lo, hi).astype(x.dtype)


def _pgd_chunk(
    fn,
    eval_fn,
    x_adv,
    robust,
    x,
    y,
    key,
    eval_key,
    eps,
    step_size,
    i0,
    steps,
    lo,
    hi,
    *,
    n,
    unroll,
    eot_samples,
    loss,
    targeted,
    shared,
):
    step = pgd_step(fn, x, y, eps, step_size, lo, hi, targeted, eot_samples, loss)

    def body(j, carry):
        x_adv, robust = carry
        i = i0 + j
        active = i < steps
        x_next, _, logits = step(i, x_adv, key)
        ek = None if eval_key is None else jax.random.fold_in(eval_key, i)
        ok = _correct(eval_fn, x_adv, y, logits if shared else None, ek)
        return (jnp.where(active, x_next, x_adv), robust & (ok | ~active))

    if n == 1:  # one step per call: no loop at all (programs that hold GB compile slowly)
        return body(0, (x_adv, robust))
    return jax.lax.fori_loop(0, n, body, (x_adv, robust), unroll=n if unroll else 1)


_PGD_STATIC = ("eot_samples", "loss", "targeted", "shared")
_pgd_chunk_jit = _xla.conv_jit(_pgd_chunk, static_argnames=("n", "unroll") + _PGD_STATIC)


@_xla.conv_jit(static_argnames=("random_start",))
def _pgd_begin(x, key, eps, lo, hi, *, random_start):
    return pgd_start(x, key, eps, lo, hi, random_start)


def pgd_robust(
    fn,
    eval_fn,
    x,
    y,
    key,
    eps,
    step_size,
    steps,
    lo,
    hi,
    *,
    random_start=True,
    eot_samples=None,
    loss="ce",
    targeted=False,
    shared=False,
    chunk=None,
    compact=False,
):
    """``(robust_B, x_final)``: PGD on ``fn``, ``eval_fn`` right at the start, every
    iterate and the end.

    ``compact``: between compiled chunks, go on with the still-robust rows only, in a
    smaller batch (:class:`gbjax._batching.Shrinking`; deterministic attacks only:
    with EOT the draws depend on the batch). The flags are those of the full batch;
    a fallen row's ``x_final`` is its iterate when it was dropped."""
    ka, ek = _keys(key, eot_samples)
    x_adv, ka = _pgd_begin(x, ka, eps, lo, hi, random_start=bool(random_start))
    B = x.shape[0]
    robust = jnp.ones(B, bool)
    n, unroll = chunk_plan(steps, chunk)
    static = dict(eot_samples=eot_samples, loss=loss, targeted=targeted, shared=shared)
    rows = Shrinking(B) if compact and eot_samples is None else None
    x_out = x_adv
    for i0 in range(0, steps, n):
        x_adv, robust = _pgd_chunk_jit(
            fn,
            eval_fn,
            x_adv,
            robust,
            x,
            y,
            ka,
            ek,
            eps,
            step_size,
            i0,
            steps,
            lo,
            hi,
            n=n,
            unroll=unroll,
            **static,
        )
        alive = np.asarray(robust)
        if not alive.any():  # every image already fooled the scored model
            if rows is None:
                return robust, x_adv
            return _full(rows, B, alive), _full_x(rows, x_out, x_adv)
        if rows is not None and i0 + n < steps:
            before = rows.pos
            sel = rows.keep(alive)
            if sel is not None:
                x_out = x_out.at[before].set(x_adv)
                x_adv, robust, x, y, eps, step_size = take_rows(
                    sel, x_adv, robust, x, y, eps, step_size
                )
    # the last iterate, scored by the clean-scoring program (one compilation fewer)
    fk = None if ek is None else jax.random.fold_in(ek, 0x7FFFFFFF)
    ok = robust & correct(eval_fn, x_adv, y, fk, eot_samples=eot_samples)
    if rows is None:
        return ok, x_adv
    return _full(rows, B, np.asarray(ok)), _full_x(rows, x_out, x_adv)


def _full(rows, B, flags):
    """The flags of the current batch's rows placed back in a batch of ``B`` rows
    (rows dropped earlier had fallen: False)."""
    out = np.zeros(B, bool)
    out[rows.pos] = flags
    return jnp.asarray(out)


def _full_x(rows, x_out, x_cur):
    return x_out.at[rows.pos].set(x_cur)
