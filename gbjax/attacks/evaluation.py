"""Robustness over a data set: per-image scoring, cascades, worst cases, sanity checks.

:func:`accuracy_under_attack` is the one entry point. For every budget it
returns the fraction of images the scored model classifies correctly when
clean *and* at every iterate of the attack (and of every restart), or with
``per_image=True`` the per-image flags, so that a worst case can be taken
across attacks and protocols (:func:`worst_case`). ``robust_so_far`` runs an
attack only on the images still robust, the AutoAttack-style cascade that keeps
expensive attacks cheap.

Attacks are specs: :class:`~gbjax.attacks.FGSM`, :class:`~gbjax.attacks.PGD`,
:class:`~gbjax.attacks.APGD` (losses ``"ce"``, ``"dlr"`` and the targeted
``"dlr-targeted"`` over ``n_targets`` target classes),
:class:`~gbjax.attacks.Square` (score-based; it queries the scored model, whatever
the protocol), :class:`~gbjax.attacks.SPSA` (gradient-free, likewise on the
scored model) and :class:`~gbjax.attacks.Noise` (the random-sign control
``clip(x + eps * s)``). The string form names them ``"fgsm"``, ``"pgd"``,
``"apgd-ce"``, ``"apgd-dlr"``, ``"apgd-t"``, ``"square"``, ``"spsa"`` and
``"noise"`` (:data:`~gbjax.attacks.ATTACKS`), with their options as keywords.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from jax.typing import ArrayLike

from gbjax import _xla
from gbjax._batching import fixed_batches, row_bucket_size
from gbjax._callables import LogitsFn
from gbjax._checks import check_int, check_scalar, fail
from gbjax.attacks import scored
from gbjax.attacks._core import (
    BPDA,
    as_logits_fn,
    check_clip,
    check_eot,
    check_restarts,
    check_scoring_inputs,
    restart_key,
)
from gbjax.attacks._specs import APGD, FGSM, PGD, SPSA, Attack, Noise, Square, resolve
from gbjax.attacks.apgd import apgd_run
from gbjax.attacks.spsa import spsa_run
from gbjax.attacks.square import square_run
from gbjax.defences import Defended

__all__ = [
    "AttackResult",
    "accuracy_under_attack",
    "worst_case",
    "wilson_interval",
    "attack_sanity_check",
    "SanityReport",
]


@dataclasses.dataclass(frozen=True)
class AttackResult:
    """Per-image outcome of :func:`accuracy_under_attack` (``per_image=True``).

    Example:
      >>> import numpy as np
      >>> from gbjax import attacks
      >>> res = attacks.AttackResult(eps=(0.1, 0.2), robust=np.array([[1, 1], [1, 0]], bool))
      >>> res.accuracy.tolist()
      [1.0, 0.5]
    """

    eps: tuple[float, ...]
    robust: np.ndarray  # (E, N) bool: right when clean and at every iterate

    @property
    def accuracy(self) -> np.ndarray:
        return self.robust.mean(axis=1)


def worst_case(results: Sequence[AttackResult | ArrayLike]) -> np.ndarray:
    """``(E, N)``: robust against every one of ``results`` (a per-image AND).

    Example:
      >>> import numpy as np
      >>> from gbjax import attacks
      >>> attacks.worst_case([np.array([[1, 1, 0]]), np.array([[1, 0, 1]])]).tolist()
      [[True, False, False]]
    """
    flags = [r.robust if isinstance(r, AttackResult) else np.asarray(r, bool) for r in results]
    if not flags:
        raise ValueError("worst_case needs at least one result")
    if any(f.shape != flags[0].shape for f in flags):
        raise ValueError(f"results differ in shape: {[f.shape for f in flags]}")
    return np.logical_and.reduce(flags)


def wilson_interval(k: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for ``k`` successes in ``n`` trials (fractions).

    Example:
      >>> from gbjax import attacks
      >>> [round(v, 3) for v in attacks.wilson_interval(50, 100)]
      [0.404, 0.596]
    """
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def _chunk_from_unroll(unroll, steps):
    """The deprecated ``unroll`` (None, bool or int) -> ``chunk``."""
    if isinstance(unroll, (bool, np.bool_)):
        return int(steps)  # one compiled loop, unrolled or not (see chunk_plan)
    if not isinstance(unroll, numbers.Integral) or unroll < 1:
        fail("unroll", "None, a bool or an int >= 1", unroll)
    return int(steps) if unroll == 1 else int(unroll)


def _to_float(x_b):
    x_b = jnp.asarray(x_b)
    if jnp.issubdtype(x_b.dtype, jnp.integer):
        x_b = x_b.astype(jnp.float32) / 255.0
    return x_b


def accuracy_under_attack(
    logits_fn: LogitsFn,
    x: ArrayLike,
    y: ArrayLike,
    *,
    eps_list: Sequence[float],
    attack: str | Attack = "pgd",
    batch_size: int = 256,
    eval_logits_fn: LogitsFn | None = None,
    key: jax.Array | None = None,
    steps: int | None = None,
    rel_step: float | None = None,
    random_start: bool | None = None,
    eot_samples: int | None = None,
    clip: tuple[float, float] = (0.0, 1.0),
    chunk: int | None = None,
    restarts: int | None = None,
    loss: str | None = None,
    queries: int | None = None,
    p_init: float | None = None,
    samples: int | None = None,
    n_targets: int | None = None,
    robust_so_far: ArrayLike | None = None,
    clean: ArrayLike | None = None,
    per_image: bool = False,
    progress: bool = True,
    desc: str | None = None,
    unroll: int | bool | None = None,
) -> np.ndarray | AttackResult:
    """Accuracy of ``eval_logits_fn`` under ``attack`` on ``logits_fn``, per eps.

    An image counts as correct only if the scored model (``eval_logits_fn``,
    default ``logits_fn``) classifies it correctly when clean and at every
    iterate of the attack, for every restart. The images of all budgets are
    attacked together, one row per image and budget with that row's eps (an FGSM
    sweep takes one gradient per image for all budgets); batches have a fixed
    shape (the last one padded), so a sweep compiles once per attack.

    Args:
      logits_fn: the function the attacker differentiates.
      x: images ``(N, H, W, C)``, float in ``[0, 1]`` or uint8 (divided by 255
        on device). NumPy arrays stay on the host until batched.
      y: integer labels ``(N,)``.
      eps_list: budgets; ``0`` gives clean accuracy.
      attack: a spec (:class:`FGSM`, :class:`PGD`, :class:`APGD`,
        :class:`Square`, :class:`SPSA`, :class:`Noise`), or one of
        :data:`ATTACKS` with its options as the keywords below (the string form;
        see the module docstring).
      eval_logits_fn: the scored function (see :func:`make_attack_logits`).
      key: PRNG key; required for random starts, APGD, Square, SPSA, the noise
        control and EOT.
      steps, rel_step, random_start, restarts, loss: the string form's attack
        options (``None``: the attack's default), as the fields of the spec of
        the same name (also for ``queries``, ``p_init``, ``samples``,
        ``n_targets``, below): :class:`PGD`
        (``steps`` 10, ``rel_step``, ``random_start``, ``restarts``, ``loss``),
        :class:`APGD` (``steps`` 100, ``restarts``, ``n_targets`` of
        ``"apgd-t"``), :class:`Square` (``queries``, ``p_init``), :class:`SPSA`
        (``steps`` 100, ``samples``), :class:`FGSM` (``loss``). With a spec, a
        given option must agree with it (else ``ValueError``).
      queries, p_init, samples, n_targets: as ``steps``.
      eot_samples, clip: as in :func:`pgd`.
      chunk: iterations (Square: queries) per compiled call; default 10 on CPU
        and all of them elsewhere (Square: 25 on every backend, at most its
        queries). Use 1 for a model with GB inside: a program holding several
        copies of the GB engine compiles for minutes on CPU.
      robust_so_far: optional ``(E, N)`` or ``(N,)`` bool; only images still True
        are attacked (the others stay non-robust): a cascade of attacks.
      clean: optional ``(N,)`` bool, the scored model's clean correctness on ``x``
        when the caller has it already (computed with the same ``eval_logits_fn``);
        it is then not computed again. By default it is computed here, for the
        images still robust at some budget only.
      per_image: return an :class:`AttackResult` instead of accuracies.
      progress: a tqdm bar over budgets and batches.
      desc: the bar's label.
      unroll: deprecated, use ``chunk``: ``False``/``1``/``True`` meant one
        compiled call (``chunk=steps``), ``k`` chunks of ``k`` steps.

    Returns:
      ``np.ndarray`` of accuracies ``(E,)``, or an :class:`AttackResult`.

    Example:
      A two-class model on one-pixel images (class 1 above 0.5): PGD breaks the
      images within ``eps`` of 0.5.

      >>> import jax, jax.numpy as jnp
      >>> from gbjax import attacks
      >>> def logits(x):
      ...     v = x.reshape(-1, 1) - 0.5
      ...     return jnp.concatenate([-v, v], axis=1)
      >>> x = jnp.array([0.1, 0.45, 0.9, 0.65]).reshape(4, 1, 1, 1)
      >>> y = jnp.array([0, 0, 1, 1])
      >>> attacks.accuracy_under_attack(logits, x, y, eps_list=[0.0, 0.1, 0.2],
      ...     attack=attacks.PGD(steps=2), key=jax.random.key(0), progress=False).tolist()
      [1.0, 0.75, 0.5]
    """
    spec = resolve(
        attack,
        steps=steps,
        rel_step=rel_step,
        random_start=random_start,
        restarts=restarts,
        loss=loss,
        queries=queries,
        p_init=p_init,
        samples=samples,
        n_targets=n_targets,
    )
    eps_list = [float(e) for e in eps_list]
    if not eps_list:
        raise ValueError("eps_list must not be empty")
    for e in eps_list:
        check_scalar("eps", e, strict=False)
    lo, hi = check_clip(clip)
    check_eot(eot_samples, key)
    if isinstance(spec, (PGD, APGD)):
        check_restarts(spec.restarts, getattr(spec, "random_start", True), eot_samples)
    if unroll is not None:
        warnings.warn(
            "unroll= is deprecated: pass chunk= (iterations per compiled call)",
            DeprecationWarning,
            stacklevel=2,
        )
        if chunk is None:  # chunk wins, as it always did
            chunk = _chunk_from_unroll(unroll, getattr(spec, "steps", steps or 1))
    check_int("chunk", chunk, optional=True)
    needs_key = not isinstance(spec, (FGSM, PGD)) or (isinstance(spec, PGD) and spec.random_start)
    if needs_key and key is None:
        raise ValueError(f"attack {spec.attack!r} needs an explicit PRNG key (key=...)")
    check_int("batch_size", batch_size)
    n = int(np.shape(x)[0])
    if np.ndim(y) != 1 or np.shape(y)[0] != n:
        raise ValueError(f"y must have shape ({n},), got {np.shape(y)}")
    if n == 0:
        raise ValueError("x is empty")
    x_dtype = np.dtype(getattr(x, "dtype", np.float32))
    if not (np.issubdtype(x_dtype, np.floating) or x_dtype == np.uint8):
        raise ValueError(f"x must be float in [0, 1] or uint8, got dtype {x_dtype}")
    y = np.asarray(y).astype(np.int32)

    attack_fn = as_logits_fn(logits_fn)
    eval_fn = attack_fn if eval_logits_fn is None else as_logits_fn(eval_logits_fn)
    check_scoring_inputs(
        eval_fn, x, y, key=key, eot_samples=eot_samples, batch_size=batch_size, clip=(lo, hi)
    )
    shared = _same_forward(attack_fn, eval_fn)
    E = len(eps_list)
    if robust_so_far is None:
        robust = np.ones((E, n), bool)
    else:
        robust = np.broadcast_to(np.asarray(robust_so_far, bool), (E, n)).copy()

    if clean is None:  # clean correctness, once, where it can still matter
        clean = _clean_correct(eval_fn, x, y, robust.any(axis=0), key, eot_samples, batch_size)
    else:
        clean = np.asarray(clean)
        if clean.shape != (n,) or clean.dtype != bool:
            raise ValueError(
                f"clean must be a bool array of shape ({n},), got {clean.dtype} {clean.shape}"
            )
    robust &= clean[None]

    run = _Run(attack_fn, eval_fn, eot_samples, lo, hi, chunk, shared, batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=E, desc=desc or f"{spec.attack} sweep", unit="eps", leave=False)
    try:
        _xla.relieve_map_pressure()  # the attack may compile new programs
        if isinstance(spec, FGSM) and eot_samples is None and E > 1:
            # one gradient per image for every budget (FGSM's direction does not
            # depend on eps); the same flags as attacking each budget on its own
            robust = _fgsm_sweep(spec, run, x, y, robust, eps_list)
        else:
            robust = _attack_budgets(spec, run, x, y, robust, eps_list, key)
        if bar is not None:
            bar.update(E)
    finally:
        if bar is not None:
            bar.close()
    if per_image:
        return AttackResult(eps=tuple(eps_list), robust=robust)
    return robust.mean(axis=1)


# Only the flags count here, so PGD and APGD drop their fallen rows between chunks
# (docs/methods.md 7.6); benchmarks/evaluation_work.py turns it off to compare.
COMPACT = True


def _clean_correct(eval_fn, x, y, need, key, eot_samples, batch_size):
    """``(N,)``: the scored model is right on the clean image, computed for the images
    ``need`` only (False elsewhere: those are non-robust whatever it says)."""
    k_clean = None if key is None else jax.random.fold_in(key, 0x5EED)
    idx = np.flatnonzero(need)
    clean = np.zeros(len(need), bool)
    if len(idx) == 0:
        return clean
    for b in fixed_batches(len(idx), row_bucket_size(len(idx), batch_size), shrink=False):
        rows = idx[b.index]
        xb, yb = _rows(x, rows), y[rows]
        kb = None if k_clean is None else jax.random.fold_in(k_clean, b.start)
        ok = scored.correct(eval_fn, _to_float(xb), jnp.asarray(yb), kb, eot_samples=eot_samples)
        clean[rows[: b.valid]] = np.asarray(ok)[: b.valid]
    return clean


class _Run(NamedTuple):
    """How an attack runs, the same for every budget: the functions and the knobs."""

    attack_fn: Any
    eval_fn: Any
    eot_samples: int | None
    lo: float
    hi: float
    chunk: int | None
    shared: bool
    batch_size: int


def _fgsm_sweep(spec: FGSM, run: _Run, x, y, robust, eps_list):
    """The robust flags ``(E, N)`` after FGSM at every budget of ``eps_list``: each
    image still robust at some budget is attacked once, from one gradient."""
    robust = robust.copy()
    pos = [i for i, e in enumerate(eps_list) if e > 0]
    idx = np.flatnonzero(robust[pos].any(axis=0)) if pos else np.zeros(0, int)
    if len(idx) == 0:
        return robust
    eps_E = jnp.asarray([eps_list[i] for i in pos], jnp.float32)
    for b in fixed_batches(len(idx), row_bucket_size(len(idx), run.batch_size), shrink=False):
        rows = idx[b.index]
        ok_EB = scored.fgsm_sweep_robust(
            run.attack_fn,
            run.eval_fn,
            _to_float(_rows(x, rows)),
            jnp.asarray(y[rows]),
            eps_E,
            run.lo,
            run.hi,
            loss=spec.loss,
        )
        robust[np.ix_(pos, rows[: b.valid])] &= np.asarray(ok_EB)[:, : b.valid]
    return robust


def _attack_budgets(spec: Attack, run: _Run, x, y, robust, eps_list, key):
    """The robust flags ``(E, N)`` after the attack at every budget of ``eps_list``.

    The images still robust at each budget are attacked together, as one set of
    rows, each with its own eps: one batch shape and one pass of the attack for
    all budgets, rather than a pass per budget with its own (padded) batches and
    programs. Every row is an independent attack on one image at one budget."""
    robust = robust.copy()
    pos = np.asarray([i for i, e in enumerate(eps_list) if e > 0], int)
    if len(pos) == 0:
        return robust
    which, img = np.nonzero(robust[pos])  # budget-major: each budget's rows together
    if len(img) == 0:
        return robust
    budget = pos[which]
    eps_r = np.asarray(eps_list, np.float32)[budget]
    k = None if key is None else jax.random.fold_in(key, 0)
    robust[budget, img] = _attack_rows(spec, run, x, y, img, eps_r, k)
    return robust


def _attack_rows(spec: Attack, run: _Run, x, y, img, eps_r, key):
    """The robust flags ``(R,)`` of ``R`` rows: image ``img[r]`` attacked at the
    budget ``eps_r[r]`` (an image may appear in several rows, one per budget)."""
    robust = np.ones(len(img), bool)
    lo, hi, chunk, bs_max = run.lo, run.hi, run.chunk, run.batch_size
    if isinstance(spec, (Square, SPSA)):  # score-based: the whole set, batched inside
        rows = (run.eval_fn, _to_float(_rows(x, img)), y[img], key, jnp.asarray(eps_r))
        if isinstance(spec, Square):
            margin, _ = square_run(
                *rows,
                queries=int(spec.queries),
                p_init=float(spec.p_init),
                lo=lo,
                hi=hi,
                batch_size=bs_max,
                chunk=chunk or 25,
            )
            return np.asarray(margin) > 0
        ok, _ = spsa_run(
            *rows,
            steps=spec.steps,
            samples=int(spec.samples),
            lr=spec.lr,
            delta=spec.delta,
            lo=lo,
            hi=hi,
            batch_size=bs_max,
        )
        return np.asarray(ok, bool)
    restarts = getattr(spec, "restarts", 1)
    runs = [(r, None) for r in range(restarts)]
    if isinstance(spec, APGD) and spec.loss == "dlr-targeted":
        runs = [(r, t) for t in range(1, spec.n_targets + 1) for r in range(restarts)]
    fns = dict(eot_samples=run.eot_samples, shared=run.shared)
    bs = None
    for i_run, (r, target_rank) in enumerate(runs):
        idx = np.flatnonzero(robust)
        if len(idx) == 0:
            break
        k_run = None if key is None else jax.random.fold_in(restart_key(key, r), i_run)
        bs = row_bucket_size(len(idx), bs_max, current=bs)  # few shapes as the set shrinks
        for b in fixed_batches(len(idx), bs, shrink=False):
            rows = idx[b.index]
            xb, yb = _to_float(_rows(x, img[rows])), jnp.asarray(y[img[rows]])
            eps32 = jnp.asarray(eps_r[rows])  # (B,): each row's budget
            kb = None if k_run is None else jax.random.fold_in(k_run, b.start)
            fn, eval_fn = run.attack_fn, run.eval_fn
            if isinstance(spec, FGSM) and chunk == 1:
                # one PGD step of size eps from x: FGSM, with the PGD step program
                # (programs holding GB compile slowly; one fewer per model)
                ok, _ = scored.pgd_robust(
                    fn,
                    eval_fn,
                    xb,
                    yb,
                    kb,
                    eps32,
                    eps32,
                    1,
                    lo,
                    hi,
                    random_start=False,
                    loss=spec.loss,
                    chunk=1,
                    **fns,
                )
            elif isinstance(spec, FGSM):
                ok = scored.fgsm_robust(
                    fn,
                    eval_fn,
                    xb,
                    yb,
                    kb,
                    eps32,
                    lo,
                    hi,
                    eot_samples=run.eot_samples,
                    loss=spec.loss,
                )
            elif isinstance(spec, Noise):
                k_noise, k_eval = jax.random.split(kb)
                noisy = scored.sign_noise(xb, k_noise, eps32, lo, hi)
                ok = scored.correct(eval_fn, noisy, yb, k_eval, eot_samples=None)
            elif isinstance(spec, PGD):
                step_size = jnp.asarray(spec.rel_step * eps_r[rows] / spec.steps, jnp.float32)
                ok, _ = scored.pgd_robust(
                    fn,
                    eval_fn,
                    xb,
                    yb,
                    kb,
                    eps32,
                    step_size,
                    spec.steps,
                    lo,
                    hi,
                    random_start=spec.random_start,
                    loss=spec.loss,
                    chunk=chunk,
                    compact=COMPACT,
                    **fns,
                )
            else:
                ok, _ = apgd_run(
                    fn,
                    eval_fn,
                    xb,
                    yb,
                    kb,
                    eps32,
                    steps=spec.steps,
                    loss=spec.loss,
                    target_rank=target_rank or 1,
                    lo=lo,
                    hi=hi,
                    chunk=chunk,
                    compact=COMPACT,
                    **fns,
                )
            valid = rows[: b.valid]
            robust[valid] &= np.asarray(ok)[: b.valid]
    return robust


def _same_forward(attack_fn, eval_fn) -> bool:
    """The attacked function computes the scored logits on its forward pass (the same
    function, or the BPDA pair of :func:`make_attack_logits`), so one pass serves both.

    "The same" is judged by :func:`_same_function`: ``as_logits_fn`` wraps an
    ``nnx.Module`` in a new ``Partial`` each time, so the classifier of one
    :func:`make_attack_logits` pair is not the object of another's, and a model
    given bare and as ``Defended(model)`` are two objects computing one thing."""
    a, e = _plain(attack_fn), _plain(eval_fn)
    if _same_function(a, e):
        return True
    return (
        isinstance(a, Defended)
        and isinstance(e, Defended)
        and a.randomized == e.randomized
        and _same_function(a.classifier, e.classifier)
        and isinstance(a.preprocess, BPDA)
        and _same_function(a.preprocess.forward, e.preprocess)
    )


def _plain(fn):
    """``Defended(f)`` with no preprocessor and no key is ``f`` itself."""
    if isinstance(fn, Defended) and fn.preprocess is None and not fn.randomized:
        return _plain(fn.classifier)
    return fn


def _same_function(a, b) -> bool:
    """``a`` and ``b`` are one function: the same object, ``Partial`` objects of
    equal functions over the very same arrays (``as_logits_fn`` applied twice to
    one module), or two ``Defended`` of such parts. Arrays are compared by
    identity, never by value."""
    if a is b:
        return True
    if isinstance(a, Defended) and isinstance(b, Defended):
        return (
            a.randomized == b.randomized
            and _same_function(a.classifier, b.classifier)
            and _same_function(a.preprocess, b.preprocess)
        )
    if not (isinstance(a, Partial) and isinstance(b, Partial)):
        return False
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    return (
        tree_a == tree_b
        and len(leaves_a) == len(leaves_b)
        and all(u is v for u, v in zip(leaves_a, leaves_b, strict=True))
    )


def _rows(x, rows):
    """``x[rows]`` on the host for numpy, on the device for ``jax.Array``."""
    return np.asarray(x)[rows] if isinstance(x, np.ndarray) else jnp.take(x, jnp.asarray(rows), 0)


@dataclasses.dataclass(frozen=True)
class SanityReport:
    """Result of :func:`attack_sanity_check` (see its example).

    Example:
      >>> from gbjax import attacks
      >>> r = attacks.SanityReport(eps=(0.5,), fgsm_accuracy=(0.0,), pgd_accuracy=(0.0,),
      ...                          chance=0.5, pgd_at_most_fgsm=True, reaches_chance=True)
      >>> r.ok
      True
    """

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
    logits_fn: LogitsFn,
    x: ArrayLike,
    y: ArrayLike,
    *,
    eps_list: Sequence[float],
    num_classes: int,
    key: jax.Array,
    eval_logits_fn: LogitsFn | None = None,
    steps: int = 10,
    batch_size: int = 256,
    tol: float = 0.01,
    chance_tol: float = 0.05,
    eot_samples: int | None = None,
    chunk: int | None = None,
    progress: bool = False,
    raise_on_failure: bool = False,
    unroll: int | bool | None = None,
) -> SanityReport:
    """Checks that PGD is at least as strong as FGSM and reaches chance.

    Runs :func:`accuracy_under_attack` with FGSM and PGD-``steps`` over
    ``eps_list`` (ascending; the last entry should be a large budget).  Passes
    when PGD accuracy ``<=`` FGSM accuracy ``+ tol`` at every eps, and PGD
    accuracy at the largest eps is ``<= 1/num_classes + chance_tol`` (for an
    undefended model; a defended one failing this is the interesting case).

    ``chunk`` is passed to PGD (steps per compiled call, see
    :func:`accuracy_under_attack`; ``unroll`` is its deprecated old form). Raises
    ``AssertionError`` with the table when ``raise_on_failure`` and a check fails.

    Example:
      A two-class model on one-pixel images: at ``eps = 0.5`` every image can
      cross 0.5, so PGD reaches chance (0).

      >>> import jax, jax.numpy as jnp
      >>> from gbjax import attacks
      >>> def logits(x):
      ...     v = x.reshape(-1, 1) - 0.5
      ...     return jnp.concatenate([-v, v], axis=1)
      >>> x = jnp.array([0.1, 0.45, 0.9, 0.65]).reshape(4, 1, 1, 1)
      >>> y = jnp.array([0, 0, 1, 1])
      >>> r = attacks.attack_sanity_check(logits, x, y, eps_list=[0.1, 0.5], num_classes=2,
      ...                                 steps=2, key=jax.random.key(0))
      >>> r.pgd_accuracy, r.ok
      ((0.75, 0.0), True)
    """
    if not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if len(eps_list) == 0:
        raise ValueError("eps_list must not be empty")
    check_scoring_inputs(
        logits_fn,
        x,
        y,
        eval_logits_fn=eval_logits_fn,
        key=key,
        eot_samples=eot_samples,
        batch_size=batch_size,
        num_classes=num_classes,
    )
    common = dict(
        eps_list=eps_list,
        batch_size=batch_size,
        eval_logits_fn=eval_logits_fn,
        eot_samples=eot_samples,
        progress=progress,
    )
    k_fgsm, k_pgd = jax.random.split(key)
    acc_fgsm = accuracy_under_attack(logits_fn, x, y, attack="fgsm", key=k_fgsm, **common)
    if unroll is not None:
        warnings.warn(
            "unroll= is deprecated: pass chunk= (steps per compiled call)",
            DeprecationWarning,
            stacklevel=2,
        )
        if chunk is None:
            chunk = _chunk_from_unroll(unroll, steps)
    acc_pgd = accuracy_under_attack(
        logits_fn, x, y, attack="pgd", steps=steps, key=k_pgd, chunk=chunk, **common
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
