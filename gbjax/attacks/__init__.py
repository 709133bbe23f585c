"""Attacks in pixel space: FGSM, PGD, APGD, Square, BPDA and EOT (docs/methods.md, 4 and 7).

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
:func:`pgd`'s ``chunk``). ``chunk`` (steps, or Square's queries, per compiled
call) is the one loop knob of every attack; ``unroll`` is its deprecated old
form.

Attacks are values: :class:`FGSM`, :class:`PGD`, :class:`APGD`, :class:`Square`,
:class:`SPSA` and :class:`Noise` are small frozen specs, taken by
:func:`accuracy_under_attack` (``attack=PGD(steps=10)``) and :class:`Stage`; the
string form (``attack="pgd", steps=10``) names the same attacks. A targeted
attack is APGD with the loss ``"dlr-targeted"`` (``APGD("dlr-targeted",
n_targets=9)``, the string ``"apgd-t"``); ``targeted=True`` of :func:`fgsm` and
:func:`pgd` is for labels that are the targets.

Preprocessing defences are attacked three ways (:func:`make_attack_logits`):
``"oblivious"``, ``"end_to_end"`` and ``"bpda"`` (:func:`bpda`).

Modules: :mod:`~gbjax.attacks._core` (checks, gradients, BPDA; the
logits-function pytrees of :func:`as_logits_fn` are :mod:`gbjax._callables`),
:mod:`~gbjax.attacks.losses` (CE, margin, DLR),
:mod:`~gbjax.attacks.gradient` (FGSM, PGD), :mod:`~gbjax.attacks.apgd`,
:mod:`~gbjax.attacks.square`, :mod:`~gbjax.attacks.spsa` (gradient-free),
:mod:`~gbjax.attacks.adaptive` (smooth surrogates of GB for BPDA),
:mod:`~gbjax.attacks.protocols` (the three
protocols), :mod:`~gbjax.attacks.scored` (per-iterate scoring) and
:mod:`~gbjax.attacks.evaluation` (robustness over a data set, worst cases,
sanity checks); :func:`cascade` runs attacks as AutoAttack's standard
evaluation does (each stage on the images still robust, its state saved after
every stage).
"""

from gbjax._callables import as_logits_fn
from gbjax.attacks._cascade import (
    CascadeResult,
    Group,
    Stage,
    StageRecord,
    cascade,
    join_cascades,
    reuse_group,
)
from gbjax.attacks._core import BPDA, attack_loss, bpda, loss_gradient
from gbjax.attacks._specs import APGD, ATTACKS, FGSM, PGD, SPSA, Noise, Square
from gbjax.attacks.adaptive import SoftGB
from gbjax.attacks.apgd import apgd
from gbjax.attacks.evaluation import (
    AttackResult,
    SanityReport,
    accuracy_under_attack,
    attack_sanity_check,
    wilson_interval,
    worst_case,
)
from gbjax.attacks.gradient import fgsm, pgd
from gbjax.attacks.losses import LOSSES, per_example_loss, ranked_targets
from gbjax.attacks.protocols import PROTOCOLS, make_attack_logits
from gbjax.attacks.spsa import spsa
from gbjax.attacks.square import square

__all__ = [
    "FGSM",
    "PGD",
    "APGD",
    "Square",
    "SPSA",
    "Noise",
    "fgsm",
    "pgd",
    "apgd",
    "square",
    "spsa",
    "SoftGB",
    "ATTACKS",
    "AttackResult",
    "worst_case",
    "cascade",
    "join_cascades",
    "reuse_group",
    "Stage",
    "Group",
    "StageRecord",
    "CascadeResult",
    "wilson_interval",
    "LOSSES",
    "per_example_loss",
    "ranked_targets",
    "bpda",
    "BPDA",
    "make_attack_logits",
    "PROTOCOLS",
    "loss_gradient",
    "attack_loss",
    "accuracy_under_attack",
    "attack_sanity_check",
    "SanityReport",
    "as_logits_fn",
]
