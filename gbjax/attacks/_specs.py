"""Attacks as values: small frozen specs taken by ``accuracy_under_attack`` and ``Stage``.

A spec says *which* attack runs (its steps, restarts, loss, queries, ...); how it
runs (``chunk``, ``eot_samples``, ``clip``, ``batch_size``) stays a keyword of the
call. The string form (``attack="pgd", steps=10``) is translated into a spec in
one place, :func:`resolve`, so both forms run the same code.

Targeting has one spelling in the specs: the loss ``"dlr-targeted"`` of
:class:`APGD`, with ``n_targets`` ranked target classes (the strongest wrong
classes, :func:`gbjax.attacks.ranked_targets`). The string ``"apgd-t"`` is its old
name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from gbjax._checks import check_count, check_int, check_number, check_scalar, fail
from gbjax.attacks._core import check_loss

__all__ = ["FGSM", "PGD", "APGD", "Square", "SPSA", "Noise", "Attack", "ATTACKS", "resolve"]

ATTACKS = ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "apgd-t", "square", "spsa", "noise")
APGD_NAMES = {"ce": "apgd-ce", "dlr": "apgd-dlr", "dlr-targeted": "apgd-t"}


def _check_bool(name: str, v: Any) -> None:
    if not isinstance(v, (bool, np.bool_)):
        fail(name, "a bool", v)


class _Spec:
    """What the specs share: ``attack``, the attack's name in :data:`ATTACKS`, and
    the options set away from their defaults (for ``Stage.describe``)."""

    attack: ClassVar[str]

    def changed(self) -> dict[str, Any]:
        """``{option: value}`` for the fields set away from their defaults, as the
        string form's keywords (``Stage.describe`` writes them)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v != f.default or type(v) is not type(f.default):
                out[f.name] = v
        return out


@dataclasses.dataclass(frozen=True)
class FGSM(_Spec):
    """Fast Gradient Sign Method: one step of size ``eps``.

    Args:
      loss: ``"ce"`` or ``"margin"`` (:mod:`gbjax.attacks.losses`).

    Example:
      >>> from gbjax import attacks
      >>> attacks.FGSM(), attacks.FGSM().attack
      (FGSM(loss='ce'), 'fgsm')
    """

    loss: str = "ce"
    attack: ClassVar[str] = "fgsm"

    def __post_init__(self):
        check_loss(self.loss)


@dataclasses.dataclass(frozen=True)
class PGD(_Spec):
    """Projected Gradient Descent (L-inf), every iterate scored.

    Args:
      steps: iterations.
      restarts: independent random starts; each attacks only the images that
        survived the previous ones.
      loss: ``"ce"`` or ``"margin"``.
      rel_step: step size as a multiple of ``eps / steps`` (2.5, Madry et al.).
      random_start: start from a uniform point of the eps-ball.

    Example:
      >>> from gbjax import attacks
      >>> attacks.PGD(steps=20, restarts=2)
      PGD(steps=20, restarts=2, loss='ce', rel_step=2.5, random_start=True)
    """

    steps: int = 10
    restarts: int = 1
    loss: str = "ce"
    rel_step: float = 2.5
    random_start: bool = True
    attack: ClassVar[str] = "pgd"

    def __post_init__(self):
        check_int("steps", self.steps)
        check_int("restarts", self.restarts)
        check_loss(self.loss)
        check_scalar("rel_step", self.rel_step)
        _check_bool("random_start", self.random_start)
        object.__setattr__(self, "random_start", bool(self.random_start))


@dataclasses.dataclass(frozen=True)
class APGD(_Spec):
    """APGD (Croce & Hein 2020), every iterate scored.

    Args:
      loss: ``"ce"``, ``"dlr"``, or ``"dlr-targeted"`` (APGD-T: the targeted DLR
        loss, aimed in turn at each of the ``n_targets`` strongest wrong classes).
      steps: iterations per run (the checkpoints scale with it).
      restarts: random starts per run.
      n_targets: target classes of ``"dlr-targeted"`` (9 on CIFAR-10, as
        AutoAttack); only with that loss.

    Example:
      >>> from gbjax import attacks
      >>> attacks.APGD("dlr-targeted", steps=50, n_targets=3).attack
      'apgd-t'
    """

    loss: str = "ce"
    steps: int = 100
    restarts: int = 1
    n_targets: int = 9

    @property
    def attack(self) -> str:  # type: ignore[override]
        """``"apgd-ce"``, ``"apgd-dlr"`` or ``"apgd-t"``, after the loss."""
        return APGD_NAMES[self.loss]

    def __post_init__(self):
        check_loss(self.loss, tuple(APGD_NAMES))
        check_int("steps", self.steps)
        check_int("restarts", self.restarts)
        check_int("n_targets", self.n_targets)
        if self.n_targets != 9 and self.loss != "dlr-targeted":
            raise ValueError(
                f"n_targets: applies to the loss 'dlr-targeted' only, not {self.loss!r}"
            )

    def changed(self) -> dict[str, Any]:
        out = super().changed()
        out.pop("loss", None)  # in the attack's name
        return out


@dataclasses.dataclass(frozen=True)
class Square(_Spec):
    """Square attack (Andriushchenko et al. 2020): score-based, it queries the
    scored model whatever the protocol.

    Args:
      queries: model evaluations per image.
      p_init: the starting window fraction (0.8, as AutoAttack for L-inf).

    Example:
      >>> from gbjax import attacks
      >>> attacks.Square(queries=1000)
      Square(queries=1000, p_init=0.8)
    """

    queries: int = 5000
    p_init: float = 0.8
    attack: ClassVar[str] = "square"

    def __post_init__(self):
        check_int("queries", self.queries)
        check_number("p_init", self.p_init)
        if self.p_init > 1:
            fail("p_init", "a number in (0, 1]", self.p_init)


@dataclasses.dataclass(frozen=True)
class SPSA(_Spec):
    """SPSA (Uesato et al. 2018): gradient-free, on the scored model.

    Args:
      steps: Adam steps.
      samples: model evaluations per step (antithetic pairs).
      lr, delta: Adam's learning rate and the perturbation size (0.01, the paper's).

    Example:
      >>> from gbjax import attacks
      >>> attacks.SPSA(steps=20, samples=32)
      SPSA(steps=20, samples=32, lr=0.01, delta=0.01)
    """

    steps: int = 100
    samples: int = 128
    lr: float = 0.01
    delta: float = 0.01
    attack: ClassVar[str] = "spsa"

    def __post_init__(self):
        check_int("steps", self.steps)
        check_int("samples", self.samples, 2)
        check_number("lr", self.lr)
        check_number("delta", self.delta)


@dataclasses.dataclass(frozen=True)
class Noise(_Spec):
    """The random-sign control: ``clip(x + eps * s)``, ``s`` uniform in {-1, +1}
    (a floor for any attack; not an attack).

    Example:
      >>> from gbjax import attacks
      >>> attacks.Noise().attack
      'noise'
    """

    attack: ClassVar[str] = "noise"


Attack = FGSM | PGD | APGD | Square | SPSA | Noise
SPECS = (FGSM, PGD, APGD, Square, SPSA, Noise)

# the string form's attack options, and the specs they belong to
OPTIONS = (
    "steps",
    "rel_step",
    "random_start",
    "restarts",
    "loss",
    "queries",
    "p_init",
    "samples",
    "n_targets",
)


def resolve(attack: str | Attack, **options: Any) -> Attack:
    """The spec for ``attack`` (a spec, or a name in :data:`ATTACKS`) and the string
    form's attack options (``None``: not given). The one translation of the string
    form: options that do not apply to the named attack are ignored, as they always
    were. With a spec, a given option must agree with it."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"unknown attack option(s) {unknown}; the options are {OPTIONS}")
    given = {k: v for k, v in options.items() if v is not None}
    if isinstance(attack, SPECS):
        fields = {f.name for f in dataclasses.fields(attack)}
        for k, v in given.items():
            if k not in fields:
                raise ValueError(
                    f"{k}={v!r} does not apply to {attack!r}: an attack's options belong "
                    "in its spec"
                )
            if getattr(attack, k) != v:
                raise ValueError(
                    f"{k}={v!r} conflicts with {attack!r}: an attack's options belong in "
                    "its spec; pass one or the other"
                )
        return attack
    if not isinstance(attack, str) or attack not in ATTACKS:
        raise ValueError(
            f"attack must be one of {ATTACKS} or a spec (FGSM(), PGD(), ...), got {attack!r}"
        )
    # the string form's checks, as they were (the loss and rel_step of every attack)
    check_loss(given.get("loss", "ce"))
    if "rel_step" in given:
        check_scalar("rel_step", given["rel_step"])
    if "restarts" in given and attack not in ("pgd", "apgd-ce", "apgd-dlr", "apgd-t"):
        if given["restarts"] != 1:
            raise ValueError(f"restarts applies to PGD and APGD only, not {attack!r}")
    if "steps" in given and attack in ("pgd", "apgd-ce", "apgd-dlr", "apgd-t", "spsa"):
        check_count("steps", given["steps"])
        given["steps"] = int(given["steps"])
    pick = lambda *names: {k: given[k] for k in names if k in given}  # noqa: E731
    if attack == "fgsm":
        return FGSM(**pick("loss"))
    if attack == "pgd":
        return PGD(**pick("steps", "restarts", "loss", "rel_step", "random_start"))
    if attack.startswith("apgd"):
        loss = {"apgd-ce": "ce", "apgd-dlr": "dlr", "apgd-t": "dlr-targeted"}[attack]
        keep = ("steps", "restarts") + (("n_targets",) if attack == "apgd-t" else ())
        return APGD(loss, **pick(*keep))
    if attack == "square":
        return Square(**pick("queries", "p_init"))
    if attack == "spsa":
        return SPSA(**pick("steps", "samples"))
    return Noise()
