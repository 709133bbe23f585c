"""Accuracy under attack over a data set, and the PGD-vs-FGSM sanity check."""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gbjax.attacks._core import (
    _call,
    _check_clip,
    _check_eot,
    _check_nonneg,
    _check_positive,
    _check_steps,
    as_logits_fn,
)
from gbjax.attacks.gradient import (
    _check_restarts,
    _fgsm_impl,
    _pgd_impl,
    _resolve_unroll,
    _restart_key,
)
from gbjax.data.batching import fixed_batches, take

_ATTACKS = ("fgsm", "pgd")

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
    batches = list(fixed_batches(n, batch_size))
    correct = np.zeros(len(eps_list), dtype=np.int64)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches) * len(eps_list), desc=desc or f"{attack} sweep", leave=False)
    try:
        for b, batch in enumerate(batches):  # padded rows of the last batch are masked out
            x_b, y_b = take((x, y), batch)
            x_b, y_b = jnp.asarray(x_b), jnp.asarray(y_b).astype(jnp.int32)
            mask_b = jnp.asarray(batch.mask)
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

    ``unroll`` is passed to PGD (see :func:`pgd`). Raises ``AssertionError`` with the
    table when ``raise_on_failure`` and a check fails.
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
