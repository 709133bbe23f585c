"""Logits functions as jit-friendly pytrees: the protocol every model-taking
function of gbjax accepts (evaluation, defences, attacks).

A *logits function* is a callable ``f(x[, key]) -> logits``, a
:class:`jax.tree_util.Partial`, a pytree callable (a subclass of
:class:`PytreeCallable`, such as ``gbjax.defences.Defended`` or
``gbjax.attacks.BPDA``), or an eval-mode ``flax.nnx.Module``.
:func:`as_logits_fn` turns any of them into a pytree that can be passed through
``jax.jit`` (public as :func:`gbjax.attacks.as_logits_fn`; the conventions are
in :mod:`gbjax.attacks`).

Flax is not imported here: a module is recognised only once ``flax.nnx`` is
loaded, which it is whenever a user holds an ``nnx.Module``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import jax
from jax.tree_util import Partial

__all__ = ["LogitsFn", "PytreeCallable", "NNXCall", "is_nnx_module", "as_logits_fn"]

LogitsFn = Callable[..., jax.Array]


class PytreeCallable:
    """Marker base of callables that are pytrees already (BPDA, defended models):
    :func:`as_logits_fn` passes them through unchanged."""


class NNXCall:
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
        return isinstance(other, NNXCall) and self.graphdef == other.graphdef

    def __hash__(self):
        return hash((NNXCall, self.graphdef))


def is_nnx_module(obj) -> bool:
    """Whether ``obj`` is a ``flax.nnx.Module`` (without importing flax)."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(obj, nnx.Module)


def as_logits_fn(fn: LogitsFn) -> LogitsFn:
    """Returns ``fn`` as a pytree callable that can be passed through ``jit``.

    ``Partial`` objects and pytree callables (:class:`gbjax.attacks.BPDA`,
    :class:`gbjax.defences.Defended`) are returned unchanged; an ``nnx.Module`` becomes
    ``Partial(<graphdef call>, state)`` (its state as of this call); any other
    callable becomes ``Partial(fn)`` (compiled once per function object).

    Raises:
      TypeError: for an object that is neither callable nor an ``nnx.Module``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gbjax.attacks import as_logits_fn
      >>> f = as_logits_fn(lambda x: 2 * x)  # a pytree: it passes through jax.jit
      >>> jax.jit(lambda g, x: g(x))(f, jnp.ones(2)).tolist()
      [2.0, 2.0]
      >>> as_logits_fn(f) is f
      True
    """
    if isinstance(fn, (Partial, PytreeCallable)):
        return fn
    if is_nnx_module(fn):
        from flax import nnx

        graphdef, state = nnx.split(fn)
        return Partial(NNXCall(graphdef), state)
    if callable(fn):
        return Partial(fn)
    raise TypeError(f"logits_fn must be callable or an nnx.Module, got {type(fn).__name__}")
