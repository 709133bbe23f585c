"""The compiled granular-ball program behind :mod:`gbjax.gb` (private).

Data types (:class:`Features`, :class:`GBResult`), per-pixel features, and
``cluster_batch``: one ``jax.jit`` program that clusters a batch of images on
fixed-capacity ball arrays and paints them. The algorithm, its choices and its
exactness are described in :mod:`gbjax.gb` and docs/methods.md, section 1.

Why one module of about 750 lines: everything here is traced into a single XLA
program (split rounds, Lloyd steps, working-set compaction, noise painting),
and its pieces share the loop state and the flat ``B * K`` slot layout; split
across modules, every helper would need that layout re-explained. The public
API, validation and chunking stay in :mod:`gbjax.gb`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


@dataclasses.dataclass(frozen=True)
class Features:
    """Which per-pixel features the balls live in, and their weights.

    Attributes:
      color: weight on the colour channels (pixel units 0..255). Must be > 0:
        the painted image is read off the colour part of the centres.
      spatial: weight on the pixel's (row, column) in pixels; 0 disables.
      texture: weight on the local standard deviation of the grey level (mean
        of the channels) in a ``texture_window`` x ``texture_window`` box with
        edge replication; 0 disables.
      texture_window: odd box size for the texture feature.

    Raises:
      ValueError: for a negative or non-finite weight, ``color`` 0, or an even
        ``texture_window``.

    Example:
      >>> from gbjax import Features
      >>> f = Features(spatial=0.5)  # colour and weighted (row, column)
      >>> f.num_features(3)
      5
      >>> f == Features(color=1.0, spatial=0.5) and len({f, Features(spatial=0.5)}) == 1
      True
    """

    color: float = 1.0
    spatial: float = 0.0
    texture: float = 0.0
    texture_window: int = 3

    def __post_init__(self):
        for name in ("color", "spatial", "texture"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"features.{name}: expected a finite number >= 0, got {v!r}")
        if self.color <= 0:
            raise ValueError(f"features.color: expected > 0, got {self.color!r}")
        w = self.texture_window
        if not (isinstance(w, int) and w >= 1 and w % 2 == 1):
            raise ValueError(f"features.texture_window: expected an odd int >= 1, got {w!r}")

    def num_features(self, channels: int) -> int:
        """The feature vector's length F for images of ``channels`` colour channels."""
        return channels + (2 if self.spatial > 0 else 0) + (1 if self.texture > 0 else 0)


class GBResult(NamedTuple):
    """Result of :func:`gb_cluster` (a pytree). Batch-leading when batched.

    Attributes:
      labels: (B, H, W) int32 ball id of every pixel (ids ``0..n_balls-1``).
      centers: (B, K, F) float32 ball centres in feature space (0 for unused slots).
      radii: (B, K) float32 mean member distance to the centre.
      counts: (B, K) int32 members per ball.
      within_fraction: (B, K) float32 fraction of members with distance < threshold.
      n_balls: (B,) int32 number of balls.
      noise: (B, H, W) bool, pixels of balls smaller than ``min_ball_size``.
      image: (B, H, W, C) painted image, same dtype as the input.
      saturated: (B,) bool, true where the capacity stopped at least one split.
      rounds: (B,) int32 split rounds run (including the final round with no split).
    """

    labels: jax.Array
    centers: jax.Array
    radii: jax.Array
    counts: jax.Array
    within_fraction: jax.Array
    n_balls: jax.Array
    noise: jax.Array
    image: jax.Array
    saturated: jax.Array
    rounds: jax.Array


# --------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------


def image_features(image_HWC: ArrayLike, features: Features = Features()) -> jax.Array:
    """Per-pixel feature vectors (H*W, F) of one float image in pixel units.

    Row-major pixels; per pixel the colour times ``features.color``, then (when
    enabled) the row and column times ``features.spatial``, then the local
    contrast times ``features.texture``: the points the balls cluster.

    Example:
      >>> import jax.numpy as jnp
      >>> from gbjax import Features
      >>> from gbjax.gb import image_features
      >>> img = jnp.full((2, 2, 1), 100.0)
      >>> image_features(img, Features(spatial=10.0)).tolist()  # grey, row, column
      [[100.0, 0.0, 0.0], [100.0, 0.0, 10.0], [100.0, 10.0, 0.0], [100.0, 10.0, 10.0]]
    """
    image_HWC = jnp.asarray(image_HWC)
    H, W, C = image_HWC.shape
    x = image_HWC.astype(jnp.float32)
    parts = [x.reshape(H * W, C) * jnp.float32(features.color)]
    if features.spatial > 0:
        rr, cc = jnp.meshgrid(
            jnp.arange(H, dtype=jnp.float32), jnp.arange(W, dtype=jnp.float32), indexing="ij"
        )
        parts.append(jnp.stack([rr, cc], -1).reshape(H * W, 2) * jnp.float32(features.spatial))
    if features.texture > 0:
        grey = jnp.mean(x, axis=-1)
        r = features.texture_window // 2
        g = jnp.pad(grey, r, mode="edge")
        win = (features.texture_window, features.texture_window)
        box = lambda a: (
            jax.lax.reduce_window(a, 0.0, jax.lax.add, win, (1, 1), "VALID")
            / (features.texture_window**2)
        )
        mean = box(g)
        var = jnp.maximum(box(g * g) - mean * mean, 0.0)
        std = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 0.0)
        parts.append(std.reshape(H * W, 1) * jnp.float32(features.texture))
    return jnp.concatenate(parts, axis=-1)


# --------------------------------------------------------------------------
# The batched program
# --------------------------------------------------------------------------
# Balls of all images live in one flat array of B*K slots: image b's ball k is
# slot b*K + k. Segment reductions then run as one 1-D scatter over all pixels
# of the batch, which XLA's CPU backend executes about 3x faster than the
# batched scatter that ``vmap(segment_sum)`` lowers to.  For the early rounds,
# where an image holds only 1-8 balls, dense forms were measured too (one-hot
# einsums: 9-31 ns per pixel per Lloyd step; masked reductions over pixels: 5-15
# ns) and lost to this scatter (3-5 ns) on XLA:CPU.


def segsum(v, seg, k):
    return jax.ops.segment_sum(v, seg, num_segments=k)


def sqdist(x, c):
    # Written out column by column: XLA's CPU backend reduces a minor axis of
    # size 3 about 10x slower than these fused elementwise ops.
    d = x - c
    out = d[..., 0] * d[..., 0]
    for i in range(1, x.shape[-1]):
        out = out + d[..., i] * d[..., i]
    return out


def _sqdist_pairs(xq_BQF, c_BKF):
    """(B, Q, K) squared distances of every query to every centre of its row,
    from exact differences summed left to right (as ``sqdist``): the same
    float32 value whatever the shapes."""
    out = None
    for f in range(xq_BQF.shape[-1]):
        d = xq_BQF[..., :, None, f] - c_BKF[..., None, :, f]
        out = d * d if out is None else out + d * d
    return out


def _argmax_member(score_M, seg_M, S):
    """Per segment, the lowest flat index among members with the largest score."""
    M = score_M.shape[0]
    best = jax.ops.segment_max(score_M, seg_M, num_segments=S)
    idx = jnp.where(score_M == best[seg_M], jnp.arange(M, dtype=jnp.int32), M)
    return jnp.minimum(jax.ops.segment_min(idx, seg_M, num_segments=S), M - 1)


def _means(sums_SF, cnt_S):
    """Row means ``sums / max(cnt, 1)``, correctly rounded.

    Divided column by column on purpose: XLA:CPU rewrites a division by a
    broadcast divisor into a multiplication by its reciprocal, which is off by
    one ulp for most rows (847 / 7 gave 121.00001), enough to flip near-ties
    between distances.
    """
    n = jnp.maximum(cnt_S, 1.0)
    return jnp.stack([sums_SF[..., f] / n for f in range(sums_SF.shape[-1])], axis=-1)


def ball_stats(x_MF, seg_M, S):
    cnt = segsum(jnp.ones_like(seg_M), seg_M, S)
    sums = segsum(x_MF, seg_M, S)
    c = _means(sums, cnt.astype(jnp.float32))
    return cnt, c


def _capacity_choice(cand_BK, frac_BK, cnt_BK, free_B):
    """Chosen splits under the capacity: most impure, then largest, then lowest id."""
    B, K = cand_BK.shape
    n_cand = jnp.sum(cand_BK.astype(jnp.int32), axis=1)
    over = n_cand > free_B

    def rank_rows(cand, frac, cnt, free):
        R = cand.shape[0]
        ids = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), (R, K))
        key = jnp.where(cand, frac, jnp.inf)
        order = jax.vmap(lambda i, c, f: jnp.lexsort((i, -c, f)))(ids, cnt, key)
        rank = jax.vmap(lambda o, i: jnp.zeros(K, jnp.int32).at[o].set(i))(order, ids)
        return cand & (rank < free[:, None])

    def ranked_all(_):
        return rank_rows(cand_BK, frac_BK, cnt_BK, free_B)

    R = max(1, B // _CAPACITY_ROW_FACTOR)

    def ranked_over_rows(_):
        # Only the images over their capacity need the sort (the others keep
        # every candidate), and they are usually few: sort just those rows.
        rows = _kept_indices(over, R)
        r = jnp.minimum(rows, B - 1)
        sub = rank_rows(cand_BK[r], frac_BK[r], cnt_BK[r], free_B[r])
        return cand_BK.at[rows].set(sub, mode="drop")

    def ranked(_):
        if R >= B:
            return ranked_all(None)
        fits = jnp.sum(over.astype(jnp.int32)) <= R
        return jax.lax.cond(fits, ranked_over_rows, ranked_all, None)

    # The sort is only needed where the capacity binds.
    chosen = jax.lax.cond(jnp.any(over), ranked, lambda _: cand_BK, None)
    return chosen, over


_CAPACITY_ROW_FACTOR = 8


# Working sets.  Most of the work in late rounds, and in the late Lloyd steps of
# every round, concerns a small part of the pixels: balls already pure (or
# frozen) never change again, and most 2-means splits converge in a few steps
# while the batch waits for the slowest.  So the pixels still in play are
# compacted (order-preserving, so ties still go to the lowest pixel index and
# every ball's sums add the same members in the same order) into a fixed buffer
# of M/8 slots, and each loop moves to it as soon as what is left fits.  Each
# level is its own ``while_loop`` with static shapes; results are bit-identical
# to running everything on all M pixels.  Measured on 512 CIFAR-10 images (2
# CPU cores, chunks of 128): a third level (M/64) or a factor of 4, 16 or 32
# instead of 8 was no faster, and every level adds compile time (4 levels:
# 2x the compile time of 2).
_LEVEL_FACTOR = 8
_MIN_LEVEL = 16
_MAX_LEVELS = 2


def _level_sizes(M):
    sizes = [M]
    while sizes[-1] // _LEVEL_FACTOR >= _MIN_LEVEL and len(sizes) < _MAX_LEVELS:
        sizes.append(sizes[-1] // _LEVEL_FACTOR)
    return tuple(sizes)


def _ext(a, fill):
    """``a`` with one extra trailing entry (the dummy segment of padded slots)."""
    pad = jnp.full((1,) + a.shape[1:], fill, a.dtype)
    return jnp.concatenate([a, pad], axis=0)


def _kept_indices(keep_Q, size):
    """Indices of the first ``size`` true entries, in order, padded with Q.

    ``jnp.nonzero(keep, size=...)``, but its prefix sum as a log-depth
    associative scan: XLA:CPU runs ``cumsum`` (a reduce-window) about 2.5x slower.
    """
    Q = keep_Q.shape[0]
    pos = jax.lax.associative_scan(jnp.add, keep_Q.astype(jnp.int32)) - 1
    return (
        jnp.full(size, Q, jnp.int32)
        .at[jnp.where(keep_Q, pos, size)]
        .set(jnp.arange(Q, dtype=jnp.int32), mode="drop")
    )


def _compact(keep_Q, size, arrays_fills):
    """The first ``size`` kept entries of each (array, fill) in order; padding gets fill."""
    sel = _kept_indices(keep_Q, size)
    return [a.at[sel].get(mode="fill", fill_value=f) for a, f in arrays_fills]


def _lloyd(x, x1, g, ab, chosen, cnt, *, S1, F, sizes, kmeans_iters):
    """2-means of every chosen ball from seeds ``ab`` (S1, 2, F).

    Returns the final (ab, counts (S1, 2)).

    Ball arrays have S1 = S + 1 rows, the last one the dummy segment of padded
    pixel slots. Per ball: assign each member to the nearer of its two centres
    (ties to A), recompute both means, and stop once the means equal the
    centres that made the assignment (the next assignment would repeat it, so
    the final sides are those of the oracle's "until the assignment repeats"),
    a side is empty, or ``kmeans_iters`` assignments were made. A stopped
    ball keeps the centres that made its last assignment, so recomputing the
    assignment from them gives its final sides.
    """

    def body(xg, x1g, gg, C1):
        def step(st):
            ab, active, cnt2, it, _, cnt = st
            cg = ab[gg]
            side = sqdist(xg, cg[:, 1]) < sqdist(xg, cg[:, 0])
            s2 = segsum(x1g, 2 * gg + side.astype(jnp.int32), 2 * C1).reshape(C1, 2, F + 1)
            it = it + 1
            means = _means(s2[:, :, :F], s2[:, :, F])
            nonempty = jnp.all(s2[:, :, F] > 0, axis=1)
            moved = jnp.any(means != ab, axis=(1, 2))
            cnt2 = jnp.where(active[:, None], s2[:, :, F], cnt2)
            nxt = active & nonempty & moved & (it < kmeans_iters)
            ab = jnp.where(nxt[:, None, None], means, ab)
            return ab, nxt, cnt2, it, jnp.sum(jnp.where(nxt, cnt, 0)), cnt

        return step

    def run(st, xg, x1g, gg, C1, nxt_size):
        return jax.lax.while_loop(
            lambda s: jnp.any(s[1]) & (s[4] > nxt_size), body(xg, x1g, gg, C1), st
        )

    # Level j: the pixels of still-moving balls (level 0: the round's working
    # set) and, where fewer than the slots, those balls renumbered 0..C-1
    # (C <= size / 2: a chosen ball has >= 2 members).
    st = (
        ab,
        chosen,
        jnp.zeros((S1, 2), jnp.float32),
        jnp.int32(0),
        jnp.sum(jnp.where(chosen, cnt, 0)),
    )

    def level(st, xg, x1g, gg, C, nxt_size):
        ab, active, cnt2, it, left = st
        if C == S1 - 1:
            ab, active, cnt2, it, left, _ = run(
                (ab, active, cnt2, it, left, cnt), xg, x1g, gg, S1, nxt_size
            )
            return ab, active, cnt2, it, left
        bsel = jnp.minimum(_kept_indices(active, C), S1 - 1)
        local = jnp.full(S1, C, jnp.int32).at[bsel].set(jnp.arange(C, dtype=jnp.int32))
        local = local.at[S1 - 1].set(C)
        bsel1 = jnp.concatenate([bsel, jnp.array([S1 - 1], jnp.int32)])
        abl, actl, cnt2l, it, left, _ = run(
            (ab[bsel1], active[bsel1], cnt2[bsel1], it, left, cnt[bsel1]),
            xg,
            x1g,
            local[gg],
            C + 1,
            nxt_size,
        )
        ab = ab.at[bsel].set(abl[:C])
        active = active.at[bsel].set(actl[:C]).at[S1 - 1].set(False)
        cnt2 = cnt2.at[bsel].set(cnt2l[:C])
        return ab, active, cnt2, it, left

    xg, x1g, gg = x, x1, g
    for j, size in enumerate(sizes):
        if j > 0:
            xg, x1g, gg = _compact(st[1][gg], size, [(xg, 0.0), (x1g, 0.0), (gg, S1 - 1)])
        nxt_size = sizes[j + 1] if j + 1 < len(sizes) else -1
        C = min(S1 - 1, size // 2)
        C0 = (S1 - 1) // _LLOYD_BALL_FACTOR
        if C == S1 - 1 and C0 >= _LLOYD_MIN_BALLS:
            # Few balls chosen among many slots (late rounds, multiscale passes):
            # renumber them too when they fit, so per-ball work is C0, not S.
            st = jax.lax.cond(
                jnp.sum(st[1].astype(jnp.int32)) <= C0,
                functools.partial(level, xg=xg, x1g=x1g, gg=gg, C=C0, nxt_size=nxt_size),
                functools.partial(level, xg=xg, x1g=x1g, gg=gg, C=C, nxt_size=nxt_size),
                st,
            )
        else:
            st = level(st, xg, x1g, gg, C, nxt_size)
    return st[0], st[2]


_LLOYD_BALL_FACTOR = 8
_LLOYD_MIN_BALLS = 1024


def _early_capacities(K):
    """Ball slots per image of the early stages (each at most K / 2)."""
    return tuple(K // d for d in _EARLY_CAPACITY_DIVISORS if K // d >= 8)


_EARLY_CAPACITY_DIVISORS = (8,)


class _Rounds(NamedTuple):
    """Loop state of the split rounds (one entry per working-set pixel, ball slot or image)."""

    ball: jax.Array  # (M',) ball slot of each pixel in the working set
    open: jax.Array  # (S',) slot may still split (not yet found pure or frozen)
    n_balls: jax.Array  # (B,) balls per image
    saturated: jax.Array  # (B,) the capacity stopped a split
    rounds: jax.Array  # (B,) rounds that split something, plus the final one
    active: jax.Array  # (B,) the last round split something
    round: jax.Array  # () rounds run
    n_open: jax.Array  # () pixels in open balls (the working set still needed)


def _cluster_labels(
    x_BNF, threshold, purity, *, K, max_rounds, kmeans_iters, multilevel, init=None
):
    """Runs the split rounds on a batch; returns (labels_BN, n_balls_B, saturated_B, rounds_B).

    Ball slot k of image b is segment b * Kc + k, Kc the capacity of the
    stage: while every image has at most Ke / 2 balls (Ke = K / 8), rounds run
    with Kc = Ke slots per image (no split can overflow them, and per-ball
    arrays are 8x smaller), then with Kc = K.

    ``init``: None (every image starts as one ball) or ``(labels_BN, n_balls_B)``,
    a partition to continue from (ids ``0..n_balls-1``, at most K), every one of
    its balls open: the rounds then split its impure balls, and their parts,
    exactly as they would have been split in a run from scratch. The early-capacity
    stage runs only when every image's initial ball count fits it (<= Ke / 2).
    """
    B, N, F = x_BNF.shape
    S, M = B * K, B * N
    x = x_BNF.reshape(M, F)
    x1 = jnp.concatenate([x, jnp.ones((M, 1), x.dtype)], axis=1)  # features and a count
    off = jnp.arange(B, dtype=jnp.int32) * K
    t2 = jnp.asarray(threshold, jnp.float32) ** 2
    purity = jnp.asarray(purity, jnp.float32)
    sizes = _level_sizes(M) if multilevel else (M,)

    def split_round(xs, x1s, lloyd_sizes, Kc):
        Sc = B * Kc
        offc = jnp.arange(B, dtype=jnp.int32) * Kc

        def step(st: _Rounds) -> _Rounds:
            gs, open_, n_balls, saturated = st.ball, st.open, st.n_balls, st.saturated
            sums1 = segsum(x1s, gs, Sc + 1)[:Sc]  # integer-valued features: exact sums and counts
            cnt = sums1[:, F].astype(jnp.int32)
            c = _means(sums1[:, :F], sums1[:, F])
            d2 = sqdist(xs, _ext(c, 0.0)[gs])
            within = segsum((d2 < t2).astype(jnp.int32), gs, Sc + 1)[:Sc]
            frac = within.astype(jnp.float32) / jnp.maximum(cnt, 1).astype(jnp.float32)
            cand = open_ & (cnt >= 2) & (frac < purity)
            if Kc < K:  # at most Kc / 2 balls per image: the capacity cannot bind
                chosen = cand
            else:
                chosen, over = _capacity_choice(
                    cand.reshape(B, K), frac.reshape(B, K), cnt.reshape(B, K), K - n_balls
                )
                chosen = chosen.reshape(S)
                saturated = saturated | over

            # Deterministic 2-means seeds: farthest from the centre, then farthest from it.
            a = xs[_argmax_member(d2, gs, Sc + 1)]
            b = xs[_argmax_member(sqdist(xs, a[gs]), gs, Sc + 1)]
            ab, cnt2 = _lloyd(
                xs,
                x1s,
                gs,
                jnp.stack([a, b], 1),
                _ext(chosen, False),
                _ext(cnt, 0),
                S1=Sc + 1,
                F=F,
                sizes=lloyd_sizes,
                kmeans_iters=kmeans_iters,
            )
            cg = ab[gs]
            side = sqdist(xs, cg[:, 1]) < sqdist(xs, cg[:, 0])

            ok = chosen & jnp.all(cnt2[:Sc] > 0, axis=1)
            okBK = ok.reshape(B, Kc)
            new_slot = (
                offc[:, None] + n_balls[:, None] + jnp.cumsum(okBK.astype(jnp.int32), 1) - 1
            ).reshape(Sc)
            moved = _ext(ok, False)[gs] & side
            gs = jnp.where(moved, _ext(new_slot, 0)[gs], gs)
            n_split = jnp.sum(okBK.astype(jnp.int32), axis=1)
            still = (open_ & cand & ~chosen) | ok  # frozen and pure balls are done
            opened = jnp.zeros(Sc, bool).at[jnp.where(ok, new_slot, Sc)].set(True, mode="drop")
            n_open = jnp.sum(jnp.where(still, cnt, 0))
            return _Rounds(
                ball=gs,
                open=still | opened,
                n_balls=n_balls + n_split,
                saturated=saturated,
                rounds=st.rounds + st.active.astype(jnp.int32),
                active=n_split > 0,
                round=st.round + 1,
                n_open=n_open,
            )

        return step

    def going(st: _Rounds, n):
        return jnp.any(st.active) & (st.round < max_rounds) & (st.n_open > n)

    caps = (_early_capacities(K) if multilevel else ()) + (K,)
    n1 = sizes[1] if len(sizes) > 1 else -1

    def relayout(st: _Rounds, Ka, Kb) -> _Rounds:
        """Ball slots from Ka to Kb per image (Kb < Ka: every used slot must be < Kb)."""
        o = st.open.reshape(B, Ka)
        o = jnp.pad(o, ((0, 0), (0, Kb - Ka))) if Kb > Ka else o[:, :Kb]
        return st._replace(ball=(st.ball // Ka) * Kb + st.ball % Ka, open=o.reshape(B * Kb))

    def early_stage(st: _Rounds) -> _Rounds:  # from and to the K layout
        Kc = caps[0]
        st = relayout(st, K, Kc)
        for Kn in caps[1:]:
            st = jax.lax.while_loop(
                lambda s, Kc=Kc: going(s, n1) & (jnp.max(s.n_balls) <= Kc // 2),
                split_round(x, x1, sizes, Kc),
                st,
            )
            st = relayout(st, Kc, Kn)
            Kc = Kn
        return st

    if init is None:
        labels0, n0 = jnp.zeros((B, N), jnp.int32), jnp.ones(B, jnp.int32)
    else:
        labels0, n0 = (jnp.asarray(a, jnp.int32) for a in init)
    state = _Rounds(
        ball=(labels0 + off[:, None]).reshape(M),
        open=(jnp.arange(K, dtype=jnp.int32)[None, :] < n0[:, None]).reshape(S),
        n_balls=n0,
        saturated=jnp.zeros(B, bool),
        rounds=jnp.zeros(B, jnp.int32),
        active=jnp.ones(B, bool),
        round=jnp.int32(0),
        n_open=jnp.int32(M),
    )
    if len(caps) > 1:
        if init is None:
            state = early_stage(state)
        else:
            fits = jnp.max(n0) <= caps[0] // 2
            state = jax.lax.cond(fits, early_stage, lambda st: st, state)

    g_full = state.ball
    pix, xs, x1s = jnp.arange(M, dtype=jnp.int32), x, x1
    for r, size in enumerate(sizes):
        if r > 0:
            g_full = g_full.at[pix].set(state.ball, mode="drop")
            keep = _ext(state.open, False)[state.ball]
            pix, xs, x1s, gs = _compact(
                keep, size, [(pix, M), (xs, 0.0), (x1s, 0.0), (state.ball, S)]
            )
            state = state._replace(ball=gs)
        nxt_size = sizes[r + 1] if r + 1 < len(sizes) else -1
        state = jax.lax.while_loop(
            lambda st, n=nxt_size: going(st, n), split_round(xs, x1s, sizes[r:], K), state
        )
    g_full = g_full.at[pix].set(state.ball, mode="drop")
    labels = (g_full - jnp.repeat(off, N)).reshape(B, N)
    return labels, state.n_balls, state.saturated, state.rounds


def _nearest_kept(x_BNF, c_BKF, kept_BK, noise_BN):
    """Index of the nearest kept centre for every noise pixel (B, N); other pixels: unspecified.

    Noise pixels are few, so they are first compacted, batch-wide, into M/1024
    or else M/64 slots (M = B * N), and only those are compared with their
    image's K centres; failing that, per image into N/8 slots; failing that,
    all pixels are compared.

    Every path computes the same squared distances, from exact differences
    (``_sqdist_pairs``), and takes the lowest id on ties, so the choice does not
    depend on which path the batch takes. (The expansion ``|c|^2 - 2 x.c``, used
    before, is cancellation-prone and was computed by differently shaped matrix
    products on each path: a CIFAR-10 noise pixel whose two nearest kept centres
    lie at squared distances 233.22221 and 233.22229 took the farther one in a
    batch and the nearer one alone.)
    """
    B, N, F = x_BNF.shape
    M = B * N

    def nearest(xq_BQF):
        dd = _sqdist_pairs(xq_BQF, c_BKF)
        return jnp.argmin(jnp.where(kept_BK[:, None, :], dd, jnp.inf), axis=-1).astype(jnp.int32)

    def per_image(_):
        Q = max(1, N // 8)
        if Q >= N:
            return nearest(x_BNF)

        def compact(_):
            idx_BQ = jax.vmap(lambda m: jnp.nonzero(m, size=Q, fill_value=N)[0])(noise_BN)
            xq = jnp.take_along_axis(x_BNF, jnp.minimum(idx_BQ, N - 1)[..., None], axis=1)
            out = jnp.zeros((B, N + 1), jnp.int32)
            out = jax.vmap(lambda o, i, v: o.at[i].set(v))(out, idx_BQ, nearest(xq))
            return out[:, :N]

        fits = jnp.all(jnp.sum(noise_BN.astype(jnp.int32), axis=1) <= Q)
        return jax.lax.cond(fits, compact, lambda _: nearest(x_BNF), None)

    def global_(G):
        def run(_):
            idx = _kept_indices(noise_BN.reshape(M), G)
            src = jnp.minimum(idx, M - 1)
            b = src // N
            xq = x_BNF.reshape(M, F)[src]
            dd = _sqdist_pairs(xq[:, None, :], c_BKF[b])[:, 0]
            near = jnp.argmin(jnp.where(kept_BK[b], dd, jnp.inf), axis=-1).astype(jnp.int32)
            return jnp.zeros(M + 1, jnp.int32).at[idx].set(near)[:M].reshape(B, N)

        return run

    n_noise = jnp.sum(noise_BN.astype(jnp.int32))

    def fallback(G, els):
        return lambda _: jax.lax.cond(n_noise <= G, global_(G), els, None)

    out = per_image
    for G in sorted({g for g in (M // 64, M // 1024) if g >= 1}, reverse=True):
        out = fallback(G, out)  # the smallest buffer is tried first
    return out(None)


def painted_image(colour, out_dtype, scale):
    """Painted colours (pixel units) as the input's dtype: rounded and clipped for
    integers, divided by ``scale`` for floats. Shared by both engines."""
    if jnp.issubdtype(out_dtype, jnp.integer):
        info = jnp.iinfo(out_dtype)
        return jnp.clip(jnp.round(colour), info.min, info.max).astype(out_dtype)
    return (colour / scale).astype(out_dtype)


def _paint(
    x_BNF,
    labels,
    n_balls,
    saturated,
    rounds,
    threshold,
    scale,
    *,
    C,
    K,
    min_ball_size,
    features,
    out_dtype,
):
    """Final statistics of a partition, noise and the painted image: a GBResult.

    Differentiable in the pixel values through ``x_BNF`` (for end-to-end attacks).
    """
    B, N, F = x_BNF.shape
    S = B * K
    x = x_BNF.reshape(B * N, F)
    g = (labels + (jnp.arange(B, dtype=jnp.int32) * K)[:, None]).reshape(-1)
    cnt, c = ball_stats(x, g, S)
    d2 = sqdist(x, c[g])
    safe = d2 > 0
    dist = jnp.where(safe, jnp.sqrt(jnp.where(safe, d2, 1.0)), 0.0)
    cntf = jnp.maximum(cnt, 1).astype(jnp.float32)
    radii = segsum(dist, g, S) / cntf
    within = (
        segsum((d2 < jnp.asarray(threshold, jnp.float32) ** 2).astype(jnp.float32), g, S) / cntf
    )

    kept = (cnt >= min_ball_size).reshape(B, K)
    noise = ~kept.reshape(-1)[g]
    paint = g
    if min_ball_size > 1:
        nearest = _nearest_kept(
            jax.lax.stop_gradient(x_BNF),
            jax.lax.stop_gradient(c).reshape(B, K, F),
            kept,
            noise.reshape(B, N),
        )
        nearest = (nearest + (jnp.arange(B, dtype=jnp.int32) * K)[:, None]).reshape(-1)
        any_kept = jnp.repeat(jnp.any(kept, axis=1), N)
        paint = jnp.where(noise & any_kept, nearest, g)

    colour = c[paint][:, :C] / jnp.float32(features.color)
    img = painted_image(colour, out_dtype, scale)
    return GBResult(
        labels=labels,
        centers=(c * (cnt > 0)[:, None]).reshape(B, K, F),
        radii=radii.reshape(B, K),
        counts=cnt.reshape(B, K),
        within_fraction=within.reshape(B, K),
        n_balls=n_balls,
        noise=noise.reshape(B, N),
        image=img.reshape(B, N, C),
        saturated=saturated,
        rounds=rounds,
    )


def _features_BNF(images_BHWC, scale, features):
    return jax.vmap(lambda im: image_features(im, features))(
        images_BHWC.astype(jnp.float32) * scale
    )


def _unflatten(res: GBResult, H, W) -> GBResult:
    """Per-pixel fields from (..., N[, C]) to (..., H, W[, C])."""

    def pix(a, tail):
        return a.reshape(a.shape[: a.ndim - 1 - tail] + (H, W) + a.shape[a.ndim - tail :])

    return res._replace(labels=pix(res.labels, 0), noise=pix(res.noise, 0), image=pix(res.image, 1))


_STATIC = (
    "K",
    "max_rounds",
    "kmeans_iters",
    "min_ball_size",
    "features",
    "out_dtype",
    "multilevel",
    "engine",
)


def _cluster_and_paint(
    x_BNF, x_stop, threshold, purity, scale, init, *, C, K, max_rounds, kmeans_iters,
    min_ball_size, features, out_dtype, multilevel,
):  # fmt: skip
    """One threshold: split rounds on ``x_stop`` (the partition is piecewise constant in
    the input, so no gradient flows through it; from ``init`` when given), then paint."""
    labels, n_balls, saturated, rounds = _cluster_labels(
        x_stop, threshold, purity, K=K, max_rounds=max_rounds, kmeans_iters=kmeans_iters,
        multilevel=multilevel, init=init,
    )  # fmt: skip
    res = _paint(
        x_BNF, labels, n_balls, saturated, rounds, threshold, scale, C=C, K=K,
        min_ball_size=min_ball_size, features=features, out_dtype=out_dtype,
    )  # fmt: skip
    return (labels, n_balls), res


@functools.partial(jax.jit, static_argnames=_STATIC)
def cluster_batch(
    images_BHWC,
    threshold,
    purity,
    scale,
    *,
    K,
    max_rounds,
    kmeans_iters,
    min_ball_size,
    features,
    out_dtype,
    multilevel,
    engine="xla",
):
    """The compiled program: a batch of images in input units -> GBResult.

    ``multilevel``: use the working-set levels and the early-capacity stage
    (``gbjax.gb`` chooses by the number of pixels; both give the same output).
    ``engine``: ``"xla"``, this module's program, or ``"numba"``, the per-image
    CPU kernel of :mod:`gbjax._gb_cpu` called back from the program (identical
    output; the features and the painting stay in the program).
    """
    B, H, W, C = images_BHWC.shape
    x_BNF = _features_BNF(images_BHWC, scale, features)
    if engine == "numba":
        from gbjax import _gb_cpu

        res = _gb_cpu.cluster_and_paint(
            x_BNF, jnp.reshape(threshold, (1,)), purity, scale, C=C, K=K,
            max_rounds=max_rounds, kmeans_iters=kmeans_iters, min_ball_size=min_ball_size,
            features=features, out_dtype=out_dtype,
        )  # fmt: skip
        return _unflatten(jax.tree_util.tree_map(lambda a: a[:, 0], res), H, W)
    _, res = _cluster_and_paint(
        x_BNF, jax.lax.stop_gradient(x_BNF), threshold, purity, scale, None, C=C, K=K,
        max_rounds=max_rounds, kmeans_iters=kmeans_iters, min_ball_size=min_ball_size,
        features=features, out_dtype=out_dtype, multilevel=multilevel,
    )  # fmt: skip
    return _unflatten(res, H, W)


@functools.partial(jax.jit, static_argnames=_STATIC)
def multiscale_batch(
    images_BHWC,
    thresholds_T,
    purity,
    scale,
    *,
    K,
    max_rounds,
    kmeans_iters,
    min_ball_size,
    features,
    out_dtype,
    multilevel,
    engine="xla",
):
    """Every threshold of ``thresholds_T`` (non-increasing) in one pass: GBResult (B, T, ...).

    A ``lax.scan`` over the thresholds: the split rounds at each threshold
    continue from the partition of the one before (``_cluster_labels``'s
    ``init``), which they refine, since a ball impure at a threshold is impure at
    every smaller one and a split depends only on the ball's members. One loop
    body, so one compilation for every number of thresholds' worth of work.
    """
    B, H, W, C = images_BHWC.shape
    N = H * W
    x_BNF = _features_BNF(images_BHWC, scale, features)
    if engine == "numba":  # the kernel continues from threshold to threshold itself
        from gbjax import _gb_cpu

        res = _gb_cpu.cluster_and_paint(
            x_BNF, thresholds_T, purity, scale, C=C, K=K, max_rounds=max_rounds,
            kmeans_iters=kmeans_iters, min_ball_size=min_ball_size, features=features,
            out_dtype=out_dtype,
        )  # fmt: skip
        return _unflatten(res, H, W)
    x_stop = jax.lax.stop_gradient(x_BNF)

    def scale_step(carry, threshold):
        return _cluster_and_paint(
            x_BNF, x_stop, threshold, purity, scale, carry, C=C, K=K, max_rounds=max_rounds,
            kmeans_iters=kmeans_iters, min_ball_size=min_ball_size, features=features,
            out_dtype=out_dtype, multilevel=multilevel,
        )  # fmt: skip

    init = (jnp.zeros((B, N), jnp.int32), jnp.ones(B, jnp.int32))
    _, res = jax.lax.scan(scale_step, init, jnp.asarray(thresholds_T, jnp.float32))
    res = jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, 0, 1), res)  # batch-leading
    return _unflatten(res, H, W)
