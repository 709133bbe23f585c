"""Fixed-shape batching: the one helper every batched loop in gbjax uses.

A jitted function compiles once per input shape, so a loop over a data set in
batches of ``B`` must not hand it a smaller last batch. :func:`gbjax.data.fixed_batches`
cuts ``range(N)`` into index arrays of exactly ``B`` entries, the last padded
by repeating index ``N - 1`` (real data, so no NaNs from zeros through a
normalisation or a clustering), and says how many entries are real.
:func:`map_batches` applies a function batch by batch and stitches the real
rows of the results together. Used by GB chunking, evaluation, attacks and
training's evaluations.

Public as :mod:`gbjax.data.batching` (and :func:`gbjax.data.fixed_batches`,
:func:`gbjax.data.map_batches`); kept here, on the ground floor, so that every
layer can batch without importing the data package.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gbjax._checks import check_int

__all__ = ["Batch", "fixed_batches", "take", "map_batches", "bucket_size", "row_bucket_size"]


class Batch(NamedTuple):
    """One batch of :func:`gbjax.data.fixed_batches`."""

    index: np.ndarray  # (B,) int indices into the data, the tail padded with N - 1
    start: int  # first index
    valid: int  # number of real rows (the first `valid` of `index`)

    @property
    def mask(self) -> np.ndarray:
        """``(B,)`` bool, true on real rows."""
        return np.arange(len(self.index)) < self.valid


def bucket_size(n: int, batch_size: int, *, minimum: int = 32, quantum: int | None = None) -> int:
    """A batch size for ``n`` rows from few distinct values.

    Default: ``batch_size``, or the smallest power of two >= ``n`` (at least
    ``minimum``) when that is smaller. With ``quantum``: the size that cuts ``n``
    rows into the fewest batches of at most ``batch_size``, of near-equal size,
    rounded up to a multiple of ``quantum`` (at least ``minimum``, at most
    ``batch_size``): less padding, more distinct sizes.

    For loops over a shrinking set (images still robust, say) that must not
    compile once per set size.

    Example:
      813 rows in batches of at most 250: four of 250 (187 padded rows), or four
      of 208 (19 padded) with ``quantum=16``.

      >>> from gbjax.data.batching import bucket_size
      >>> bucket_size(813, 250), bucket_size(813, 250, quantum=16)
      (250, 208)
      >>> bucket_size(130, 250), bucket_size(130, 250, quantum=16)
      (250, 144)
    """
    n, batch_size = check_int("n", n), check_int("batch_size", batch_size)
    if quantum is None:
        return min(batch_size, max(minimum, 1 << (n - 1).bit_length()))
    quantum = check_int("quantum", quantum)
    batches = -(-n // batch_size)
    per = -(-n // batches)  # rows per batch, the last one padded
    return min(batch_size, max(minimum, -(-per // quantum) * quantum))


# XLA:CPU's time for a batch grows in proportion to its rows, so padding costs its
# share (pow-2 buckets padded 12-38% of the rows of the default main job's cascade
# stages), while a new batch size costs a compilation of a few seconds (a Square chunk
# of airbench94: about 12 s). Accelerators run a padded batch nearly as fast as a full
# one and compile more slowly: they keep pow-2 buckets.
CPU_QUANTUM = 16


def row_bucket_size(n: int, batch_size: int, *, current: int | None = None) -> int:
    """:func:`bucket_size` for the attack loops over still-robust rows: near-equal
    batches in multiples of :data:`CPU_QUANTUM` on CPU, pow-2 buckets elsewhere.

    ``current``: the size a loop over a shrinking set used last; it is kept while it
    gives as many batches as the new size and pads at most a quarter of its rows, so
    that a set losing a few rows at a time does not compile a new size each time.
    """
    if jax.default_backend() == "cpu":
        new = bucket_size(n, batch_size, minimum=CPU_QUANTUM, quantum=CPU_QUANTUM)
    else:
        new = bucket_size(n, batch_size)
    if current is not None and new <= current <= batch_size:
        k = -(-n // current)
        if k == -(-n // new) and 4 * (k * current - n) <= k * current:
            return current
    return new


def fixed_batches(n: int, batch_size: int, *, shrink: bool = True) -> Iterator[Batch]:
    """Batches of ``min(batch_size, n)`` indices covering ``0..n-1`` in order.

    Every batch has the same length; the last one is padded by repeating ``n - 1``.
    ``shrink=False`` keeps ``batch_size`` even when ``n`` is smaller (for a batch
    that must divide evenly over devices).

    Example:
      >>> from gbjax.data import fixed_batches
      >>> [(b.index.tolist(), b.valid) for b in fixed_batches(5, 2)]
      [([0, 1], 2), ([2, 3], 2), ([4, 4], 1)]
    """
    n = check_int("n", n)
    bs = check_int("batch_size", batch_size)
    if shrink:
        bs = min(bs, n)
    for start in range(0, n, bs):
        valid = min(bs, n - start)
        idx = np.minimum(np.arange(start, start + bs), n - 1)
        yield Batch(idx, start, valid)


def take(arrays: Any, batch: Batch) -> Any:
    """The rows of ``batch`` of every leaf of ``arrays`` (numpy stays on the host,
    ``jax.Array`` is gathered on its device; a contiguous full batch is a slice)."""

    def one(a):
        if batch.valid == len(batch.index):
            return a[batch.start : batch.start + batch.valid]
        if isinstance(a, jax.Array):
            return jnp.take(a, jnp.asarray(batch.index), axis=0)
        return np.asarray(a)[batch.index]

    return jax.tree.map(one, arrays)


def map_batches(
    fn: Callable[..., Any],
    arrays: Any,
    *,
    batch_size: int,
    progress: bool = False,
    desc: str | None = None,
    shrink: bool = True,
) -> Any:
    """``fn(batch)`` over fixed-size batches of ``arrays``, results concatenated.

    ``arrays`` is an array or a pytree of arrays sharing the leading axis ``N``;
    ``fn`` receives the same structure with leading axis ``B`` and returns a
    pytree of arrays with leading axis ``B``. The padded rows of the last batch
    are dropped, so the result has leading axis ``N``. Results stay where ``fn``
    put them (device arrays are concatenated on device). ``shrink``: as in
    :func:`gbjax.data.fixed_batches`.

    Example:
      >>> import numpy as np
      >>> from gbjax.data import map_batches
      >>> shapes = []
      >>> def double(x):
      ...     shapes.append(x.shape)  # every call sees the same shape
      ...     return 2 * x
      >>> map_batches(double, np.arange(5), batch_size=2).tolist(), shapes
      ([0, 2, 4, 6, 8], [(2,), (2,), (2,)])
    """
    leaves = jax.tree.leaves(arrays)
    if not leaves:
        raise ValueError("arrays must contain at least one array")
    n = int(np.shape(leaves[0])[0])
    if any(int(np.shape(a)[0]) != n for a in leaves):
        raise ValueError(f"arrays must share the leading axis; got {[np.shape(a) for a in leaves]}")
    if n == 0:
        raise ValueError("arrays are empty")
    batches = list(fixed_batches(n, batch_size, shrink=shrink))
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc=desc or "batches", unit="batch", leave=False)
    outs = []
    for b in it:
        out = fn(take(arrays, b))
        if b.valid < len(b.index):
            out = jax.tree.map(lambda a, v=b.valid: a[:v], out)
        outs.append(out)
    if len(outs) == 1:
        return outs[0]

    def cat(*parts):
        if isinstance(parts[0], jax.Array):
            return jnp.concatenate(parts, axis=0)
        return np.concatenate(parts, axis=0)

    return jax.tree.map(cat, *outs)


class Shrinking:
    """The rows of a batch that an iterative attack still works on, as they fall.

    An evaluation only asks whether each image stays robust, so the rows that have
    fallen need not be computed any more. After each compiled chunk of steps,
    :meth:`keep` says which rows of the current batch to carry on with, in a smaller
    fixed-size batch, or ``None`` to keep the batch as it is: on CPU, where a
    batch's time grows with its rows, the next multiple of :data:`CPU_QUANTUM`
    (a power of two below it) once that is at most three quarters of the current
    size; elsewhere, where a padded batch runs nearly as fast as a full one, the
    next power of two once that is at most half. A new size costs one compilation
    (about a second for a GB model's step on CPU). The batch is padded by repeating
    its last kept row. ``pos`` maps the current batch's rows to the first batch's.

    Example:
      >>> import numpy as np
      >>> from gbjax._batching import Shrinking
      >>> s = Shrinking(64, on_cpu=True)
      >>> alive = np.zeros(64, bool); alive[[3, 9, 40]] = True
      >>> s.keep(alive).tolist(), s.pos.tolist()
      ([3, 9, 40, 40], [3, 9, 40, 40])
      >>> s.keep(np.array([True, True, True, True])) is None
      True
    """

    def __init__(self, batch: int, *, on_cpu: bool | None = None):
        self.pos = np.arange(check_int("batch", batch))
        self.on_cpu = jax.default_backend() == "cpu" if on_cpu is None else bool(on_cpu)

    def size_for(self, alive: int) -> int:
        """The batch size for ``alive`` rows (the current one when not smaller enough)."""
        current = len(self.pos)
        pow2 = 1 << max(alive - 1, 0).bit_length()
        if self.on_cpu:
            new = pow2 if alive < CPU_QUANTUM else -(-alive // CPU_QUANTUM) * CPU_QUANTUM
            return new if 4 * new <= 3 * current else current
        return pow2 if 2 * pow2 <= current else current

    def keep(self, alive: np.ndarray) -> np.ndarray | None:
        """Positions in the current batch of the rows to go on with (padded), or
        ``None``; updates :attr:`pos`. ``alive``: ``(current,)`` bool, at least one."""
        alive = np.asarray(alive, bool)
        if alive.shape != self.pos.shape:
            raise ValueError(f"alive must have shape {self.pos.shape}, got {alive.shape}")
        idx = np.flatnonzero(alive)
        if len(idx) == 0:
            raise ValueError("no row is alive: stop instead of shrinking")
        size = self.size_for(len(idx))
        if size >= len(self.pos):
            return None
        sel = np.concatenate([idx, np.full(size - len(idx), idx[-1])])
        self.pos = self.pos[sel]
        return sel


def take_rows(sel: np.ndarray, *arrays):
    """``a[sel]`` on the device for each array with a leading row axis; arrays of
    rank 0 (one value for every row, a scalar eps) and ``None`` pass unchanged."""
    idx = jnp.asarray(sel)
    return tuple(a if a is None or jnp.ndim(a) == 0 else jnp.take(a, idx, 0) for a in arrays)
