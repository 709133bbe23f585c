"""Shared attack machinery: argument checks, losses, gradients (with EOT) and
BPDA. Logits-function pytrees are :mod:`gbjax._callables`; the conventions are in
:mod:`gbjax.attacks`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from gbjax import _random, _xla
from gbjax._callables import LogitsFn, PytreeCallable, as_logits_fn, is_nnx_module
from gbjax._checks import check_int, concrete, fail, is_traced
from gbjax.attacks.losses import loss_by_index, per_example_loss

# ---------------------------------------------------------------------------
# Argument checks (only on concrete values; tracers pass through)
# ---------------------------------------------------------------------------


def check_clip(clip) -> tuple[float, float]:
    try:
        lo, hi = clip
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        lo = hi = None
    if lo is None:
        fail("clip", "a pair (low, high) of numbers", clip)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        fail("clip", "finite low < high", clip)
    return lo, hi


def check_eot(eot_samples, key) -> None:
    if check_int("eot_samples", eot_samples, optional=True) is None:
        return
    if key is None:
        raise ValueError("eot_samples needs an explicit PRNG key: pass key=jax.random.key(...)")


def check_xy(x, y, clip=(0.0, 1.0)) -> None:
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
    check_images01(x, clip=clip)


def _value_range(x) -> tuple[float, float, bool]:
    """``(min, max, all finite)`` of a concrete array; reduced on the device for a
    ``jax.Array`` (only three scalars come back), on the host otherwise."""
    if isinstance(x, jax.Array):
        with jax.ensure_compile_time_eval():  # a concrete array inside an outer jit
            v = jnp.asarray(x, jnp.float32)
            lo, hi, fin = jnp.min(v), jnp.max(v), jnp.all(jnp.isfinite(v))
            return float(lo), float(hi), bool(fin)
    a = np.asarray(x)
    return float(a.min()), float(a.max()), bool(np.all(np.isfinite(a)))


def check_images01(x, name: str = "x", clip=(0.0, 1.0)) -> None:
    """Refuses concrete float images outside [0, 1] (the library's convention: ``eps``
    is measured on that scale), or outside ``clip`` where an attack was given a wider
    pixel range on purpose. uint8 images, tracers and empty arrays pass."""
    if is_traced(x) or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        return
    if np.size(x) == 0:
        return
    lo, hi, finite = _value_range(x)
    if not finite:
        raise ValueError(f"{name} contains NaN or inf; attacks need float images in [0, 1]")
    lo_ok, hi_ok = min(0.0, float(clip[0])), max(1.0, float(clip[1]))
    if lo < lo_ok or hi > hi_ok:
        valid = "[0, 1]" if (lo_ok, hi_ok) == (0.0, 1.0) else f"[{lo_ok:g}, {hi_ok:g}] (clip)"
        raise ValueError(
            f"{name} must be float images in {valid} (eps is measured on that scale), got "
            f"values in [{lo:g}, {hi:g}]: divide 0..255 images by 255 (x / 255.0), and put "
            "any normalisation inside the logits function"
        )


def check_labels(y, num_classes: int, source: str = "the model's logits") -> None:
    """Refuses concrete labels outside ``[0, num_classes)``: an out-of-range label
    makes the losses NaN (every attack then returns NaN images) and can never be
    predicted, so the scores would be silently wrong."""
    c = concrete(y)
    if c is None or c.size == 0:
        return
    lo, hi = int(c.min()), int(c.max())
    if lo < 0 or hi >= num_classes:
        bad = np.flatnonzero((c < 0) | (c >= num_classes))
        raise ValueError(
            f"y holds labels outside [0, {num_classes}) ({num_classes} classes from "
            f"{source}): {len(bad)} of {c.size}, e.g. y[{bad[0]}] = {int(c[bad[0]])}; "
            "relabel the data to 0..num_classes-1 or use a model with more classes"
        )


def _logits_of(fn, x, key):
    return call(fn, x, key)


_logits_shape = jax.jit(_logits_of)  # only traced (eval_shape), never compiled
_logits_run = _xla.conv_jit(_logits_of)


def num_classes_of(fn, x, key=None) -> int:
    """The number of logits ``fn`` returns for a batch shaped like ``x`` (traced
    only, nothing runs; the trace is cached per function and shape)."""
    spec = jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
    out = _logits_shape.eval_shape(fn, spec, key)
    if len(out.shape) != 2 or out.shape[0] != spec.shape[0]:
        raise ValueError(
            f"the logits function must return logits of shape (B, num_classes) = "
            f"({spec.shape[0]}, K) for x of shape {spec.shape}, got {out.shape}"
        )
    return int(out.shape[-1])


def check_attack_labels(fn, x, y, key=None, eot_samples=None) -> None:
    """Labels in range for an attack on ``fn`` (the class count traced from ``fn``)."""
    if concrete(y) is None:
        return
    check_labels(y, num_classes_of(fn, x, None if eot_samples is None else key))


def correct_from_logits(logits_BK, y_B):
    """``(B,)`` bool: the logits' argmax is ``y`` and every logit is finite. An image
    with a NaN or inf logit counts as wrong, never as a class (``argmax`` of NaN
    logits is 0, which would count it as class 0)."""
    return (jnp.argmax(logits_BK, -1) == y_B) & jnp.all(jnp.isfinite(logits_BK), -1)


def _first_batch_logits(fn, x, key, eot_samples, batch_size):
    """Logits of the scored function on the first ``batch_size`` images of ``x``
    (uint8 divided by 255), on one draw with EOT."""
    xb = jnp.asarray(x[: min(int(np.shape(x)[0]), int(batch_size))])
    if jnp.issubdtype(xb.dtype, jnp.integer):
        xb = xb.astype(jnp.float32) / 255.0
    k = None if eot_samples is None or key is None else jax.random.fold_in(key, 0xC4EC)
    return np.asarray(_logits_run(fn, xb, k))


def check_scoring_inputs(
    logits_fn,
    x,
    y,
    *,
    eval_logits_fn=None,
    key=None,
    eot_samples=None,
    batch_size=256,
    num_classes=None,
    clip=(0.0, 1.0),
) -> None:
    """Checks before a robustness evaluation (:func:`gbjax.attacks.accuracy_under_attack`,
    :func:`gbjax.attacks.attack_sanity_check`), so that nothing is scored wrongly
    without a word:

    * float images must be in [0, 1] (uint8 images are divided by 255), or in the
      wider ``clip`` range an attack was given;
    * the scored model's logits on the first batch must be finite: ``argmax`` of
      NaN logits is class 0, so a broken model would score as ``1/num_classes``;
    * the labels must be in ``[0, K)`` for the model's ``K`` logits (and
      ``num_classes`` when given, which must equal ``K``).

    The scored model is ``eval_logits_fn``, else ``logits_fn``. Costs one forward
    pass of one batch.
    """
    check_images01(x, clip=clip)
    if num_classes is not None:
        check_labels(y, int(num_classes), source="num_classes")
    scored_fn = as_logits_fn(logits_fn if eval_logits_fn is None else eval_logits_fn)
    logits = _first_batch_logits(scored_fn, x, key, eot_samples, batch_size)
    if logits.ndim != 2:
        raise ValueError(
            f"the scored model must return (B, num_classes) logits, got {logits.shape}"
        )
    bad = np.flatnonzero(~np.all(np.isfinite(logits), axis=-1))
    if len(bad):
        raise ValueError(
            f"the scored model returned NaN or inf logits on {len(bad)} of the first "
            f"{len(logits)} clean images (e.g. image {bad[0]}); argmax would count them as "
            "class 0. Fix the model (weights, input scaling, normalisation) before scoring it"
        )
    k = logits.shape[-1]
    if num_classes is not None and k != int(num_classes):
        raise ValueError(
            f"num_classes={num_classes} but the scored model returns {k} logits; "
            "pass the model's number of classes"
        )
    check_labels(y, k)


def is_zero(v) -> bool:
    c = concrete(v)
    return c is not None and c.ndim == 0 and c == 0


# ---------------------------------------------------------------------------
# Loss and (EOT-averaged) gradient
# ---------------------------------------------------------------------------


def call(fn, x, key):
    return fn(x) if key is None else fn(x, key)


def _ce_per_example(logits_BK, y_B):
    return optax.softmax_cross_entropy_with_integer_labels(logits_BK.astype(jnp.float32), y_B)


# XLA:CPU runs convolutions inside a while loop about 3x slower than unrolled
# (measured on the airbench network, YNN fusion on or off), so iterative attacks
# run on CPU as a host loop over compiled chunks of unrolled steps.
CPU_CHUNK = 10


def chunk_plan(steps: int, chunk: int | None = None) -> tuple[int, bool]:
    """``(steps per compiled call, unroll them)`` for an iterative attack."""
    on_cpu = jax.default_backend() == "cpu"
    if chunk is None:
        chunk = min(int(steps), CPU_CHUNK) if on_cpu else int(steps)
    return check_int("chunk", chunk), on_cpu


def value_grad(fn, x, y, key, eot_samples, loss="ce", target=None):
    """``(loss_B, grad, logits)``: the per-example ``loss`` at ``x``, the gradient of
    its sum w.r.t. ``x``, and the logits (``None`` with EOT, where the loss and
    gradient are means over ``eot_samples`` draws and the logits are random)."""

    def f(x_, k):
        logits = call(fn, x_, k)
        if isinstance(loss, str):
            per = per_example_loss(loss, logits, y, target)
        else:  # a traced index into LOSSES: one program for several losses
            per = loss_by_index(loss, logits, y, target)
        return jnp.sum(per), (per, logits)

    vg = jax.value_and_grad(f, has_aux=True)
    if eot_samples is None:
        (_, (per, logits)), g = vg(x, None)
        return per, g, logits
    keys = jax.random.split(key, eot_samples)

    def body(i, acc):
        (_, (per, _)), g = vg(x, keys[i])
        return acc[0] + per, acc[1] + g

    zero = (jnp.zeros(x.shape[0], jnp.float32), jnp.zeros_like(x))
    per, g = jax.lax.fori_loop(0, eot_samples, body, zero)
    return per / eot_samples, g / eot_samples, None


def grad_impl(fn, x, y, key, eot_samples, loss="ce"):
    return value_grad(fn, x, y, key, eot_samples, loss)[1]


@_xla.conv_jit(static_argnames=("eot_samples",))
def _loss_gradient_jit(fn, x, y, key, *, eot_samples):
    return grad_impl(fn, x, y, key, eot_samples)


def loss_gradient(
    logits_fn: LogitsFn,
    x: ArrayLike,
    y: ArrayLike,
    *,
    key: jax.Array | None = None,
    eot_samples: int | None = None,
) -> jax.Array:
    """Gradient w.r.t. ``x`` of the summed cross-entropy ``CE(logits_fn(x), y)``.

    With ``eot_samples=n`` the logits function is called as ``logits_fn(x, k)``
    for ``k`` in ``jax.random.split(key, n)`` and the ``n`` gradients are
    averaged (EOT).  Returns an array shaped like ``x``.

    Example:
      A two-class model on one-pixel images (class 1 above 0.5): raising the
      pixel raises the loss of class 0 and lowers that of class 1.

      >>> import jax.numpy as jnp
      >>> from gbjax import attacks
      >>> def logits(x):
      ...     v = x.reshape(-1, 1) - 0.5
      ...     return jnp.concatenate([-v, v], axis=1)
      >>> x = jnp.full((2, 1, 1, 1), 0.5)
      >>> attacks.loss_gradient(logits, x, jnp.array([0, 1])).ravel().tolist()
      [1.0, -1.0]
    """
    check_eot(eot_samples, key)
    fn = as_logits_fn(logits_fn)
    check_attack_labels(fn, x, y, key, eot_samples)
    return _loss_gradient_jit(fn, x, y, key, eot_samples=eot_samples)


@_xla.conv_jit
def _attack_loss_jit(fn, x, y, key):
    return _ce_per_example(call(fn, x, key), y)


def attack_loss(
    logits_fn: LogitsFn, x: ArrayLike, y: ArrayLike, *, key: jax.Array | None = None
) -> jax.Array:
    """Per-example cross-entropy ``(B,)`` of ``logits_fn`` on ``(x, y)``.

    Pass ``key`` for a randomised logits function ``f(x, key)``.

    Example:
      Equal logits: the loss is ``log 2`` for either label.

      >>> import jax.numpy as jnp
      >>> from gbjax import attacks
      >>> def logits(x):
      ...     v = x.reshape(-1, 1) - 0.5
      ...     return jnp.concatenate([-v, v], axis=1)
      >>> loss = attacks.attack_loss(logits, jnp.full((2, 1, 1, 1), 0.5), jnp.array([0, 1]))
      >>> [round(v, 4) for v in loss.tolist()]
      [0.6931, 0.6931]
    """
    fn = as_logits_fn(logits_fn)
    check_attack_labels(fn, x, y, key, eot_samples=None if key is None else 1)
    return _attack_loss_jit(fn, x, y, key)


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
class BPDA(PytreeCallable):
    """A preprocessor with an exact forward pass and a substitute backward pass.

    Built by :func:`bpda`.  Calling ``g(x, *args)`` returns
    ``forward(x, *args)``; its VJP w.r.t. ``x`` is the identity, or the VJP of
    ``backward(x, *args)`` when a smooth approximation was given.  Extra
    arguments (e.g. a PRNG key) receive zero cotangents.  A pytree, so it can
    be passed through ``jit``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gbjax import attacks
      >>> g = attacks.bpda(jnp.round)
      >>> isinstance(g, attacks.BPDA), jax.grad(lambda v: g(v).sum())(jnp.array([0.4])).tolist()
      (True, [1.0])
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


def bpda(forward: Callable[..., Any], backward: Callable[..., Any] | None = None) -> BPDA:
    """Backward Pass Differentiable Approximation (Athalye et al., 2018).

    Wraps a non-differentiable preprocessor ``forward(x, *args)`` (quantisation,
    a granular-ball denoiser, ...) via ``jax.custom_vjp``: the forward pass is
    exact; the backward pass is the identity (``forward`` must then preserve
    the shape of ``x``) or, if ``backward`` is given, the VJP of that smooth
    approximation ``backward(x, *args)``.

    Example:
      Rounding has a zero gradient almost everywhere; through BPDA it is the
      identity's.

      >>> import jax, jax.numpy as jnp
      >>> from gbjax import attacks
      >>> g = attacks.bpda(lambda x: jnp.round(x * 8) / 8)
      >>> x = jnp.array([0.1, 0.3])
      >>> g(x).tolist(), jax.grad(lambda v: g(v).sum())(x).tolist()
      ([0.125, 0.25], [1.0, 1.0])
    """
    if not callable(forward) and not is_nnx_module(forward):
        raise TypeError("forward must be callable")
    if backward is not None and not callable(backward):
        raise TypeError("backward must be callable or None")
    return BPDA(forward, backward)


# ---------------------------------------------------------------------------
# Steps shared by the attacks: FGSM and PGD (gradient, scored, apgd), restarts
# and the margin (square, spsa)
# ---------------------------------------------------------------------------


def per_image(v, x):
    """A budget (or step size) that is a scalar or one value per image ``(B,)``,
    shaped to broadcast against the images ``x`` ``(B, ...)``. The evaluation runs
    the images of several budgets in one batch, each row with its own eps."""
    v = jnp.asarray(v, x.dtype)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)) if v.ndim else v


def fgsm_impl(fn, x, y, key, eps, lo, hi, targeted, eot_samples, loss="ce"):
    g = grad_impl(fn, x, y, key, eot_samples, loss)
    direction = -jnp.sign(g) if targeted else jnp.sign(g)
    eps = per_image(eps, x)
    x_adv = jnp.clip(x + eps * direction, lo, hi).astype(x.dtype)
    return jnp.where(eps == 0, x, x_adv)


def projection(x, eps, lo, hi):
    """Projection onto ``{|v - x|_inf <= eps}`` intersected with ``[lo, hi]`` (``eps``
    a scalar or one per image)."""
    eps = per_image(eps, x)
    return lambda v: jnp.clip(jnp.clip(v, x - eps, x + eps), lo, hi).astype(x.dtype)


def pgd_start(x, key, eps, lo, hi, random_start):
    """``(x0, key)``: the start (uniform in the eps-ball when ``random_start``) and
    the key for the steps."""
    if not random_start:
        return x, key
    key, start_key = jax.random.split(key)
    eps = per_image(eps, x)
    return projection(x, eps, lo, hi)(
        x + _random.uniform(start_key, x.shape, x.dtype, -eps, eps)
    ), key


def pgd_step(fn, x, y, eps, step_size, lo, hi, targeted, eot_samples, loss):
    """``step(i, x_adv, key) -> (x_next, loss_B, logits)``: one signed-gradient
    step from ``x_adv``; the loss and logits are those at ``x_adv`` (logits
    ``None`` with EOT)."""
    project = projection(x, eps, lo, hi)
    step_size = per_image(step_size, x)

    def step(i, x_adv, key):
        k = None if eot_samples is None else jax.random.fold_in(key, i)
        per, g, logits = value_grad(fn, x_adv, y, k, eot_samples, loss)
        direction = -jnp.sign(g) if targeted else jnp.sign(g)
        return project(x_adv + step_size * direction), per, logits

    return step


def restart_key(key, r):
    # Restart 0 uses the caller's key unchanged, so restarts=1 is plain PGD and
    # restart r's iterate does not depend on how many restarts follow it.
    return key if r == 0 else jax.random.fold_in(key, r)


def check_loss(loss, allowed=("ce", "margin")) -> str:
    if loss not in allowed:
        fail("loss", f"one of {allowed}", loss)
    return loss


def check_restarts(restarts, random_start, eot_samples) -> int:
    restarts = check_int("restarts", restarts)
    if restarts > 1 and not random_start and eot_samples is None:
        raise ValueError(
            "restarts > 1 needs random_start=True (or a randomised model with "
            "eot_samples): otherwise every restart is the same run"
        )
    return int(restarts)


def margins(fn, x, y):
    """``z_y - max_{j != y} z_j`` per example; -inf where the logits hold NaN or inf."""
    z = fn(x).astype(jnp.float32)
    true = jnp.take_along_axis(z, y[:, None], axis=-1)[:, 0]
    others = jnp.max(jnp.where(jax.nn.one_hot(y, z.shape[-1], dtype=bool), -jnp.inf, z), -1)
    # NaN or inf logits are never a class: the margin is -inf (misclassified, kept)
    return jnp.where(jnp.all(jnp.isfinite(z), -1), true - others, -jnp.inf)
