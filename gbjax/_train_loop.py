"""The bookkeeping of :func:`gbjax.train.train_and_evaluate`'s loop: when a step
ends with a sync point and what happens there (:class:`Cadence`), compile-free
step timing (:class:`StepTimer`), the logging window's record and reset, the
metrics file (:func:`append_jsonl`), checkpoints and the final summary. Nothing
here knows the model, the data or the optimiser: a train state is a dict with
``step`` and the window's sums ``loss_sum``, ``correct_sum``, ``count``."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp

__all__ = [
    "Cadence",
    "StepTimer",
    "append_jsonl",
    "restore_state",
    "save_checkpoint",
    "window_record",
    "zero_window",
    "bar_postfix",
    "run_summary",
]


@dataclasses.dataclass(frozen=True)
class Cadence:
    """Which steps end with a sync point, and what is done there.

    ``done`` counts the steps taken (1 after the first). A sync point reads the
    loss back (checking it finite) and logs; the last step and every
    ``eval_every_epochs``-th epoch end (0: only the last step) also evaluate;
    every ``checkpoint_every``-th step and the last one also checkpoint; the run
    stops after ``stop_after`` (a testing aid: as if the process were killed).
    """

    steps_per_epoch: int
    total_steps: int
    log_every: int
    eval_every_epochs: int
    checkpoint_every: int
    stop_after: int | None = None

    def evaluate(self, done: int) -> bool:
        if done == self.total_steps:
            return True
        epochs, rest = divmod(done, self.steps_per_epoch)
        return bool(rest == 0 and self.eval_every_epochs and epochs % self.eval_every_epochs == 0)

    def checkpoint(self, done: int) -> bool:
        return done % self.checkpoint_every == 0 or done == self.total_steps

    def stop(self, done: int) -> bool:
        return done == self.stop_after

    def sync(self, done: int) -> bool:
        return (
            done % self.log_every == 0
            or self.evaluate(done)
            or self.checkpoint(done)
            or self.stop(done)
        )


class StepTimer:
    """Compile-free timing of the train steps of one process.

    The process's first step is timed alone, compilation included
    (``compile_time``); the others in windows between sync points, so
    ``train_time`` / ``train_steps`` sum the steps with the compilation and the
    sync points' work (evaluation, checkpointing) left out.
    """

    def __init__(self):
        self.compile_time: float | None = None
        self.train_time, self.train_steps = 0.0, 0
        self._mark: float | None = None
        self._steps = 0

    def run(self, step_fn, *args):
        """``step_fn(*args)``, timed."""
        if self._mark is None:  # first step of this process: compile + run
            t0 = time.perf_counter()
            out = jax.block_until_ready(step_fn(*args))
            self.compile_time = time.perf_counter() - t0
            self.restart()
            return out
        self._steps += 1
        return step_fn(*args)

    def lap(self) -> float | None:
        """At a sync point, once the state was read back: adds the window to the
        totals and returns its mean step time in seconds (None: no step in it)."""
        if not self._steps:
            return None
        dt = time.perf_counter() - self._mark
        self.train_time += dt
        self.train_steps += self._steps
        return dt / self._steps

    def restart(self) -> None:
        """Opens a new window (after a sync point's work)."""
        self._mark, self._steps = time.perf_counter(), 0


def append_jsonl(path: pathlib.Path, record: dict) -> None:
    """Appends ``record`` to the JSON-lines file ``path``."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def restore_state(mngr, step: int | None, init_state: dict) -> dict:
    """The state of checkpoint ``step`` (laid out as ``init_state``), or ``init_state``."""
    import orbax.checkpoint as ocp

    if step is None:
        return init_state
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), init_state
    )
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def window_record(state, done, steps_per_epoch, schedule, timer, batch_size) -> dict:
    """The logging window's record at a sync point (reading the state back ends
    the timer's window)."""
    loss_sum = float(state["loss_sum"])
    dt = timer.lap()
    count = max(float(state["count"]), 1.0)
    rec = {
        "step": done,
        "epoch": done / steps_per_epoch,
        "train_loss": loss_sum / count,
        "train_accuracy": float(state["correct_sum"]) / count,
        "learning_rate": float(schedule(done - 1)),
    }
    if dt is not None:
        rec.update(images_per_sec=batch_size / dt, step_time_ms=1e3 * dt)
    return rec


def zero_window(state: dict, sharding) -> dict:
    """``state`` with the logging window's sums zeroed."""
    zero = lambda: jax.device_put(jnp.zeros((), jnp.float32), sharding)  # noqa: E731
    return dict(state, loss_sum=zero(), correct_sum=zero(), count=zero())


def bar_postfix(rec: dict) -> dict:
    """The progress bar's figures of a logged record."""
    out = dict(
        loss=f"{rec['train_loss']:.4f}",
        acc=f"{rec['train_accuracy']:.3f}",
        img_s=f"{rec.get('images_per_sec', 0):.0f}",
    )
    if "test_accuracy" in rec:
        out["test"] = f"{rec['test_accuracy']:.4f}"
    return out


def save_checkpoint(mngr, wd, done: int, state: dict) -> None:
    """Checkpoint ``done`` and its checksum (verified on resume)."""
    import orbax.checkpoint as ocp

    mngr.save(done, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()
    wd.seal(done)


def run_summary(last: dict, state, timer, batch_size: int, t_start: float) -> dict:
    """The final metrics: the last logged record, the compile-free speed of the
    whole run, its step, compile time and wall time."""
    summary = {k: v for k, v in last.items() if k not in ("epoch", "learning_rate")}
    if timer.train_steps:
        summary["images_per_sec"] = batch_size * timer.train_steps / timer.train_time
        summary["step_time_ms"] = 1e3 * timer.train_time / timer.train_steps
    summary.update(
        step=int(state["step"]),
        compile_time_s=timer.compile_time,
        wall_time_s=time.perf_counter() - t_start,
    )
    return summary
