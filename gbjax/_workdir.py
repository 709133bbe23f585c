"""A training run's workdir: the configuration that made it, one writer at a time,
and checkpoints that verify (used by :func:`gbjax.train.train_and_evaluate` and
:func:`gbjax.train.restore_model`; not a public API).

Rules
-----
* ``config.json`` records the configuration that made the workdir, with the
  data's shapes and a fingerprint (a sha256 of the training and test arrays, so
  in-memory ``config.data`` is compared too) and ``workdir_format``. Resuming
  with another configuration raises :class:`WorkdirMismatchError` naming the
  fields that differ, before anything in the workdir is changed.
* Fields that may differ on resume (:data:`MAY_DIFFER`) change how a run is
  shown, logged, evaluated along the way, checkpointed or where it runs, never
  what it trains. ``num_steps``/``num_epochs`` may change when the learning
  rate does not depend on the run's length (``schedule="constant"`` and no
  lookahead); at or below the checkpoint's step nothing is trained and the
  checkpoint's model is returned with the run's own final metrics.
* ``overwrite=True`` starts over: it deletes only what the trainer created
  (:data:`TRAINER_FILES`), and only in a folder whose ``config.json`` is a gbjax
  record.
* After each checkpoint is written, ``gbjax_sha256.json`` beside its files holds
  their sha256. On resume, a newer step that fails it (or lacks it: the run was
  killed while writing) is reported, moved to ``corrupt_checkpoints/`` and the
  latest step that verifies is used.
* ``.gbjax.lock`` (``fcntl.flock``, released when the run ends, however it ends)
  keeps a second run out while one writes.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import socket
import sys

import numpy as np

from gbjax._files import write_atomic
from gbjax.config import Config

FORMAT = 1
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
LOCK_NAME = ".gbjax.lock"
SUM_NAME = "gbjax_sha256.json"
CORRUPT_DIR = "corrupt_checkpoints"
# Everything the trainer creates in a workdir besides its lock file.
TRAINER_FILES = (CONFIG_NAME, METRICS_NAME, "checkpoints", CORRUPT_DIR)
# Config fields that may differ when a run is resumed: none changes what is trained.
MAY_DIFFER = frozenset(
    {
        "progress",
        "log_every_steps",
        "checkpoint_every_steps",
        "max_checkpoints_to_keep",
        "eval_every_epochs",
        "eval_tta",  # test-time augmentation: how the model is scored, not trained
        "eval_tta_every_epoch",
        "eval_batch_size",
        "num_devices",
        "data_dir",  # where the data lives: the data themselves are fingerprinted
        "cache_dir",
    }
)
LENGTH_FIELDS = ("num_steps", "num_epochs")  # compared through the total step count
_NOT_COMPARED = MAY_DIFFER | set(LENGTH_FIELDS) | {"total_steps", "workdir_format"}


class WorkdirError(RuntimeError):
    """A workdir cannot be used as asked; nothing in it was changed."""


class WorkdirMismatchError(WorkdirError):
    """The workdir was made with another configuration."""


class WorkdirBusyError(WorkdirError):
    """Another run holds the workdir's lock."""


class CorruptCheckpointError(WorkdirError):
    """A checkpoint fails its checksum."""


def say(msg: str) -> None:
    """A message for the user (stderr): what the trainer decided and why."""
    print(f"gbjax.train: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------
# the record


def data_fingerprint(*arrays) -> dict:
    """Shapes, dtypes and a sha256 of ``arrays`` (in order)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return {"shapes": [list(np.shape(a)) for a in arrays], "sha256": h.hexdigest()}


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def make_record(config: Config, data, *, num_classes: int, total_steps: int) -> dict:
    """What ``config.json`` records: the config, the data's sizes and fingerprint."""
    xtr, ytr, xte, yte = data
    rec = config.to_json_dict()
    rec.update(
        input_shape=list(xtr.shape[1:]),
        num_classes=num_classes,
        num_train=len(xtr),
        num_test=len(xte),
        total_steps=total_steps,
        data_fingerprint=data_fingerprint(xtr, ytr, xte, yte),
        workdir_format=FORMAT,
    )
    return _jsonable(rec)


def read_record(workdir: pathlib.Path) -> dict | None:
    """``workdir/config.json``; None when absent. Raises WorkdirError when it is not
    a gbjax record (then nothing there is reused or deleted)."""
    path = workdir / CONFIG_NAME
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        rec = e
    if not (isinstance(rec, dict) and "model" in rec and "input_shape" in rec):
        why = f"unreadable: {rec}" if isinstance(rec, Exception) else "no model/input_shape"
        raise WorkdirError(
            f"{path} is not a gbjax workdir record ({why}), so {workdir} is left as it is. "
            "Use another workdir."
        )
    return rec


def _defaults() -> dict:
    out = {}
    for f in dataclasses.fields(Config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    out.pop("data", None)
    return _jsonable(out)


def differences(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """``(field, value in old, value in new)`` for every field that must match.

    A field missing from one record (written before the field existed) counts as
    its default."""
    defaults, missing = _defaults(), "<absent>"
    out = []
    for k in sorted((set(old) | set(new)) - _NOT_COMPARED):
        a, b = old.get(k, defaults.get(k, missing)), new.get(k, defaults.get(k, missing))
        if a != b:
            out.append((k, a, b))
    return out


def _show(field: str, value) -> str:
    if field == "data_fingerprint" and isinstance(value, dict):
        return f"shapes {value.get('shapes')}, sha256 {str(value.get('sha256'))[:12]}"
    return repr(value)


def _length_problem(old: dict, new: dict, step: int | None) -> str | None:
    """Why ``new``'s run length cannot continue ``old``'s checkpoint, or None."""
    if old.get("total_steps") == new["total_steps"]:
        return None
    if step is not None and new["total_steps"] <= step:
        return None  # nothing to train: the checkpoint is returned
    if new.get("schedule") == "constant" and not new.get("lookahead_every"):
        return None  # the trajectory does not depend on the run's length
    return (
        f"the run's length differs: {old.get('total_steps')} steps in the workdir "
        f"(num_steps={old.get('num_steps')!r}, num_epochs={old.get('num_epochs')!r}), "
        f"{new['total_steps']} now (num_steps={new.get('num_steps')!r}, "
        f"num_epochs={new.get('num_epochs')!r}); with schedule={new.get('schedule')!r}"
        f"{' and lookahead' if new.get('lookahead_every') else ''} the learning rate "
        "depends on the total, so the checkpoint cannot be continued to another length"
    )


def _refuse(workdir: pathlib.Path, lines: list[str]) -> WorkdirMismatchError:
    body = "\n".join(f"  {ln}" for ln in lines)
    return WorkdirMismatchError(
        f"workdir {workdir} was made with another configuration; refusing to mix two runs "
        f"in it (nothing in it was changed):\n{body}\nResume with the workdir's "
        f"configuration ({workdir / CONFIG_NAME}), use another workdir, or start over with "
        "overwrite=True (--overwrite), which deletes only the trainer's files there "
        f"({', '.join(TRAINER_FILES)})."
    )


def _check_existing(workdir: pathlib.Path, record: dict, overwrite: bool) -> dict | None:
    """The workdir's record (None for a new one), after the read-only checks."""
    if not workdir.exists():
        return None
    if not workdir.is_dir():
        raise WorkdirError(f"workdir {workdir} exists and is not a folder")
    old = read_record(workdir)
    if old is None:
        found = [n for n in TRAINER_FILES[1:] if (workdir / n).exists()]
        if found:
            raise WorkdirError(
                f"{workdir} holds {found} but no {CONFIG_NAME}: not a workdir the trainer "
                "made (or its record was lost), so nothing there is reused or deleted. "
                "Use another workdir."
            )
        return None
    if overwrite:
        return old
    if "workdir_format" not in old:
        raise WorkdirError(
            f"workdir {workdir} was written by an older gbjax, whose {CONFIG_NAME} cannot be "
            "checked against this configuration and whose checkpoints carry no checksum. "
            "restore_model() still reads it; to train, use another workdir or pass "
            "overwrite=True (--overwrite) to start over there."
        )
    diffs = differences(old, record)
    if diffs:
        raise _refuse(
            workdir, [f"{k}: {_show(k, a)} in the workdir, {_show(k, b)} now" for k, a, b in diffs]
        )
    return old


# ----------------------------------------------------------------------------
# checkpoints


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    """The step folders in ``workdir/checkpoints`` (complete or not), ascending."""
    root = workdir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def _files_digest(step_dir: pathlib.Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != SUM_NAME)
    for f in files:
        h.update(f"{f.relative_to(step_dir).as_posix()}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def seal(workdir: pathlib.Path, step: int) -> None:
    """Writes the checksum of checkpoint ``step`` (after it was written)."""
    step_dir = workdir / "checkpoints" / str(step)
    rec = {"step": step, "sha256": _files_digest(step_dir)}
    write_atomic(step_dir / SUM_NAME, json.dumps(rec) + "\n")


_NO_SUM = f"it has no {SUM_NAME} (the run was killed while writing it?)"


def verify(workdir: pathlib.Path, step: int) -> str | None:
    """None when checkpoint ``step`` matches its checksum, else what is wrong."""
    step_dir = workdir / "checkpoints" / str(step)
    try:
        want = json.loads((step_dir / SUM_NAME).read_text())["sha256"]
    except FileNotFoundError:
        return _NO_SUM
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {SUM_NAME} is unreadable ({e})"
    got = _files_digest(step_dir)
    if got != want:
        return f"its files fail their sha256 (expected {want[:12]}, got {got[:12]})"
    return None


def verified_step(workdir: str | os.PathLike, step: int | None = None) -> int:
    """The checkpoint step to restore: ``step`` if it verifies, else the latest that
    does (corrupt ones are reported). Checkpoints of older workdirs, which carry no
    checksum, are restored unverified with a warning."""
    workdir = pathlib.Path(workdir)
    legacy = "workdir_format" not in (read_record(workdir) or {})
    steps = checkpoint_steps(workdir)
    if not steps or (step is not None and step not in steps):
        what = "no checkpoint" if step is None else f"no checkpoint at step {step}"
        raise FileNotFoundError(f"{what} in {workdir / 'checkpoints'} (steps there: {steps})")
    bad = []
    for s in [step] if step is not None else reversed(steps):
        why = verify(workdir, s)
        if why is None:
            return s
        if legacy and why == _NO_SUM:
            say(f"checkpoint {s} in {workdir} predates checksums; restoring it unverified")
            return s
        bad.append(f"step {s}: {why}")
        if step is None:
            say(f"checkpoint {s} in {workdir} is corrupt ({why}); trying an earlier one")
    raise CorruptCheckpointError(
        f"no checkpoint in {workdir / 'checkpoints'} verifies: " + "; ".join(bad)
    )


def _move_aside(workdir: pathlib.Path, step: int) -> pathlib.Path:
    dest_root = workdir / CORRUPT_DIR
    dest_root.mkdir(exist_ok=True)
    dest, k = dest_root / str(step), 0
    while dest.exists():
        k += 1
        dest = dest_root / f"{step}-{k}"
    shutil.move(str(workdir / "checkpoints" / str(step)), str(dest))
    return dest


# ----------------------------------------------------------------------------
# the open workdir


def _lock(workdir: pathlib.Path):
    f = open(workdir / LOCK_NAME, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise WorkdirBusyError(
            f"workdir {workdir} is in use by another training run ({holder}; lock "
            f"{workdir / LOCK_NAME}). Two runs writing one workdir would mix their "
            "checkpoints and metrics: wait for that run to end, or use another workdir."
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def _clear(workdir: pathlib.Path) -> None:
    removed = []
    for name in TRAINER_FILES:
        p = workdir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        say(f"overwrite: starting over in {workdir}; removed {', '.join(removed)}")


def clear(workdir: str | os.PathLike) -> None:
    """Starts over in ``workdir``: deletes the trainer's files there
    (:data:`TRAINER_FILES`) under its lock; anything else is kept. Raises
    WorkdirError unless its ``config.json`` is a gbjax record."""
    path = pathlib.Path(workdir)
    if read_record(path) is None:
        raise WorkdirError(f"{path} holds no {CONFIG_NAME}: not a workdir; nothing deleted")
    lock = _lock(path)
    try:
        _clear(path)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


class Workdir:
    """An open, locked workdir; ``with`` (or :meth:`close`) releases the lock.

    ``resume_step``: the latest checkpoint that verified (None: start from scratch).
    """

    def __init__(self, path: pathlib.Path, record: dict, lock, resume_step: int | None):
        self.path, self.record, self._lock, self.resume_step = path, record, lock, resume_step

    def __enter__(self) -> Workdir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def seal(self, step: int) -> None:
        seal(self.path, step)

    def finished_metrics(self, step: int, evaluate) -> dict:
        """Nothing to train (``step`` >= the steps asked for): says so, and returns
        the run's own final metrics (``evaluate() -> {"accuracy", "loss"}`` of the
        checkpoint when the run logged none at that step)."""
        rec = self.record
        say(
            f"{self.path} already holds a checkpoint at step {step}, at or beyond the "
            f"{rec['total_steps']} steps asked for (num_steps={rec.get('num_steps')!r}, "
            f"num_epochs={rec.get('num_epochs')!r}): nothing to train. Returning the model "
            f"of step {step} and its metrics. To train further, raise num_steps/num_epochs "
            "(schedule='constant' only) or start over with overwrite=True (--overwrite)."
        )
        last = None
        path = self.path / METRICS_NAME
        for line in path.read_text().splitlines() if path.exists() else ():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("event") == "summary" and r.get("step") == step:
                last = r
        if last is not None:
            return {k: v for k, v in last.items() if k != "event"}
        ev = evaluate()
        tta = rec.get("eval_tta", "none")
        return {"test_accuracy": ev["accuracy"], "test_loss": ev["loss"], "tta": tta, "step": step}


def open_workdir(workdir: str | os.PathLike, record: dict, *, overwrite: bool = False) -> Workdir:
    """Checks, locks and prepares ``workdir`` for a run of ``record`` (see the module
    docstring). Raises :class:`WorkdirError` (and changes nothing) when it cannot."""
    path = pathlib.Path(workdir)
    old = _check_existing(path, record, overwrite)  # read-only: refusals change nothing
    if old is not None and not overwrite:
        _check_length(path, old, record)
    path.mkdir(parents=True, exist_ok=True)
    lock = _lock(path)
    try:  # again under the lock: a run that held it may have changed the workdir
        old = _check_existing(path, record, overwrite)
        if overwrite and old is not None:
            _clear(path)
            old = None
        step, bad = _check_length(path, old, record)
        for s, why in bad:
            dest = _move_aside(path, s)
            say(f"checkpoint {s} in {path} is corrupt ({why}); moved to {dest}")
            with open(path / METRICS_NAME, "a") as f:
                rec = {"event": "corrupt_checkpoint", "step": s, "moved_to": str(dest)}
                f.write(json.dumps(rec) + "\n")
        if bad:
            say(f"resuming from step {step}" if step is not None else "starting from scratch")
        if old is None:
            write_atomic(path / CONFIG_NAME, json.dumps(record, indent=2) + "\n")
        elif old["total_steps"] != record["total_steps"] and (
            step is None or record["total_steps"] > step
        ):  # a new length that _length_problem allows: remember it
            old = dict(old, **{k: record.get(k) for k in (*LENGTH_FIELDS, "total_steps")})
            write_atomic(path / CONFIG_NAME, json.dumps(old, indent=2) + "\n")
        return Workdir(path, record, lock, step)
    except BaseException:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
        raise


def _check_length(path: pathlib.Path, old: dict | None, record: dict):
    """The latest verified checkpoint and the newer bad ones; raises when ``record``'s
    run length cannot continue ``old``'s checkpoint."""
    step, bad = _latest_verified(path)
    problem = old is not None and _length_problem(old, record, step)
    if problem:
        raise _refuse(path, [problem])
    return step, bad


def _latest_verified(workdir: pathlib.Path) -> tuple[int | None, list[tuple[int, str]]]:
    """(the latest step that verifies, [(newer step, what is wrong), ...])."""
    bad = []
    for s in reversed(checkpoint_steps(workdir)):
        why = verify(workdir, s)
        if why is None:
            return s, bad
        bad.append((s, why))
    return None, bad


def checkpoint_manager(
    workdir: str | os.PathLike, *, max_to_keep: int | None = None, read_only: bool = False
):
    """The one Orbax manager of ``workdir/checkpoints``: synchronous when writing (the
    train step donates, i.e. reuses, the state's buffers), or ``read_only`` to
    restore a run's model. Orbax is imported here, on first use (it is slow to
    import and only training and restoring need it)."""
    import orbax.checkpoint as ocp

    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True)
    else:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
        )
    return ocp.CheckpointManager(
        (pathlib.Path(workdir) / "checkpoints").absolute(), options=options
    )
