"""Gradient attacks in pixel space: FGSM, PGD, BPDA and EOT (METHODS.md section 3).

Conventions
-----------
* ``x`` is a batch of float images in ``[0, 1]``, NHWC.  Normalisation belongs
  inside the logits function, so ``eps`` is measured in pixel space.
* ``y`` holds integer labels of shape ``(B,)``: the true labels for an
  untargeted attack, the *target* labels for ``targeted=True``.
* The loss is softmax cross-entropy on logits (``optax``), summed over the
  batch so that every example gets its own, unscaled gradient.
* A *logits function* is any of

  - a callable ``f(x) -> logits``;
  - a :class:`jax.tree_util.Partial`, e.g. ``Partial(apply_fn, params)``:
    its arguments travel through ``jit`` as ordinary arrays, so new parameters
    with the same shapes never trigger a recompile.  Its arguments are traced,
    so static configuration (ints, strings, e.g. ``capacity=`` of
    ``gb_denoise``) belongs in a ``functools.partial`` built once instead;
  - a ``flax.nnx.Module`` (put it in eval mode first): it is split into a
    static graph definition and array state, so two models with the same
    structure share one compiled attack.

  A plain Python closure is compiled once per distinct function object: build
  it once and reuse it, or use one of the two forms above.
* *Randomised* logits functions (a randomised preprocessing defence in front of
  a classifier) have the signature ``f(x, key)``.  Attack them with
  ``eot_samples=n`` and an explicit ``key``: the gradient is then averaged over
  ``n`` draws (Expectation over Transformation).  Logits functions are called
  with a key exactly when ``eot_samples`` is not ``None``.

Every attack is one ``jax.jit`` per input shape; ``eps`` and ``step_size`` are
traced values, so sweeping them does not recompile.  The PGD loop is a
``lax.fori_loop`` inside that single ``jit``, with ``steps`` traced too, except
on CPU, where short loops are unrolled by default (``steps`` then static; see
:func:`pgd`'s ``unroll``).

Preprocessing defences are attacked three ways (:func:`make_attack_logits`):
``"oblivious"``, ``"end_to_end"`` and ``"bpda"`` (:func:`bpda`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import Partial

__all__ = [
    "fgsm",
    "pgd",
    "bpda",
    "BPDA",
    "make_attack_logits",
    "AttackPipeline",
    "PROTOCOLS",
    "loss_gradient",
    "attack_loss",
    "accuracy_under_attack",
    "attack_sanity_check",
    "SanityReport",
    "as_logits_fn",
]

PROTOCOLS = ("oblivious", "end_to_end", "bpda")
_ATTACKS = ("fgsm", "pgd")

LogitsFn = Callable[..., jax.Array]


# ---------------------------------------------------------------------------
# Making logits functions jit-friendly pytrees
# ---------------------------------------------------------------------------


class _NNXCall:
    """Hashable callable ``(state, *args) -> merge(graphdef, state)(*args)``.

    Equality and hash follow the graph definition, so two modules with the same
    structure produce equal ``Partial`` tree definitions and share a compile.
    """

    def __init__(self, graphdef):
        self.graphdef = graphdef

    def __call__(self, state, *args, **kwargs):
        from flax import nnx

        return nnx.merge(self.graphdef, state)(*args, **kwargs)

    def __eq__(self, other):
        return isinstance(other, _NNXCall) and self.graphdef == other.graphdef

    def __hash__(self):
        return hash((_NNXCall, self.graphdef))


def _is_nnx_module(obj) -> bool:
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(obj, nnx.Module)


def as_logits_fn(fn) -> Callable[..., jax.Array]:
    """Returns ``fn`` as a pytree callable that can be passed through ``jit``.

    ``Partial`` objects and :class:`AttackPipeline`/:class:`BPDA` instances
    are returned unchanged; an ``nnx.Module`` becomes
    ``Partial(<graphdef call>, state)`` (its state as of this call); any other
    callable becomes ``Partial(fn)`` (compiled once per function object).
    """
    if isinstance(fn, (Partial, AttackPipeline, BPDA)):
        return fn
    if _is_nnx_module(fn):
        from flax import nnx

        graphdef, state = nnx.split(fn)
        return Partial(_NNXCall(graphdef), state)
    if callable(fn):
        return Partial(fn)
    raise TypeError(f"logits_fn must be callable or an nnx.Module, got {type(fn).__name__}")


# ---------------------------------------------------------------------------
# Argument checks (only on concrete values; tracers pass through)
# ---------------------------------------------------------------------------


def _concrete(v):
    """Returns a Python/NumPy value for ``v`` or ``None`` when it is traced."""
    if isinstance(v, jax.core.Tracer):
        return None
    try:
        return np.asarray(v)
    except Exception:  # pragma: no cover - exotic array types
        return None


def _check_nonneg(name: str, v) -> None:
    c = _concrete(v)
    if c is None:
        return
    if c.ndim != 0 or not np.isfinite(c) or c < 0:
        raise ValueError(f"{name} must be a finite scalar >= 0, got {v!r}")


def _check_positive(name: str, v) -> None:
    c = _concrete(v)
    if c is None:
        return
    if c.ndim != 0 or not np.isfinite(c) or c <= 0:
        raise ValueError(f"{name} must be a finite scalar > 0, got {v!r}")


def _check_steps(steps) -> None:
    c = _concrete(steps)
    if c is None:
        return
    if c.ndim != 0 or not np.issubdtype(c.dtype, np.integer) or c < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def _check_clip(clip) -> tuple[float, float]:
    try:
        lo, hi = clip
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise ValueError(f"clip must be a pair (low, high) of numbers, got {clip!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"clip must satisfy finite low < high, got {clip!r}")
    return lo, hi


def _check_eot(eot_samples, key) -> None:
    if eot_samples is None:
        return
    if (
        isinstance(eot_samples, bool)
        or not isinstance(eot_samples, numbers.Integral)
        or eot_samples < 1
    ):
        raise ValueError(f"eot_samples must be None or an integer >= 1, got {eot_samples!r}")
    if key is None:
        raise ValueError("eot_samples needs an explicit PRNG key: pass key=jax.random.key(...)")


def _check_xy(x, y) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(
            f"x must be a float array in [0, 1] (got dtype {jnp.result_type(x)}); "
            "convert uint8 images with x / 255"
        )
    if jnp.ndim(x) < 1 or jnp.ndim(y) != 1 or jnp.shape(y)[0] != jnp.shape(x)[0]:
        raise ValueError(
            f"y must be integer labels of shape (B,) matching x's batch; "
            f"got x {jnp.shape(x)} and y {jnp.shape(y)}"
        )
    if not jnp.issubdtype(jnp.result_type(y), jnp.integer):
        raise ValueError(f"y must hold integer labels, got dtype {jnp.result_type(y)}")


def _is_zero(v) -> bool:
    c = _concrete(v)
    return c is not None and c.ndim == 0 and c == 0


# ---------------------------------------------------------------------------
# Loss and (EOT-averaged) gradient
# ---------------------------------------------------------------------------


def _call(fn, x, key):
    return fn(x) if key is None else fn(x, key)


def _ce_per_example(logits_BK, y_B):
    return optax.softmax_cross_entropy_with_integer_labels(logits_BK.astype(jnp.float32), y_B)


def _grad_impl(fn, x, y, key, eot_samples):
    def loss_sum(x_, k):
        return jnp.sum(_ce_per_example(_call(fn, x_, k), y))

    grad_fn = jax.grad(loss_sum)
    if eot_samples is None:
        return grad_fn(x, None)
    keys = jax.random.split(key, eot_samples)

    def body(i, acc):
        return acc + grad_fn(x, keys[i])

    return jax.lax.fori_loop(0, eot_samples, body, jnp.zeros_like(x)) / eot_samples


@functools.partial(jax.jit, static_argnames=("eot_samples",))
def _loss_gradient_jit(fn, x, y, key, *, eot_samples):
    return _grad_impl(fn, x, y, key, eot_samples)


def loss_gradient(logits_fn, x, y, *, key=None, eot_samples=None):
    """Gradient w.r.t. ``x`` of the summed cross-entropy ``CE(logits_fn(x), y)``.

    With ``eot_samples=n`` the logits function is called as ``logits_fn(x, k)``
    for ``k`` in ``jax.random.split(key, n)`` and the ``n`` gradients are
    averaged (EOT).  Returns an array shaped like ``x``.
    """
    _check_eot(eot_samples, key)
    return _loss_gradient_jit(as_logits_fn(logits_fn), x, y, key, eot_samples=eot_samples)


@jax.jit
def _attack_loss_jit(fn, x, y, key):
    return _ce_per_example(_call(fn, x, key), y)


def attack_loss(logits_fn, x, y, *, key=None):
    """Per-example cross-entropy ``(B,)`` of ``logits_fn`` on ``(x, y)``.

    Pass ``key`` for a randomised logits function ``f(x, key)``.
    """
    return _attack_loss_jit(as_logits_fn(logits_fn), x, y, key)


# ---------------------------------------------------------------------------
# FGSM and PGD
# ---------------------------------------------------------------------------


def _fgsm_impl(fn, x, y, key, eps, lo, hi, targeted, eot_samples):
    g = _grad_impl(fn, x, y, key, eot_samples)
    direction = -jnp.sign(g) if targeted else jnp.sign(g)
    x_adv = jnp.clip(x + eps * direction, lo, hi).astype(x.dtype)
    return jnp.where(eps == 0, x, x_adv)


def _pgd_impl(
    fn, x, y, key, eps, step_size, steps, lo, hi, random_start, targeted, eot_samples, unroll=1
):
    eps = jnp.asarray(eps, x.dtype)

    def project(v):
        return jnp.clip(jnp.clip(v, x - eps, x + eps), lo, hi)

    if random_start:
        key, start_key = jax.random.split(key)
        x_adv = project(x + jax.random.uniform(start_key, x.shape, x.dtype, -eps, eps))
    else:
        x_adv = x

    def body(i, x_adv):
        k = None if eot_samples is None else jax.random.fold_in(key, i)
        g = _grad_impl(fn, x_adv, y, k, eot_samples)
        direction = -jnp.sign(g) if targeted else jnp.sign(g)
        return project(x_adv + step_size * direction).astype(x.dtype)

    if unroll == 1:
        x_adv = jax.lax.fori_loop(0, steps, body, x_adv)  # steps may be traced
    else:
        x_adv = jax.lax.fori_loop(0, steps, body, x_adv, unroll=unroll)  # static steps
    return jnp.where(eps == 0, x, x_adv)


def _restart_key(key, r):
    # Restart 0 uses the caller's key unchanged, so restarts=1 is plain PGD and
    # restart r's iterate does not depend on how many restarts follow it.
    return key if r == 0 else jax.random.fold_in(key, r)


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
):
    """Best of ``restarts`` PGD runs per example: one that succeeds (misclassified,
    or classified as the target) first, then the highest loss (lowest if targeted)."""
    best = _pgd_impl(
        fn, x, y, key, eps, step_size, steps, lo, hi, random_start, targeted, eot_samples, unroll
    )
    if restarts == 1:
        return best

    def score(x_adv, k):
        # With EOT the candidates are scored on one draw of the randomised model.
        k = None if eot_samples is None else jax.random.fold_in(k, 0x7FFFFFFF)
        logits = _call(fn, x_adv, k)
        hit = (jnp.argmax(logits, -1) == y) if targeted else (jnp.argmax(logits, -1) != y)
        loss = _ce_per_example(logits, y)
        return hit, (-loss if targeted else loss)

    best_hit, best_score = score(best, key)
    # A static loop: restarts are few, and on CPU a while loop around the
    # (unrolled) PGD body would run its convolutions several times slower.
    for r in range(1, restarts):
        k = _restart_key(key, r)
        cand = _pgd_impl(
            fn, x, y, k, eps, step_size, steps, lo, hi, random_start, targeted, eot_samples, unroll
        )
        hit, sc = score(cand, k)
        better = (hit & ~best_hit) | ((hit == best_hit) & (sc > best_score))
        best = jnp.where(better.reshape((-1,) + (1,) * (x.ndim - 1)), cand, best)
        best_hit, best_score = best_hit | hit, jnp.where(better, sc, best_score)
    return best


_fgsm_jit = jax.jit(_fgsm_impl, static_argnames=("targeted", "eot_samples"))
_pgd_jit = jax.jit(
    _pgd_restarts_impl, static_argnames=("random_start", "targeted", "eot_samples", "restarts")
)
_pgd_jit_unrolled = jax.jit(
    _pgd_restarts_impl,
    static_argnames=("steps", "random_start", "targeted", "eot_samples", "unroll", "restarts"),
)


def _check_restarts(restarts, random_start, eot_samples) -> int:
    if not isinstance(restarts, numbers.Integral) or isinstance(restarts, bool) or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")
    if restarts > 1 and not random_start and eot_samples is None:
        raise ValueError(
            "restarts > 1 needs random_start=True (or a randomised model with "
            "eot_samples): otherwise every restart is the same run"
        )
    return int(restarts)


# XLA:CPU runs convolutions inside a while loop several times slower than the
# same ops outside one (jax-ml/jax#12868; about 3.5x for a small CNN here, and
# partial unrolling does not help), so on CPU short PGD loops are unrolled.
_CPU_UNROLL_MAX_STEPS = 50


def _resolve_unroll(unroll, steps) -> int:
    """``fori_loop`` unroll factor: 1 means a while loop with ``steps`` traced;
    anything larger needs a concrete ``steps`` (``steps`` itself = full unroll)."""
    c = _concrete(steps)
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
        raise ValueError(f"unroll must be None, a bool or an integer >= 1, got {unroll!r}")
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
):
    """Fast Gradient Sign Method (L-inf, one step).

    ``x' = clip(x + eps * sign(grad_x CE(logits_fn(x), y)), *clip)``; with
    ``targeted=True`` the step is ``-eps * sign(...)`` towards the labels ``y``.

    Args:
      logits_fn: logits function (see module docstring); ``f(x, key)`` when
        ``eot_samples`` is given.
      x: float images ``(B, H, W, C)`` in ``[0, 1]``.
      y: integer labels ``(B,)`` (targets when ``targeted``).
      eps: L-inf budget in pixel units, ``>= 0``; ``eps == 0`` returns ``x``.
      clip: valid pixel range ``(low, high)``.
      targeted: minimise the loss towards ``y`` instead of maximising it.
      key: PRNG key, required with ``eot_samples``.
      eot_samples: average the gradient over this many random draws (EOT).

    Returns:
      Adversarial images, same shape and dtype as ``x``.
    """
    _check_nonneg("eps", eps)
    lo, hi = _check_clip(clip)
    _check_eot(eot_samples, key)
    _check_xy(x, y)
    if _is_zero(eps):
        return jnp.asarray(x)
    return _fgsm_jit(
        as_logits_fn(logits_fn),
        x,
        y,
        key,
        eps,
        lo,
        hi,
        targeted=bool(targeted),
        eot_samples=eot_samples,
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

    Returns:
      Adversarial images, same shape and dtype as ``x``.
    """
    _check_nonneg("eps", eps)
    _check_positive("step_size", step_size)
    _check_steps(steps)
    lo, hi = _check_clip(clip)
    _check_eot(eot_samples, key)
    if random_start and key is None:
        raise ValueError(
            "random_start=True needs an explicit PRNG key: pass key=jax.random.key(...) "
            "or random_start=False"
        )
    _check_xy(x, y)
    restarts = _check_restarts(restarts, random_start, eot_samples)
    unroll = _resolve_unroll(unroll, steps)
    if _is_zero(eps):
        return jnp.asarray(x)
    common = dict(
        random_start=bool(random_start),
        targeted=bool(targeted),
        eot_samples=eot_samples,
        restarts=restarts,
    )
    fn = as_logits_fn(logits_fn)
    if unroll == 1:
        return _pgd_jit(fn, x, y, key, eps, step_size, steps, lo, hi, **common)
    return _pgd_jit_unrolled(
        fn, x, y, key, eps, step_size, int(steps), lo, hi, unroll=unroll, **common
    )


# ---------------------------------------------------------------------------
# BPDA and the three protocols for preprocessing defences
# ---------------------------------------------------------------------------


def _zero_cotangents(tree):
    return jax.tree_util.tree_map(lambda _: None, tree)


@jax.custom_vjp
def _bpda_apply(x, forward, backward, args):
    return forward(x, *args)


def _bpda_fwd(x, forward, backward, args):
    return forward(x, *args), (x, forward, backward, args)


def _bpda_bwd(res, g):
    x, forward, backward, args = res
    if backward is None:
        if g.shape != x.shape:
            raise ValueError(
                f"bpda with identity backward needs forward to keep the input shape; "
                f"got {x.shape} -> {g.shape}. Pass a smooth `backward` instead."
            )
        ct_x = g.astype(x.dtype)
    else:
        _, vjp = jax.vjp(lambda x_: backward(x_, *args), x)
        (ct_x,) = vjp(g)
    return ct_x, _zero_cotangents(forward), _zero_cotangents(backward), _zero_cotangents(args)


_bpda_apply.defvjp(_bpda_fwd, _bpda_bwd)


@jax.tree_util.register_pytree_node_class
class BPDA:
    """A preprocessor with an exact forward pass and a substitute backward pass.

    Built by :func:`bpda`.  Calling ``g(x, *args)`` returns
    ``forward(x, *args)``; its VJP w.r.t. ``x`` is the identity, or the VJP of
    ``backward(x, *args)`` when a smooth approximation was given.  Extra
    arguments (e.g. a PRNG key) receive zero cotangents.  A pytree, so it can
    be passed through ``jit``.
    """

    def __init__(self, forward, backward=None):
        self.forward = as_logits_fn(forward)
        self.backward = None if backward is None else as_logits_fn(backward)

    def __call__(self, x, *args):
        return _bpda_apply(x, self.forward, self.backward, tuple(args))

    def tree_flatten(self):
        return (self.forward, self.backward), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.forward, obj.backward = children
        return obj

    def __repr__(self):
        return f"BPDA(forward={self.forward!r}, backward={self.backward!r})"


def bpda(forward, backward=None) -> BPDA:
    """Backward Pass Differentiable Approximation (Athalye et al., 2018).

    Wraps a non-differentiable preprocessor ``forward(x, *args)`` (quantisation,
    a granular-ball denoiser, ...) via ``jax.custom_vjp``: the forward pass is
    exact; the backward pass is the identity (``forward`` must then preserve
    the shape of ``x``) or, if ``backward`` is given, the VJP of that smooth
    approximation ``backward(x, *args)``.

    Example::

        g = bpda(lambda x: jnp.round(x * 8) / 8)
        jax.grad(lambda x: g(x).sum())(x)   # == ones_like(x)
    """
    if not callable(forward) and not _is_nnx_module(forward):
        raise TypeError("forward must be callable")
    if backward is not None and not callable(backward):
        raise TypeError("backward must be callable or None")
    return BPDA(forward, backward)


@jax.tree_util.register_pytree_node_class
class AttackPipeline:
    """``classifier(preprocess(x[, key]))`` as a jit-friendly pytree.

    ``preprocess=None`` means the classifier alone (an *oblivious* attack);
    with ``randomized=True`` the pipeline is called as ``f(x, key)`` and the key
    goes to the preprocessor (and is ignored when there is none).
    """

    def __init__(self, classifier, preprocess=None, *, randomized: bool = False):
        self.classifier = as_logits_fn(classifier)
        self.preprocess = None if preprocess is None else as_logits_fn(preprocess)
        self.randomized = bool(randomized)

    def __call__(self, x, key=None):
        if self.randomized and key is None:
            raise ValueError(
                "this pipeline has a randomised preprocessor: call it as f(x, key) "
                "(attacks: pass eot_samples and key)"
            )
        if self.preprocess is not None:
            x = self.preprocess(x, key) if self.randomized else self.preprocess(x)
        return self.classifier(x)

    def tree_flatten(self):
        return (self.classifier, self.preprocess), self.randomized

    @classmethod
    def tree_unflatten(cls, randomized, children):
        obj = object.__new__(cls)
        obj.classifier, obj.preprocess = children
        obj.randomized = randomized
        return obj

    def __repr__(self):
        return (
            f"AttackPipeline(classifier={self.classifier!r}, preprocess={self.preprocess!r}, "
            f"randomized={self.randomized})"
        )


def make_attack_logits(
    classifier,
    preprocess,
    protocol: str,
    *,
    backward=None,
    randomized: bool = False,
) -> tuple[AttackPipeline, AttackPipeline]:
    """Logits functions for attacking a preprocessing defence ``f(g(x))``.

    Args:
      classifier: logits function ``f`` (callable, ``Partial`` or nnx module).
      preprocess: the defence ``g(x)``, or ``g(x, key)`` when ``randomized``.
        Must accept float images in ``[0, 1]`` inside ``jit``.
      protocol: one of

        * ``"oblivious"``: the attacker differentiates ``f`` alone; ``g`` is
          applied only at evaluation.
        * ``"end_to_end"``: ``jax.grad`` through ``f(g(x))`` as written (a
          piecewise-constant ``g`` yields zero gradients: gradient masking).
        * ``"bpda"``: ``f(bpda(g, backward)(x))``: exact forward, identity (or
          ``backward``'s VJP) backward.
      backward: smooth approximation of ``g`` for ``"bpda"``.
      randomized: ``g`` takes a PRNG key; both returned functions are then
        called as ``h(x, key)``; attack them with ``eot_samples``.

    Returns:
      ``(attack_logits_fn, eval_logits_fn)``: differentiate the first, score
      accuracy with the second (always ``f(g(x))``).  Both are pytrees, so they
      can be reused across calls without recompiling.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if backward is not None and protocol != "bpda":
        raise ValueError("backward is only used with protocol='bpda'")
    eval_fn = AttackPipeline(classifier, preprocess, randomized=randomized)
    if protocol == "oblivious":
        attack_fn = AttackPipeline(eval_fn.classifier, None, randomized=randomized)
    elif protocol == "end_to_end":
        attack_fn = eval_fn
    else:
        attack_fn = AttackPipeline(
            eval_fn.classifier, bpda(eval_fn.preprocess, backward), randomized=randomized
        )
    return attack_fn, eval_fn


# ---------------------------------------------------------------------------
# Accuracy under attack, batched over a data set
# ---------------------------------------------------------------------------


@functools.partial(
    jax.jit,
    static_argnames=(
        "steps",
        "attack",
        "random_start",
        "targeted",
        "eot_samples",
        "unroll",
        "restarts",
    ),
)
def _correct_under_attack(
    attack_fn,
    eval_fn,
    x_B,
    y_B,
    mask_B,
    key,
    eps,
    rel_step,
    steps,
    lo,
    hi,
    *,
    attack,
    random_start,
    targeted,
    eot_samples,
    unroll,
    restarts=1,
):
    if jnp.issubdtype(x_B.dtype, jnp.integer):
        x_B = x_B.astype(jnp.float32) / 255.0
    attack_key, eval_key = (None, None) if key is None else tuple(jax.random.split(key))
    eval_key = None if eot_samples is None else eval_key
    if attack == "fgsm":
        x_adv = _fgsm_impl(attack_fn, x_B, y_B, attack_key, eps, lo, hi, targeted, eot_samples)
        pred_B = jnp.argmax(_call(eval_fn, x_adv, eval_key), axis=-1)
        return jnp.sum((pred_B == y_B) & mask_B)
    step_size = rel_step * eps / steps
    # An example counts as correct only if the scored model gets every
    # restart's adversarial example right (a static loop; see _pgd_restarts_impl).
    correct_B = mask_B
    for r in range(restarts):
        x_adv = _pgd_impl(
            attack_fn,
            x_B,
            y_B,
            None if attack_key is None else _restart_key(attack_key, r),
            eps,
            step_size,
            steps,
            lo,
            hi,
            random_start,
            targeted,
            eot_samples,
            unroll,
        )
        pred_B = jnp.argmax(_call(eval_fn, x_adv, eval_key), axis=-1)
        correct_B = correct_B & (pred_B == y_B)
    return jnp.sum(correct_B)


def accuracy_under_attack(
    logits_fn,
    x,
    y,
    *,
    eps_list: Sequence[float],
    attack: str = "pgd",
    batch_size: int = 256,
    eval_logits_fn=None,
    key=None,
    steps: int = 10,
    rel_step: float = 2.5,
    random_start: bool = True,
    eot_samples: int | None = None,
    clip: tuple[float, float] = (0.0, 1.0),
    unroll: int | bool | None = None,
    restarts: int = 1,
    progress: bool = True,
    desc: str | None = None,
) -> np.ndarray:
    """Accuracy of ``eval_logits_fn`` on adversarial examples, for each eps.

    The data set is cut into batches of ``batch_size``; the last, ragged batch
    is padded and masked, so the whole sweep compiles once (eps is traced).

    Args:
      logits_fn: the function the attacker differentiates.
      x: images ``(N, H, W, C)``, float in ``[0, 1]`` or uint8 (divided by 255
        on device).  NumPy arrays stay on the host until batched.
      y: integer labels ``(N,)``.
      eps_list: budgets to evaluate; ``0`` gives clean accuracy.
      attack: ``"fgsm"`` or ``"pgd"``.
      batch_size: examples per device batch.
      eval_logits_fn: the function scored (default ``logits_fn``); see
        :func:`make_attack_logits`.
      key: PRNG key; required for PGD's random start and for EOT.
      steps: PGD iterations.
      rel_step: PGD step size as a multiple of ``eps / steps`` (2.5 as in
        Madry et al.).
      random_start, eot_samples, clip, unroll: as in :func:`pgd`.  With
        ``eot_samples`` both logits functions are called as ``f(x, key)``.
      restarts: PGD random restarts; an example counts as correct only if
        ``eval_logits_fn`` classifies the adversarial example of every restart
        correctly (restart 0 is the ``restarts=1`` attack, so accuracy never
        rises with more restarts).
      progress: show a tqdm progress bar.

    Returns:
      ``np.ndarray`` of accuracies in ``[0, 1]``, one per entry of ``eps_list``.
    """
    if attack not in _ATTACKS:
        raise ValueError(f"attack must be one of {_ATTACKS}, got {attack!r}")
    eps_list = [float(e) for e in eps_list]
    for e in eps_list:
        _check_nonneg("eps", e)
    lo, hi = _check_clip(clip)
    _check_eot(eot_samples, key)
    if attack == "pgd":
        _check_steps(steps)
        _check_positive("rel_step", rel_step)
        if random_start and key is None:
            raise ValueError("PGD with random_start=True needs an explicit PRNG key (key=...)")
        steps = int(steps)
        unroll = _resolve_unroll(unroll, steps)
        restarts = _check_restarts(restarts, random_start, eot_samples)
    else:
        if restarts != 1:
            raise ValueError("restarts applies to attack='pgd' only")
        steps, unroll = 1, 1
    if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    n = int(np.shape(x)[0])
    if np.ndim(y) != 1 or np.shape(y)[0] != n:
        raise ValueError(f"y must have shape ({n},), got {np.shape(y)}")
    if n == 0:
        raise ValueError("x is empty")
    x_dtype = np.dtype(getattr(x, "dtype", np.float32))
    if not (np.issubdtype(x_dtype, np.floating) or x_dtype == np.uint8):
        raise ValueError(f"x must be float in [0, 1] or uint8, got dtype {x_dtype}")

    attack_fn = as_logits_fn(logits_fn)
    eval_fn = attack_fn if eval_logits_fn is None else as_logits_fn(eval_logits_fn)
    bs = min(int(batch_size), n)
    num_batches = -(-n // bs)
    correct = np.zeros(len(eps_list), dtype=np.int64)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_batches * len(eps_list), desc=desc or f"{attack} sweep", leave=False)
    try:
        for b in range(num_batches):
            x_b = np.asarray(x[b * bs : (b + 1) * bs])
            y_b = np.asarray(y[b * bs : (b + 1) * bs]).astype(np.int32)
            m = x_b.shape[0]
            mask_b = np.arange(bs) < m
            if m < bs:  # pad the ragged last batch; padded rows are masked out
                x_b = np.concatenate([x_b, np.zeros((bs - m,) + x_b.shape[1:], x_b.dtype)])
                y_b = np.concatenate([y_b, np.zeros(bs - m, np.int32)])
            x_b, y_b, mask_b = jnp.asarray(x_b), jnp.asarray(y_b), jnp.asarray(mask_b)
            for i, e in enumerate(eps_list):
                k = None if key is None else jax.random.fold_in(jax.random.fold_in(key, b), i)
                c = _correct_under_attack(
                    attack_fn,
                    eval_fn,
                    x_b,
                    y_b,
                    mask_b,
                    k,
                    e,
                    rel_step,
                    steps,
                    lo,
                    hi,
                    attack=attack,
                    random_start=bool(random_start) and attack == "pgd",
                    targeted=False,
                    eot_samples=eot_samples,
                    unroll=unroll,
                    restarts=restarts,
                )
                correct[i] += int(c)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return correct / n


@dataclasses.dataclass(frozen=True)
class SanityReport:
    """Result of :func:`attack_sanity_check`."""

    eps: tuple[float, ...]
    fgsm_accuracy: tuple[float, ...]
    pgd_accuracy: tuple[float, ...]
    chance: float
    pgd_at_most_fgsm: bool
    reaches_chance: bool

    @property
    def ok(self) -> bool:
        return self.pgd_at_most_fgsm and self.reaches_chance

    def __str__(self) -> str:
        lines = [f"{'eps':>8} {'FGSM acc':>9} {'PGD acc':>9}"]
        for e, f, p in zip(self.eps, self.fgsm_accuracy, self.pgd_accuracy):
            lines.append(f"{e:8.4f} {f:9.4f} {p:9.4f}")
        lines.append(
            f"chance {self.chance:.3f}; PGD <= FGSM: {self.pgd_at_most_fgsm}; "
            f"reaches chance at eps={self.eps[-1]:g}: {self.reaches_chance}"
        )
        return "\n".join(lines)


def attack_sanity_check(
    logits_fn,
    x,
    y,
    *,
    eps_list: Sequence[float],
    num_classes: int,
    key,
    eval_logits_fn=None,
    steps: int = 10,
    batch_size: int = 256,
    tol: float = 0.01,
    chance_tol: float = 0.05,
    eot_samples: int | None = None,
    unroll: int | bool | None = None,
    progress: bool = False,
    raise_on_failure: bool = False,
) -> SanityReport:
    """Checks that PGD is at least as strong as FGSM and reaches chance.

    Runs :func:`accuracy_under_attack` with FGSM and PGD-``steps`` over
    ``eps_list`` (ascending; the last entry should be a large budget).  Passes
    when PGD accuracy ``<=`` FGSM accuracy ``+ tol`` at every eps, and PGD
    accuracy at the largest eps is ``<= 1/num_classes + chance_tol`` (for an
    undefended model; a defended one failing this is the interesting case).

    ``unroll`` is passed to PGD (see :func:`pgd`).  Raises ``AssertionError`` with the table when ``raise_on_failure`` and a
    check fails.
    """
    if not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if len(eps_list) == 0:
        raise ValueError("eps_list must not be empty")
    common = dict(
        eps_list=eps_list,
        batch_size=batch_size,
        eval_logits_fn=eval_logits_fn,
        eot_samples=eot_samples,
        progress=progress,
    )
    k_fgsm, k_pgd = jax.random.split(key)
    acc_fgsm = accuracy_under_attack(logits_fn, x, y, attack="fgsm", key=k_fgsm, **common)
    acc_pgd = accuracy_under_attack(
        logits_fn, x, y, attack="pgd", steps=steps, key=k_pgd, unroll=unroll, **common
    )
    chance = 1.0 / num_classes
    report = SanityReport(
        eps=tuple(float(e) for e in eps_list),
        fgsm_accuracy=tuple(float(a) for a in acc_fgsm),
        pgd_accuracy=tuple(float(a) for a in acc_pgd),
        chance=chance,
        pgd_at_most_fgsm=bool(np.all(acc_pgd <= acc_fgsm + tol)),
        reaches_chance=bool(acc_pgd[-1] <= chance + chance_tol),
    )
    if raise_on_failure and not report.ok:
        raise AssertionError(f"attack sanity check failed:\n{report}")
    return report
