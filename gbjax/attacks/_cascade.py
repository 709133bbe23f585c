"""The worst-case cascade: stages in order, each only on the images still robust.

The shape of AutoAttack's standard evaluation (Croce & Hein 2020): an image
counts as robust only if it survives every stage, and each stage attacks only
the survivors of the stages before it, so the expensive attacks run on few
images. :func:`cascade` runs a list of :class:`Stage` (one call of
:func:`~gbjax.attacks.accuracy_under_attack`) and :class:`Group` (stages
recorded as one), and saves its state after every stage so that a stopped run
continues at the next stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import numbers
import os
import pathlib
import time
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.typing import ArrayLike

from gbjax._checks import check_int
from gbjax._files import write_atomic
from gbjax.attacks._specs import FGSM, PGD, SPECS, Attack, resolve
from gbjax.attacks._specs import OPTIONS as ATTACK_OPTIONS
from gbjax.attacks.evaluation import accuracy_under_attack

__all__ = [
    "Stage",
    "Group",
    "StageRecord",
    "CascadeResult",
    "cascade",
    "join_cascades",
    "reuse_group",
]

# what the cascade itself passes to accuracy_under_attack; a Stage may set the rest
_SET_BY_CASCADE = (
    "logits_fn",
    "x",
    "y",
    "eps_list",
    "attack",
    "batch_size",
    "eval_logits_fn",
    "key",
    "robust_so_far",
    "per_image",
    "progress",
    "desc",
)
OPTIONS = tuple(
    p for p in inspect.signature(accuracy_under_attack).parameters if p not in _SET_BY_CASCADE
)


@dataclasses.dataclass(frozen=True, init=False)
class Stage:
    """One stage of a :func:`cascade`: one call of ``accuracy_under_attack``.

    ``Stage("PGD-10 bpda", PGD(steps=10), attacked, eval_logits_fn=scored)``
    runs ``accuracy_under_attack(attacked, x, y, attack=PGD(steps=10),
    eval_logits_fn=scored, ...)`` on the images still robust. The string form
    ``Stage("PGD-10 bpda", "pgd", attacked, eval_logits_fn=scored, steps=10)``
    runs the same attack.

    Args:
      name: the stage's name, unique in its cascade: it labels the stage's
        record and its saved state, and (by default) picks its PRNG key.
      attack: a spec (:class:`~gbjax.attacks.PGD`, ...), or one of
        :data:`~gbjax.attacks.ATTACKS` with its options in ``options``.
      logits_fn: the attacked function.
      eval_logits_fn: the scored function (default: ``logits_fn``).
      first: attack only the first ``first`` images (all of them when there
        are fewer); the others keep their flags (e.g. an expensive stage on a
        prefix of a random subset).
      fold: what is folded into the cascade's ``key`` for this stage: an
        integer as it is, a string as its CRC-32; default the stage's name.
      **options: any other keyword argument of ``accuracy_under_attack``
        (``chunk``, ``eot_samples``, ``clip``; with a string ``attack`` also its
        options ``steps``, ``queries``, ``samples``, ``restarts``, ...).

    Stages are frozen and compare (and hash) by value; ``options`` holds the
    keyword arguments as sorted ``(name, value)`` pairs.

    Example:
      >>> import jax.numpy as jnp
      >>> from gbjax import attacks
      >>> def logits(x):
      ...     v = x.reshape(-1, 1) - 0.5
      ...     return jnp.concatenate([-v, v], axis=1)
      >>> attacks.Stage("PGD-20", attacks.PGD(steps=20), logits, chunk=1).describe()
      'pgd(chunk=1, steps=20)'
    """

    name: str
    attack: str | Attack
    logits_fn: Any
    eval_logits_fn: Any
    first: int | None
    fold: int | str | None
    options: tuple[tuple[str, Any], ...]

    def __init__(
        self,
        name: str,
        attack: str | Attack,
        logits_fn: Any,
        *,
        eval_logits_fn: Any = None,
        first: int | None = None,
        fold: int | str | None = None,
        **options: Any,
    ):
        if not isinstance(name, str) or not name:
            raise ValueError(f"a stage's name must be a non-empty string, got {name!r}")
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise TypeError(
                f"stage {name!r}: unknown option(s) {unknown}; a stage takes the keyword "
                f"arguments of accuracy_under_attack except those the cascade sets: {OPTIONS}"
            )
        try:  # the attack and its options as accuracy_under_attack will take them
            resolve(attack, **{k: v for k, v in options.items() if k in ATTACK_OPTIONS})
        except (ValueError, TypeError) as e:
            raise type(e)(f"stage {name!r}: {e}") from None
        check_int(f"stage {name!r}: first", first, optional=True)
        if fold is not None and not isinstance(fold, str):
            if not isinstance(fold, numbers.Integral) or isinstance(fold, bool):
                raise ValueError(f"stage {name!r}: fold must be None, a string or an integer")
            if not 0 <= fold < 2**32:
                raise ValueError(f"stage {name!r}: fold must be in [0, 2**32), got {fold}")
        values = dict(
            name=name,
            attack=attack,
            logits_fn=logits_fn,
            eval_logits_fn=eval_logits_fn,
            first=None if first is None else int(first),
            fold=fold,
            options=tuple(sorted(options.items())),
        )
        for field, value in values.items():
            object.__setattr__(self, field, value)

    def describe(self) -> str:
        """The stage's settings as text (its functions left out), e.g. ``pgd(steps=10)``;
        a state file records it, and refuses a stage of the same name set otherwise.

        A spec is written as the string form with its options set away from their
        defaults, so ``PGD(steps=20)`` reads ``pgd(steps=20)``, as
        ``"pgd", steps=20`` does.
        """
        options = dict(self.options)
        if isinstance(self.attack, SPECS):
            options.update(self.attack.changed())
            attack = self.attack.attack
        else:
            attack = self.attack
        parts = [f"{k}={v!r}" for k, v in sorted(options.items())]
        parts += [
            f"{k}={getattr(self, k)!r}" for k in ("first", "fold") if getattr(self, k) is not None
        ]
        return f"{attack}({', '.join(parts)})"

    @property
    def spec(self) -> Attack:
        """The stage's attack as a spec (the string form translated)."""
        opts = {k: v for k, v in self.options if k in ATTACK_OPTIONS}
        return resolve(self.attack, **opts)


@dataclasses.dataclass(frozen=True)
class Group:
    """Stages that a :func:`cascade` runs in order and records as one stage.

    The group's record holds the robust flags after its last stage, and one
    record per stage in ``sub_stages``; the state is saved once, after the
    whole group (e.g. a baseline cascade kept as one row beside newer stages).

    Args:
      name: the group's name, unique in its cascade.
      stages: its :class:`Stage`\\ s (at least one, names unique in the group).

    Example:
      >>> import jax.numpy as jnp
      >>> from gbjax import attacks
      >>> logits = lambda x: jnp.concatenate([0.5 - x, x - 0.5], axis=1).reshape(-1, 2)
      >>> group = attacks.Group("baseline", (attacks.Stage("FGSM", attacks.FGSM(), logits),))
      >>> group.describe()
      'group[FGSM: fgsm()]'

    (:func:`reuse_group` shows a group in a cascade.)
    """

    name: str
    stages: tuple[Stage, ...]

    def __post_init__(self):
        stages = tuple(self.stages)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a group's name must be a non-empty string, got {self.name!r}")
        if not stages:
            raise ValueError(f"group {self.name!r} has no stages")
        if not all(isinstance(s, Stage) for s in stages):
            raise TypeError(f"group {self.name!r}: its stages must be Stage objects")
        _check_unique([s.name for s in stages], f"group {self.name!r}")
        object.__setattr__(self, "stages", stages)

    def describe(self) -> str:
        """The group's stages as text (see :meth:`Stage.describe`)."""
        return "group[" + "; ".join(_plan(self.stages)) + "]"


class StageRecord(NamedTuple):
    """What one stage of a :func:`cascade` did.

    Attributes:
      name: the stage's name.
      accuracy: ``(E,)`` robust accuracy after this stage (and every one before it).
      robust: ``(E, N)`` bool: the images robust after this stage; ``None`` for a
        stage of a group read from a state file that kept only accuracies.
      removed: per eps, the indices of the images this stage broke (the first
        stage also removes the images misclassified clean); ``None`` as for
        ``robust``.
      seconds: the stage's wall time (compilation included), or ``None``.
      sub_stages: a :class:`Group`'s records, one per stage (else empty).
    """

    name: str
    accuracy: np.ndarray
    robust: np.ndarray | None
    removed: tuple[np.ndarray, ...] | None
    seconds: float | None
    sub_stages: tuple[StageRecord, ...] = ()

    def as_json(self) -> dict:
        """The record as JSON-ready ``{"stage", "accuracy", "removed", "seconds"}``
        (and ``"sub_stages"`` for a group), the layout of the state file."""
        rec: dict = dict(stage=self.name, accuracy=np.asarray(self.accuracy).tolist())
        if self.removed is not None:
            rec["removed"] = [np.asarray(r).tolist() for r in self.removed]
        if self.seconds is not None:
            rec["seconds"] = round(float(self.seconds), 1)
        if self.sub_stages:
            rec["sub_stages"] = [s.as_json() for s in self.sub_stages]
        return rec


class CascadeResult(NamedTuple):
    """The result of :func:`cascade`.

    Attributes:
      eps: the budgets.
      stages: one :class:`StageRecord` per stage, in order.
      robust: ``(E, N)`` bool: robust to every stage (the per-image AND over
        stages, clean correctness included).
    """

    eps: tuple[float, ...]
    stages: tuple[StageRecord, ...]
    robust: np.ndarray

    @property
    def accuracy(self) -> np.ndarray:
        """``(E,)`` robust accuracy over every stage."""
        return self.robust.mean(axis=1)

    def records(self) -> list[dict]:
        """``[record.as_json() for record in stages]``: each stage's name, accuracy,
        removed images and seconds, JSON-ready (the state file's ``"stages"``)."""
        return [s.as_json() for s in self.stages]


def cascade(
    stages: Sequence[Stage | Group],
    x: ArrayLike,
    y: ArrayLike,
    *,
    eps_list: Sequence[float],
    key: jax.Array | None = None,
    batch_size: int = 256,
    state: str | os.PathLike | None = None,
    progress: bool = True,
    desc: str | None = None,
) -> CascadeResult:
    """Runs ``stages`` in order, each only on the images still robust (AutoAttack's
    standard evaluation); returns the robust flags after each stage and overall.

    An image is robust at a budget when the scored function classifies it
    correctly clean and at every iterate of every stage so far. A stage is one
    :func:`~gbjax.attacks.accuracy_under_attack` call with ``robust_so_far``
    set to the flags after the stage before it, so it never adds an image back.

    With ``state``, the flags and records are saved (atomically, as JSON) after
    every stage; run again with the same ``state``, the cascade reads the stages
    done and runs only the rest, so a stopped sweep continues at its next stage.
    A state made with other images, budgets or stages is refused.

    Args:
      stages: :class:`Stage` and :class:`Group` objects, names unique.
      x: images ``(N, H, W, C)``, float in ``[0, 1]`` or uint8.
      y: integer labels ``(N,)``.
      eps_list: budgets (``0`` gives clean accuracy).
      key: PRNG key; stage ``s`` gets ``jax.random.fold_in(key, f)`` with ``f``
        its ``fold`` (default the CRC-32 of its name). Needed by every stage but
        FGSM and PGD without random start.
      batch_size: images per compiled batch, for every stage.
      state: a JSON file (created with its folder when missing). Its layout:
        ``{"stages": [record, ...], "robust": [[bool] * N] * E, "eps": [...],
        "images": sha256, "plan": [...]}`` with each record as in
        :meth:`StageRecord.as_json`; a file holding only ``"stages"`` and
        ``"robust"`` (written before ``eps``, ``images`` and ``plan`` were
        recorded) is accepted when its shape and stage names match.
      progress: tqdm bars per stage.
      desc: prefix of the bars' labels.

    Returns:
      A :class:`CascadeResult`: ``robust`` ``(E, N)`` overall, ``accuracy``,
      and per stage a :class:`StageRecord` (flags after it, images it removed,
      accuracy, seconds).

    Raises:
      TypeError: a stage that is neither a :class:`Stage` nor a :class:`Group`.
      ValueError: invalid inputs, two stages of one name, a missing ``key``, or
        a ``state`` file made with other images, budgets or stages (in each
        case before any stage runs).

    Example:
      A two-class model on one-pixel images (class 1 when the pixel exceeds
      0.5): FGSM breaks the images within ``eps`` of 0.5, and the PGD stage
      that follows attacks only the survivors.

      >>> import jax, jax.numpy as jnp
      >>> from gbjax import attacks
      >>> def logits(x):
      ...     v = x.reshape(-1, 1) - 0.5
      ...     return jnp.concatenate([-v, v], axis=1)
      >>> x = jnp.array([0.1, 0.45, 0.9, 0.65]).reshape(4, 1, 1, 1)
      >>> y = jnp.array([0, 0, 1, 1])
      >>> stages = [
      ...     attacks.Stage("FGSM", attacks.FGSM(), logits),
      ...     attacks.Stage("PGD-2", attacks.PGD(steps=2), logits),
      ... ]
      >>> res = attacks.cascade(
      ...     stages, x, y, eps_list=[0.1, 0.2], key=jax.random.key(0), progress=False
      ... )
      >>> res.accuracy.tolist()
      [0.75, 0.5]
      >>> [[i.tolist() for i in s.removed] for s in res.stages]
      [[[1], [1, 3]], [[], []]]
    """
    stages = tuple(stages)
    if not stages:
        raise ValueError("cascade needs at least one stage")
    for s in stages:
        if not isinstance(s, (Stage, Group)):
            raise TypeError(f"stages must be Stage or Group objects, got {type(s).__name__}")
    _check_unique([s.name for s in stages], "cascade")
    eps = tuple(float(e) for e in eps_list)
    if not eps:
        raise ValueError("eps_list must not be empty")
    n = int(np.shape(x)[0])
    if np.ndim(y) != 1 or np.shape(y)[0] != n:
        raise ValueError(f"y must have shape ({n},), got {np.shape(y)}")
    if key is None:
        keyed = [s.name for s in _leaves(stages) if _needs_key(s)]
        if keyed:
            raise ValueError(f"stages {keyed} need a PRNG key: pass key=...")
    images = _digest(x, y)
    plan = _plan(stages)

    path = None if state is None else pathlib.Path(state)
    records: list[StageRecord] = []
    if path is not None and path.is_file():
        records = _load(path, stages, plan, eps, images, n)
    robust = np.ones((len(eps), n), bool) if not records else records[-1].robust.copy()

    def run_one(stage: Stage, robust):
        t0 = time.perf_counter()
        after = _run_stage(stage, x, y, robust, eps, key, batch_size, progress, desc)
        return _record(stage.name, robust, after, time.perf_counter() - t0)

    for stage in stages[len(records) :]:
        if isinstance(stage, Group):
            t0 = time.perf_counter()
            subs, inner = [], robust
            for sub in stage.stages:
                subs.append(run_one(sub, inner))
                inner = subs[-1].robust
            rec = _record(stage.name, robust, inner, time.perf_counter() - t0, tuple(subs))
        else:
            rec = run_one(stage, robust)
        records.append(rec)
        robust = rec.robust
        if path is not None:
            _save(path, records, robust, eps, images, plan)
    return CascadeResult(eps=eps, stages=tuple(records), robust=robust)


# ----------------------------------------------------------------------------
# joining the cascades of parts of an image set


def join_cascades(
    parts: Sequence[CascadeResult],
    positions: Sequence[ArrayLike],
    *,
    state: str | os.PathLike | None = None,
    stages: Sequence[Stage | Group] | None = None,
    x: ArrayLike | None = None,
    y: ArrayLike | None = None,
) -> CascadeResult:
    """The cascade of a whole image set from cascades run on disjoint parts of it.

    A cascade decides each image on its own (its flags after a stage depend on
    that image's attacks only), so a set can be split, each part's cascade run
    elsewhere (in processes pinned to different cores, say), and the parts'
    results joined: part ``i`` ran on the images ``positions[i]`` of the set,
    and the positions together name every image ``0..N-1`` exactly once. The
    attacks' random draws depend on the batches they ran in, so a split run
    draws differently from one over the whole set; every draw is still seeded.

    Args:
      parts: the parts' results, the same stages (by name) at the same budgets.
      positions: per part, the positions of its images in the whole set.
      state: optional: a cascade state file to write for the whole set, as
        :func:`cascade` writes it, so a later ``cascade(stages, x, y,
        state=state)`` (or :func:`reuse_group`) reads every stage as done. It
        must not exist yet; needs ``stages``, ``x`` and ``y``.
      stages: the whole set's stages (their names and settings go into
        ``state``; a stage's ``first`` is counted over the whole set).
      x: the whole set's images.
      y: its labels.

    Returns:
      The whole set's :class:`CascadeResult`: flags and records as one cascade
      over the set would give them (images removed recomputed from the joined
      flags, positions in the whole set); a stage's ``seconds`` is the largest
      of the parts' (they ran at the same time), ``None`` if any part lacks it.

    Raises:
      ValueError: no parts, positions that do not cover the set exactly once or
        do not match the parts' sizes, parts with other stages or budgets, a
        record without flags (read from an old state file), a ``state`` that
        exists, or ``state`` without ``stages``, ``x`` and ``y``.

    Example:
      The images at even and odd positions, attacked apart, joined:

      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from gbjax import attacks
      >>> def logits(x):
      ...     v = x.reshape(-1, 1) - 0.5
      ...     return jnp.concatenate([-v, v], axis=1)
      >>> x = jnp.array([0.1, 0.45, 0.9, 0.65]).reshape(4, 1, 1, 1)
      >>> y = jnp.array([0, 0, 1, 1])
      >>> stages = [attacks.Stage("FGSM", attacks.FGSM(), logits)]
      >>> pos = [np.array([0, 2]), np.array([1, 3])]
      >>> parts = [attacks.cascade(stages, x[p], y[p], eps_list=[0.1, 0.2], progress=False)
      ...          for p in pos]
      >>> whole = attacks.join_cascades(parts, pos)
      >>> whole.accuracy.tolist(), [r.tolist() for r in whole.stages[0].removed]
      ([0.75, 0.5], [[1], [1, 3]])
    """
    parts = tuple(parts)
    if not parts:
        raise ValueError("join_cascades needs at least one part")
    if len(positions) != len(parts):
        raise ValueError(f"{len(parts)} parts but {len(positions)} position lists")
    pos = [np.asarray(p, dtype=np.int64).reshape(-1) for p in positions]
    n = sum(len(p) for p in pos)
    if not np.array_equal(np.sort(np.concatenate(pos)), np.arange(n)):
        raise ValueError(f"positions must name each of the {n} images exactly once")
    eps = parts[0].eps
    names = [s.name for s in parts[0].stages]
    for i, (part, p) in enumerate(zip(parts, pos)):
        if tuple(part.eps) != tuple(eps):
            raise ValueError(f"part {i} ran at eps {list(part.eps)}, part 0 at {list(eps)}")
        if [s.name for s in part.stages] != names:
            raise ValueError(
                f"part {i} ran the stages {[s.name for s in part.stages]}, not {names}"
            )
        if part.robust.shape != (len(eps), len(p)):
            raise ValueError(
                f"part {i} has flags of shape {part.robust.shape}, but {len(p)} positions"
            )
    if state is not None:
        if stages is None or x is None or y is None:
            raise ValueError("writing a state needs the whole set's stages, x and y")
        if pathlib.Path(state).exists():
            raise ValueError(f"state {state} exists; join_cascades writes only a new one")
        stages = tuple(stages)
        if [s.name for s in stages] != names:
            raise ValueError(f"stages {[s.name for s in stages]} are not the parts' {names}")
        if int(np.shape(x)[0]) != n or np.shape(y) != (n,):
            raise ValueError(f"x and y must hold the {n} images of the parts")

    def placed(flags):  # the parts' (E, n_i) flags at their positions in the set
        out = np.empty((len(eps), n), bool)
        for f, p in zip(flags, pos):
            out[:, p] = f
        return out

    def joined(records, before, where):
        out = []
        for k, name in enumerate([r.name for r in records[0]]):
            recs = [r[k] for r in records]
            if any(r.robust is None for r in recs):
                raise ValueError(f"{where}stage {name!r} of a part has no flags to join")
            after = placed([r.robust for r in recs])
            subs = ()
            if recs[0].sub_stages:
                subs = tuple(joined([r.sub_stages for r in recs], before, f"{name}: "))
            secs = [r.seconds for r in recs]
            seconds = None if any(s is None for s in secs) else max(secs)
            out.append(_record(name, before, after, seconds, subs))
            before = after
        return out

    records = joined([p.stages for p in parts], np.ones((len(eps), n), bool), "")
    robust = placed([p.robust for p in parts])
    if records and not np.array_equal(records[-1].robust, robust):
        raise ValueError("a part's flags differ from those after its last stage")
    if state is not None:
        _save(pathlib.Path(state), records, robust, eps, _digest(x, y), _plan(stages))
    return CascadeResult(eps=tuple(eps), stages=tuple(records), robust=robust)


# ----------------------------------------------------------------------------
# running


def _run_stage(stage, x, y, robust, eps, key, batch_size, progress, desc):
    """The flags ``(E, N)`` after ``stage``, from those before it."""
    m = robust.shape[1] if stage.first is None else min(stage.first, robust.shape[1])
    fold = stage.name if stage.fold is None else stage.fold
    if isinstance(fold, str):
        fold = zlib.crc32(fold.encode())
    res = accuracy_under_attack(
        stage.logits_fn,
        x[:m],
        y[:m],
        eps_list=eps,
        attack=stage.attack,
        batch_size=batch_size,
        eval_logits_fn=stage.eval_logits_fn,
        key=None if key is None else jax.random.fold_in(key, fold),
        robust_so_far=robust[:, :m],
        per_image=True,
        progress=progress,
        desc=stage.name if desc is None else f"{desc}: {stage.name}",
        **dict(stage.options),
    )
    after = robust.copy()
    after[:, :m] = res.robust
    return after


def _record(name, before, after, seconds, sub_stages=()) -> StageRecord:
    removed = tuple(np.flatnonzero(b & ~a) for b, a in zip(before, after))
    return StageRecord(name, after.mean(axis=1), after, removed, seconds, sub_stages)


def _plan(stages) -> list[str]:
    """Each stage's name and settings, as a state file's ``plan`` records them."""
    return [f"{s.name}: {s.describe()}" for s in stages]


def _leaves(stages):
    for s in stages:
        yield from (s.stages if isinstance(s, Group) else (s,))


def _needs_key(stage: Stage) -> bool:
    spec, eot = stage.spec, dict(stage.options).get("eot_samples")
    if isinstance(spec, FGSM):
        return eot is not None
    if isinstance(spec, PGD):
        return spec.random_start or eot is not None
    return True


def _check_unique(names, where):
    seen = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{where}: two stages are named {name!r}; names must be unique")
        seen.add(name)


# ----------------------------------------------------------------------------
# the state file


def _digest(x, y) -> str:
    """SHA-256 over the images' and labels' dtype, shape and bytes."""
    h = hashlib.sha256()
    for a in (np.asarray(x), np.asarray(y)):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}\0{a.shape}\n".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def _save(path, records, robust, eps, images, plan) -> None:
    rec = dict(
        stages=[r.as_json() for r in records],
        robust=robust.tolist(),
        eps=list(eps),
        images=images,
        plan=plan,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(rec))


def _refuse(path, why):
    raise ValueError(
        f"state {path} {why}; use another state path, or delete the file to start over"
    )


def _load(path, stages, plan, eps, images, n) -> list[StageRecord]:
    """The records of the stages done, checked against this cascade."""
    try:
        rec = json.loads(path.read_text())
        done, final = rec["stages"], np.asarray(rec["robust"], bool)
    except (ValueError, KeyError, TypeError) as e:
        _refuse(path, f"is not a cascade state ({type(e).__name__}: {e})")
    if final.shape != (len(eps), n):
        _refuse(
            path,
            f"was made with {final.shape[0]} eps and {final.shape[-1]} images, "
            f"not {len(eps)} and {n}",
        )
    if "eps" in rec and [float(e) for e in rec["eps"]] != list(eps):
        _refuse(path, f"was made with eps {rec['eps']}, not {list(eps)}")
    if "images" in rec and rec["images"] != images:
        _refuse(path, "was made with other images or labels")
    names = [s["stage"] for s in done]
    if len(done) > len(stages) or names != [s.name for s in stages[: len(done)]]:
        _refuse(
            path,
            f"holds the stages {names}, but this cascade's are {[s.name for s in stages]}",
        )
    if "plan" in rec:
        for i, (was, now) in enumerate(zip(rec["plan"][: len(done)], plan)):
            if was != now:
                _refuse(path, f"was made with stage {i} as {was!r}, not {now!r}")
    records, robust = [], np.ones((len(eps), n), bool)
    for stage, s in zip(stages, done):
        subs = s.get("sub_stages")
        if subs is not None and not isinstance(stage, Group):
            _refuse(path, f"holds {stage.name!r} as a group, but here it is one stage")
        if subs is not None and [u["stage"] for u in subs] != [u.name for u in stage.stages]:
            _refuse(path, f"holds other sub-stages of {stage.name!r}")
        sub_records, inner = [], robust
        for u in subs or ():
            if inner is not None and "removed" in u:
                inner = _apply(path, inner, u["removed"])
                sub_records.append(
                    StageRecord(
                        u["stage"],
                        np.asarray(u["accuracy"]),
                        inner,
                        _indices(u["removed"]),
                        u.get("seconds"),
                    )
                )
            else:  # an older file kept only the sub-stages' accuracies
                inner = None
                sub_records.append(
                    StageRecord(u["stage"], np.asarray(u["accuracy"]), None, None, None)
                )
        if "removed" not in s or "accuracy" not in s:
            _refuse(path, f"is not a cascade state (stage {s['stage']!r} lacks its removed images)")
        after = _apply(path, robust, s["removed"])
        records.append(
            StageRecord(
                s["stage"],
                np.asarray(s["accuracy"]),
                after,
                _indices(s["removed"]),
                s.get("seconds"),
                tuple(sub_records),
            )
        )
        robust = after
    if not np.array_equal(robust, final):
        _refuse(path, "is inconsistent: its stages' removed images do not give its robust flags")
    return records


def _indices(removed) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(r, dtype=np.int64) for r in removed)


def _apply(path, robust, removed) -> np.ndarray:
    """``robust`` with ``removed`` (per eps) set False; they must have been robust."""
    if len(removed) != robust.shape[0]:
        _refuse(path, "is inconsistent: a stage lists removed images for another number of eps")
    after = robust.copy()
    for e, idx in enumerate(removed):
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= robust.shape[1] or not robust[e, idx].all()):
            _refuse(path, "is inconsistent: a stage removes an image that was not robust")
        after[e, idx] = False
    return after


# ----------------------------------------------------------------------------
# reusing an earlier cascade


def reuse_group(
    source: str | os.PathLike,
    state: str | os.PathLike,
    group: Group,
    x: ArrayLike,
    y: ArrayLike,
    *,
    eps_list: Sequence[float],
) -> bool:
    """Starts the state file ``state`` with ``group`` recorded from an earlier cascade.

    ``source`` is the state file of a cascade over the same images and labels
    whose stages were exactly ``group``'s stages (same names and settings), at
    budgets that include every one of ``eps_list``. Its flags at those budgets
    become ``group``'s record (the sub-stages' removed images and seconds
    included), so a :func:`cascade` called next with ``state`` and ``group`` as
    its first stage skips the group and runs only the stages after it: nothing
    the earlier cascade did is recomputed. The earlier run's attacks are taken as
    they ran, at its budgets and keys.

    Args:
      source: the earlier cascade's state file.
      state: the new cascade's state file (created with its folder).
      group: the group the new cascade starts with.
      x: the new cascade's images ``(N, H, W, C)``.
      y: its labels ``(N,)``.
      eps_list: the new cascade's budgets.

    Returns:
      True when ``state`` was written; False when ``state`` exists already (the
      cascade resumes from it) or ``source`` does not.

    Raises:
      ValueError: ``source`` is not a cascade state, or was made with other
        images, other stages or without one of ``eps_list``. Nothing is written.

    Example:
      >>> import json, pathlib, tempfile
      >>> import jax, jax.numpy as jnp
      >>> from gbjax import attacks
      >>> def logits(x):
      ...     v = x.reshape(-1, 1) - 0.5
      ...     return jnp.concatenate([-v, v], axis=1)
      >>> x = jnp.array([0.1, 0.45, 0.9, 0.65]).reshape(4, 1, 1, 1)
      >>> y = jnp.array([0, 0, 1, 1])
      >>> fgsm = attacks.Stage("FGSM", "fgsm", logits)
      >>> d = pathlib.Path(tempfile.mkdtemp())
      >>> _ = attacks.cascade([fgsm], x, y, eps_list=[0.1, 0.2], state=d / "old.json",
      ...                     progress=False)
      >>> group = attacks.Group("old cascade", (fgsm,))
      >>> attacks.reuse_group(d / "old.json", d / "new.json", group, x, y, eps_list=[0.2])
      True
      >>> pgd = attacks.Stage("PGD-2", "pgd", logits, steps=2)
      >>> res = attacks.cascade([group, pgd], x, y, eps_list=[0.2], key=jax.random.key(0),
      ...                       state=d / "new.json", progress=False)
      >>> [s.name for s in res.stages], res.accuracy.tolist()
      (['old cascade', 'PGD-2'], [0.5])
    """
    source, state = pathlib.Path(source), pathlib.Path(state)
    if state.exists() or not source.is_file():
        return False
    if not isinstance(group, Group):
        raise TypeError(f"group must be a Group, got {type(group).__name__}")
    try:
        rec = json.loads(source.read_text())
        done, src_eps = rec["stages"], [float(e) for e in rec["eps"]]
        src_images, src_plan = rec["images"], rec["plan"]
        final = np.asarray(rec["robust"], bool)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{source} is not a cascade state with eps, images and plan "
            f"({type(e).__name__}: {e}); it cannot be reused"
        ) from None
    if src_images != _digest(x, y):
        raise ValueError(f"{source} was made with other images or labels; it cannot be reused")
    names, plan = (
        [s.name for s in group.stages],
        _plan(group.stages),
    )
    if [s.get("stage") for s in done] != names or src_plan != plan:
        raise ValueError(
            f"{source} ran the stages {src_plan}, not the group's {plan}; it cannot be reused"
        )
    eps = [float(e) for e in eps_list]
    missing = [e for e in eps if e not in src_eps]
    if missing:
        raise ValueError(f"{source} has no flags at eps {missing} (it has {src_eps})")
    rows = [src_eps.index(e) for e in eps]
    n = final.shape[-1]
    start = np.ones((len(eps), n), bool)
    robust, subs, seconds = start, [], 0.0
    for s in done:
        removed = [s["removed"][r] for r in rows]
        after = _apply(source, robust, removed)
        subs.append(_record(s["stage"], robust, after, s.get("seconds", 0.0)))
        robust, seconds = after, seconds + float(s.get("seconds", 0.0))
    if not np.array_equal(robust, final[rows]):
        raise ValueError(f"{source} is inconsistent: its stages do not give its robust flags")
    record = _record(group.name, start, robust, seconds, tuple(subs))
    _save(state, [record], robust, eps, _digest(x, y), _plan([group]))
    return True
