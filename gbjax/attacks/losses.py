"""Per-example attack losses on logits, all to be *maximised* by an untargeted attack.

* ``"ce"``: softmax cross-entropy.
* ``"margin"`` (Carlini-Wagner): ``max_{j != y} z_j - z_y``; positive once the
  image is misclassified, and not flattened by label smoothing the way
  cross-entropy is.
* ``"dlr"`` (Croce & Hein 2020): ``-(z_y - max_{j != y} z_j) / (z_(1) - z_(3))``
  with ``z_(k)`` the k-th largest logit: the margin made invariant to shifting
  and rescaling the logits.
* ``"dlr-targeted"``: ``-(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2)`` for a
  target class ``t`` (needs at least 4 classes).

A targeted attack (labels ``y`` are then the targets) *minimises* the same
loss, e.g. ``ce`` towards ``t`` or ``margin`` until ``z_t`` leads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

__all__ = ["LOSSES", "per_example_loss", "loss_by_index", "ranked_targets"]

LOSSES = ("ce", "margin", "dlr", "dlr-targeted")
_EPS = 1e-12


def _others_max(z_BK, y_B):
    """``max_{j != y} z_j`` per example."""
    mask = jax.nn.one_hot(y_B, z_BK.shape[-1], dtype=bool)
    return jnp.max(jnp.where(mask, -jnp.inf, z_BK), axis=-1)


def _true(z_BK, y_B):
    return jnp.take_along_axis(z_BK, y_B[:, None], axis=-1)[:, 0]


def per_example_loss(
    name: str, logits_BK: ArrayLike, y_B: ArrayLike, target_B: ArrayLike | None = None
) -> jax.Array:
    """The loss ``name`` per example, float32 ``(B,)``; see the module docstring.

    Example:
      >>> import jax.numpy as jnp
      >>> from gbjax import attacks
      >>> z = jnp.array([[2.0, 1.0, 0.0]])
      >>> attacks.per_example_loss("margin", z, jnp.array([0])).tolist()
      [-1.0]
      >>> attacks.per_example_loss("dlr", z, jnp.array([1])).tolist()
      [0.5]
    """
    logits_BK, y_B = jnp.asarray(logits_BK), jnp.asarray(y_B)
    z = logits_BK.astype(jnp.float32)
    if name == "ce":
        return optax.softmax_cross_entropy_with_integer_labels(z, y_B)
    if name == "margin":
        return _others_max(z, y_B) - _true(z, y_B)
    srt = jnp.sort(z, axis=-1)[:, ::-1]  # descending
    if name == "dlr":
        if z.shape[-1] < 3:
            raise ValueError("the DLR loss needs at least 3 classes")
        return -(_true(z, y_B) - _others_max(z, y_B)) / (srt[:, 0] - srt[:, 2] + _EPS)
    if name == "dlr-targeted":
        if z.shape[-1] < 4:
            raise ValueError("the targeted DLR loss needs at least 4 classes")
        if target_B is None:
            raise ValueError("the targeted DLR loss needs target classes")
        den = srt[:, 0] - 0.5 * (srt[:, 2] + srt[:, 3]) + _EPS
        return -(_true(z, y_B) - _true(z, target_B)) / den
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")


def loss_by_index(index, logits_BK, y_B, target_B=None):
    """``per_example_loss(LOSSES[index], ...)`` with a *traced* ``index``, so that
    attacks differing only in their loss share one compiled program (the losses
    cost nothing beside the network). ``"dlr-targeted"`` needs ``target_B`` and
    4 classes; without them index 3 is not allowed."""
    z = logits_BK
    options = [per_example_loss(name, z, y_B) for name in LOSSES[:2]]
    options.append(per_example_loss("dlr", z, y_B) if z.shape[-1] >= 3 else options[0])
    if target_B is not None and z.shape[-1] >= 4:
        options.append(per_example_loss("dlr-targeted", z, y_B, target_B))
    return jnp.select([jnp.asarray(index) == i for i in range(len(options))], options)


def ranked_targets(logits_BK: ArrayLike, y_B: ArrayLike, rank: int) -> jax.Array:
    """The class with the ``rank``-th largest logit among those other than ``y``
    (``rank=1``: the strongest wrong class), per example, int32 ``(B,)``: the
    targets of APGD-T (``APGD("dlr-targeted", n_targets=k)`` tries ranks 1..k).

    Example:
      >>> import jax.numpy as jnp
      >>> from gbjax import attacks
      >>> z = jnp.array([[0.0, 3.0, 1.0, 2.0]])
      >>> [attacks.ranked_targets(z, jnp.array([1]), r).tolist() for r in (1, 2, 3)]
      [[3], [2], [0]]
    """
    logits_BK, y_B = jnp.asarray(logits_BK), jnp.asarray(y_B)
    k = logits_BK.shape[-1]
    if not 1 <= rank <= k - 1:
        raise ValueError(f"rank must be in 1..{k - 1}, got {rank}")
    z = jnp.where(jax.nn.one_hot(y_B, k, dtype=bool), -jnp.inf, logits_BK.astype(jnp.float32))
    order = jnp.argsort(-z, axis=-1)
    return order[:, rank - 1].astype(jnp.int32)
