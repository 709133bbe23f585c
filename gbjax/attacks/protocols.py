"""The three ways to attack a preprocessing defence ``f(g(x))`` (docs/methods.md, section 4)."""

from __future__ import annotations

from collections.abc import Callable

import jax

from gbjax._callables import LogitsFn
from gbjax.attacks._core import bpda
from gbjax.defences import Defended

PROTOCOLS = ("oblivious", "end_to_end", "bpda")


def make_attack_logits(
    classifier: LogitsFn,
    preprocess: Callable[..., jax.Array],
    protocol: str,
    *,
    backward: Callable[..., jax.Array] | None = None,
    randomized: bool = False,
) -> tuple[Defended, Defended]:
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

    Example:
      Rounding in front of a two-class model on one-pixel images: end to end
      its gradient is zero; BPDA passes the classifier's through.

      >>> import jax.numpy as jnp
      >>> from gbjax import attacks
      >>> def logits(x):
      ...     v = x.reshape(-1, 1) - 0.5
      ...     return jnp.concatenate([-v, v], axis=1)
      >>> x, y = jnp.full((1, 1, 1, 1), 0.4), jnp.array([0])
      >>> for protocol in ("end_to_end", "bpda"):
      ...     attacked, scored = attacks.make_attack_logits(logits, jnp.round, protocol)
      ...     print(protocol, round(float(attacks.loss_gradient(attacked, x, y).sum()), 3))
      end_to_end 0.0
      bpda 0.538
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if backward is not None and protocol != "bpda":
        raise ValueError("backward is only used with protocol='bpda'")
    eval_fn = Defended(classifier, preprocess, randomized=randomized)
    if protocol == "oblivious":
        attack_fn = Defended(eval_fn.classifier, None, randomized=randomized)
    elif protocol == "end_to_end":
        attack_fn = eval_fn
    else:
        attack_fn = Defended(
            eval_fn.classifier, bpda(eval_fn.preprocess, backward), randomized=randomized
        )
    return attack_fn, eval_fn
