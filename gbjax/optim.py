"""Optimisers as optax transforms: schedules, parameter groups and lookahead.

Three generic pieces, usable on their own; :func:`gbjax.train.make_optimizer`
builds a :class:`gbjax.config.Config`'s optimiser from them (this module knows no
configuration):

* :func:`piecewise_linear`: the one-cycle / triangular learning-rate factor
  (linear from ``start`` up to 1 over a warm-up fraction, then linear down to
  ``end``), as airbench94 and the one-cycle ResNet recipes use it.
* :func:`param_labels` and :func:`grouped`: per-group learning rates, weight
  decay and freezing. Leaves are labelled by a regular expression on their
  ``/``-joined path; each group gets its own chain through
  :func:`optax.multi_transform`.
* :func:`lookahead`: lookahead / EMA of the weights (Zhang et al. 2019, with
  airbench94's schedule): every ``sync_period`` updates the slow weights move
  towards the fast ones, ``slow = d * slow + (1 - d) * fast``, and the fast
  weights jump to the slow ones. :func:`lookahead_mix` is the same update on
  any pytree, so model state that is not a parameter (BatchNorm running
  statistics) can follow the parameters.

See docs/methods.md, section 6, for the airbench94 recipe built from these.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

__all__ = [
    "GroupSpec",
    "piecewise_linear",
    "param_labels",
    "grouped",
    "lookahead",
    "lookahead_mix",
    "lookahead_sync",
    "LookaheadState",
]

DEFAULT_GROUP = "default"


def piecewise_linear(
    total_steps: int, *, warmup_steps: int, start: float, end: float
) -> Callable[[ArrayLike], jax.Array]:
    """Learning-rate factor at update ``t`` (0-based): ``start`` -> 1 -> ``end``, linearly.

    The rise takes ``warmup_steps`` updates (at least 1), the fall the rest;
    after ``total_steps`` the factor stays at ``end``.

    Example:
      >>> from gbjax import optim
      >>> f = optim.piecewise_linear(10, warmup_steps=2, start=0.2, end=0.0)
      >>> [round(float(f(t)), 2) for t in (0, 1, 2, 6, 10, 20)]
      [0.2, 0.6, 1.0, 0.5, 0.0, 0.0]
    """
    warm = max(int(warmup_steps), 1)
    fall = max(total_steps - warm, 1)

    def factor(t):
        t = jnp.asarray(t, jnp.float32)
        up = start + (1.0 - start) * jnp.clip(t / warm, 0.0, 1.0)
        down = 1.0 + (end - 1.0) * jnp.clip((t - warm) / fall, 0.0, 1.0)
        return jnp.where(t < warm, up, down)

    return factor


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """One parameter group of :func:`grouped`.

    Attributes:
      pattern: regular expression searched in each leaf's ``/``-joined path
        (e.g. ``"norm\\d*/bias$"``); the first group whose pattern matches wins.
      lr_scale: multiplies the base learning rate.
      weight_decay: coupled (L2) weight decay added to the gradient before
        momentum, as ``torch.optim.SGD(weight_decay=)``; ``None`` takes the
        default group's value.
      trainable_steps: the group's updates are zero from this update on
        (``None``: always trainable).
      frozen: never updated (the update is zero and no optimiser state is kept).

    Example:
      >>> from gbjax import optim
      >>> spec = optim.GroupSpec(pattern=r"bias$", lr_scale=0.1, weight_decay=0.0)
      >>> spec.lr_scale, spec.frozen
      (0.1, False)
      >>> params = {"conv": {"kernel": 1.0, "bias": 0.0}}
      >>> optim.param_labels(params, {"biases": spec})
      {'conv': {'bias': 'biases', 'kernel': 'default'}}
    """

    pattern: str
    lr_scale: float = 1.0
    weight_decay: float | None = None
    trainable_steps: int | None = None
    frozen: bool = False


def _path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def param_labels(params: Any, groups: Mapping[str, GroupSpec], default: str = DEFAULT_GROUP) -> Any:
    """A pytree like ``params`` holding each leaf's group label.

    The label is that of the first group (in ``groups``' order) whose pattern
    matches the leaf's path, else ``default``.

    Example:
      >>> from gbjax import optim
      >>> params = {"norm1": {"bias": 0.0, "scale": 1.0}, "head": {"bias": 0.0}}
      >>> groups = {"norm_biases": optim.GroupSpec(r"norm\\d*/bias$"),
      ...           "head": optim.GroupSpec(r"^head/")}
      >>> optim.param_labels(params, groups)
      {'head': {'bias': 'head'}, 'norm1': {'bias': 'norm_biases', 'scale': 'default'}}
    """
    compiled = [(name, re.compile(g.pattern)) for name, g in groups.items()]

    def label(path, _):
        s = _path_str(path)
        for name, rx in compiled:
            if rx.search(s):
                return name
        return default

    return jax.tree_util.tree_map_with_path(label, params)


def _until(steps: int) -> optax.GradientTransformation:
    """Zero the updates from update number ``steps`` on."""

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        keep = state.count < steps
        updates = jax.tree.map(lambda u: jnp.where(keep, u, jnp.zeros_like(u)), updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def grouped(
    make_chain: Callable[[float, float, Callable[[Any], Any] | None], optax.GradientTransformation],
    params: Any,
    groups: Mapping[str, GroupSpec],
    *,
    weight_decay: float,
    decay_mask: Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
    """Per-group optimisers over ``params``, via :func:`optax.multi_transform`.

    ``make_chain(lr_scale, weight_decay, mask)`` builds the chain of one group
    (``mask`` restricts weight decay within it, or is ``None``). The default
    group (leaves no pattern matches) gets ``weight_decay`` restricted by
    ``decay_mask``; a named group's weight decay applies to all its leaves.

    Example:
      Plain SGD (learning rate 0.1), ten times slower on biases, frozen on the head:

      >>> import jax.numpy as jnp, optax
      >>> from gbjax import optim
      >>> params = {"conv": {"kernel": jnp.ones(2), "bias": jnp.ones(2)},
      ...           "head": {"kernel": jnp.ones(2)}}
      >>> groups = {"biases": optim.GroupSpec(r"bias$", lr_scale=0.1),
      ...           "head": optim.GroupSpec(r"^head/", frozen=True)}
      >>> tx = optim.grouped(lambda lr_scale, wd, mask: optax.sgd(0.1 * lr_scale),
      ...                    params, groups, weight_decay=0.0)
      >>> grads = {"conv": {"kernel": jnp.ones(2), "bias": jnp.ones(2)},
      ...          "head": {"kernel": jnp.ones(2)}}
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> {k: [round(float(v[0]), 3) for v in d.values()] for k, d in updates.items()}
      {'conv': [-0.01, -0.1], 'head': [0.0]}
    """
    for name in groups:
        if name == DEFAULT_GROUP:
            raise ValueError(f"group name {DEFAULT_GROUP!r} is reserved for unmatched leaves")
    labels = param_labels(params, groups)
    transforms = {DEFAULT_GROUP: make_chain(1.0, weight_decay, decay_mask)}
    for name, g in groups.items():
        if g.frozen:
            transforms[name] = optax.set_to_zero()
            continue
        wd = weight_decay if g.weight_decay is None else g.weight_decay
        tx = make_chain(g.lr_scale, wd, None)
        if g.trainable_steps is not None:
            tx = optax.chain(tx, _until(int(g.trainable_steps)))
        transforms[name] = tx
    return optax.multi_transform(transforms, labels)


# ---------------------------------------------------------------------------
# lookahead


class LookaheadState(NamedTuple):
    count: jax.Array  # updates so far
    slow: Any  # the slow weights


def lookahead_sync(
    count: ArrayLike,
    *,
    sync_period: int,
    decay: Callable[[jax.Array], ArrayLike],
    final_step: int | None,
) -> tuple[jax.Array, jax.Array]:
    """``(sync, d)`` after update number ``count`` (1-based).

    ``sync`` is true every ``sync_period`` updates, and at ``final_step``; the
    mixing weight is ``d = decay(count)`` on a periodic sync and 1 on a final
    sync that is not periodic (the fast weights then simply take the slow ones).

    Example:
      >>> from gbjax import optim
      >>> for t in (3, 4, 7):
      ...     sync, d = optim.lookahead_sync(t, sync_period=2, decay=lambda t: t / 10,
      ...                                    final_step=7)
      ...     print(t, bool(sync), round(float(d), 2))
      3 False 1.0
      4 True 0.4
      7 True 1.0
    """
    count = jnp.asarray(count)
    periodic = count % sync_period == 0
    final = jnp.asarray(False) if final_step is None else count == final_step
    d = jnp.where(periodic, decay(count), 1.0)
    return periodic | final, d


def lookahead_mix(slow: Any, fast: Any, sync: ArrayLike, d: ArrayLike) -> Any:
    """New slow weights: ``d * slow + (1 - d) * fast`` where ``sync``, else ``slow``.

    Floating leaves only; integer leaves (counters) keep the fast value.

    Example:
      >>> import jax.numpy as jnp
      >>> from gbjax import optim
      >>> slow = {"w": jnp.array([0.0, 4.0]), "n": jnp.array(1)}
      >>> fast = {"w": jnp.array([2.0, 8.0]), "n": jnp.array(5)}
      >>> mixed = optim.lookahead_mix(slow, fast, True, 0.75)
      >>> mixed["w"].tolist(), int(mixed["n"])
      ([0.5, 5.0], 5)
      >>> optim.lookahead_mix(slow, fast, False, 0.75)["w"].tolist()
      [0.0, 4.0]
    """

    def mix(s, f):
        if not jnp.issubdtype(jnp.result_type(f), jnp.floating):
            return f
        return jnp.where(sync, d * s + (1.0 - d) * f, s).astype(s.dtype)

    return jax.tree.map(mix, slow, fast)


def lookahead(
    sync_period: int,
    decay: Callable[[jax.Array], ArrayLike],
    *,
    final_step: int | None = None,
) -> optax.GradientTransformation:
    """Lookahead as the last transform of a chain.

    Every ``sync_period`` updates (and at ``final_step``), with ``d =
    decay(count)``: ``slow = d * slow + (1 - d) * (params + update)``, and the
    returned update moves the parameters onto ``slow``. Between syncs the inner
    updates pass through unchanged. ``decay = lambda t: 0.0`` is plain training;
    airbench94 uses ``d = 0.95**5 * (t / T)**3`` every 5 updates.

    Example:
      SGD with step 1 on the gradient 1, and lookahead every 2 updates with
      ``d = 0.5``: the fast weights go 0 -> -1 -> -2, and at the sync both move
      to ``0.5 * 0 + 0.5 * -2 = -1``.

      >>> import jax.numpy as jnp, optax
      >>> from gbjax import optim
      >>> tx = optax.chain(optax.sgd(1.0), optim.lookahead(2, lambda t: 0.5))
      >>> params = jnp.zeros(1)
      >>> state = tx.init(params)
      >>> for _ in range(2):
      ...     updates, state = tx.update(jnp.ones(1), state, params)
      ...     params = optax.apply_updates(params, updates)
      ...     print(params.tolist())
      [-1.0]
      [-1.0]
    """
    if sync_period < 1:
        raise ValueError(f"sync_period must be >= 1, got {sync_period}")

    def init_fn(params):
        return LookaheadState(count=jnp.zeros([], jnp.int32), slow=jax.tree.map(jnp.copy, params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("lookahead needs params: call tx.update(grads, state, params)")
        count = state.count + 1
        fast = optax.apply_updates(params, updates)
        sync, d = lookahead_sync(count, sync_period=sync_period, decay=decay, final_step=final_step)
        slow = lookahead_mix(state.slow, fast, sync, d)
        new_updates = jax.tree.map(
            lambda u, s, p: jnp.where(sync, (s - p).astype(u.dtype), u), updates, slow, params
        )
        return new_updates, LookaheadState(count=count, slow=slow)

    return optax.GradientTransformation(init_fn, update_fn)
