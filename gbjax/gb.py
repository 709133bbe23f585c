"""Granular-ball (GB) multi-scale clustering of image pixels, vectorised.

Algorithm 1 of the granular-ball paper (see ``METHODS.md`` section 1), run on
fixed-capacity ball arrays so that clustering a whole batch is one compiled
program:

* every pixel is a feature vector (its colour by default; optionally its
  weighted coordinates and a weighted local-contrast "texture" value);
* all pixels start in ball 0; in each round, every ball whose fraction of
  members strictly within ``threshold`` of its centre (Euclidean distance in
  feature space, the paper's Definition 2) is below ``purity`` is split by
  2-means, all such balls at once;
* rounds go on until no ball splits (the paper's stopping rule), the capacity
  ``K`` is full, or ``max_rounds`` is reached;
* every pixel is painted with its ball's centre; pixels of balls with fewer than
  ``min_ball_size`` members are *noise* and are painted with the centre of the
  nearest kept ball in feature space.

Choices the paper leaves open, each a parameter here:

* **distance**: Euclidean in feature space; a member is *within* when
  ``distance < threshold`` (strict, as in the paper's Definition 2).
* **purity test**: a ball is kept when ``within_fraction >= purity``.
* **2-means initialisation** (deterministic): seed A is the member farthest
  from the ball's centre, seed B the member farthest from seed A (lowest pixel
  index on ties; raster order). Lloyd iterations then alternate assignment (to
  the nearer seed, ties to A) and mean update, until the assignment stops
  changing or ``kmeans_iters`` assignments were made. Side A keeps the parent's
  id, side B gets the next free id (parents in id order), so ids are
  deterministic.
* **capacity**: when more balls want to split than free slots remain, the most
  impure balls split first (lowest ``within_fraction``), then the largest, then
  the lowest id; ``saturated`` is set.
* **feature scaling**: colour in pixel units (0..255) times ``color``; pixel
  coordinates (row, column, in pixels) times ``spatial``; local standard
  deviation of the grey level in a ``texture_window`` box, times ``texture``.
* **noise**: balls with fewer than ``min_ball_size`` members; their pixels are
  painted with the nearest kept centre (or their own ball's centre when no ball
  is kept).

Exactness: with colour-only features and integer pixel values, per-ball sums
and counts are exact in float32 while they stay below 2**24 (any image up to
65,793 pixels), and centres are divided out column by column so that they are
the correctly rounded member means; the partition then matches a float32
reference implementation of Algorithm 1 (the tests' numpy oracle), ball ids
included. The one caveat: a squared distance that ties the threshold, or two
centres, to within float32 rounding may resolve differently, because XLA fuses
multiply-adds (FMA) where numpy does not. Measured: 256 random CIFAR-10 test
images at thresholds 40, 20 and 10 all match the oracle exactly (768 of 768).

Speed: most late work concerns few pixels (pure balls never change again;
most 2-means splits converge in a few steps while the batch waits for the
slowest), and the first rounds use few balls. So the pixels still in play are
compacted into smaller fixed buffers as they thin out, and the first rounds run
with K / 8 ball slots per image (see ``_cluster_labels``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Features",
    "GBResult",
    "gb_cluster",
    "gb_denoise",
    "gb_multiscale",
    "image_features",
    "memory_estimate",
]


# Bumped whenever the engine's output for the same input and parameters
# changes, so that on-disk caches of GB-processed data sets (gbjax.train) miss.
# 2: centres are correctly rounded means (they were off by an ulp on XLA:CPU).
OUTPUT_VERSION = 2


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

    labels: Any
    centers: Any
    radii: Any
    counts: Any
    within_fraction: Any
    n_balls: Any
    noise: Any
    image: Any
    saturated: Any
    rounds: Any


# --------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------


def image_features(image_HWC: jax.Array, features: Features = Features()) -> jax.Array:
    """Per-pixel feature vectors (H*W, F) of one float image in pixel units."""
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


def _segsum(v, seg, k):
    return jax.ops.segment_sum(v, seg, num_segments=k)


def _sqdist(x, c):
    # Written out column by column: XLA's CPU backend reduces a minor axis of
    # size 3 about 10x slower than these fused elementwise ops.
    d = x - c
    out = d[..., 0] * d[..., 0]
    for i in range(1, x.shape[-1]):
        out = out + d[..., i] * d[..., i]
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


def _ball_stats(x_MF, seg_M, S):
    cnt = _segsum(jnp.ones_like(seg_M), seg_M, S)
    sums = _segsum(x_MF, seg_M, S)
    c = _means(sums, cnt.astype(jnp.float32))
    return cnt, c


def _capacity_choice(cand_BK, frac_BK, cnt_BK, free_B):
    """Chosen splits under the capacity: most impure, then largest, then lowest id."""
    B, K = cand_BK.shape
    n_cand = jnp.sum(cand_BK.astype(jnp.int32), axis=1)
    over = n_cand > free_B

    def ranked(_):
        ids = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), (B, K))
        key = jnp.where(cand_BK, frac_BK, jnp.inf)
        order = jax.vmap(lambda i, c, f: jnp.lexsort((i, -c, f)))(ids, cnt_BK, key)
        rank = jax.vmap(lambda o, i: jnp.zeros(K, jnp.int32).at[o].set(i))(order, ids)
        return cand_BK & (rank < free_B[:, None])

    # The sort is only needed where the capacity binds.
    chosen = jax.lax.cond(jnp.any(over), ranked, lambda _: cand_BK, None)
    return chosen, over


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
    """2-means of every chosen ball from seeds ``ab`` (S1, 2, F); returns final (ab, counts (S1, 2)).

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
            side = _sqdist(xg, cg[:, 1]) < _sqdist(xg, cg[:, 0])
            s2 = _segsum(x1g, 2 * gg + side.astype(jnp.int32), 2 * C1).reshape(C1, 2, F + 1)
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
    xg, x1g, gg = x, x1, g
    for j, size in enumerate(sizes):
        ab, active, cnt2, it, left = st
        if j > 0:
            xg, x1g, gg = _compact(active[gg], size, [(xg, 0.0), (x1g, 0.0), (gg, S1 - 1)])
        nxt_size = sizes[j + 1] if j + 1 < len(sizes) else -1
        C = min(S1 - 1, size // 2)
        if C == S1 - 1:
            ab, active, cnt2, it, left, _ = run(
                (ab, active, cnt2, it, left, cnt), xg, x1g, gg, S1, nxt_size
            )
        else:
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
        st = (ab, active, cnt2, it, left)
    return st[0], st[2]


def _early_capacities(K):
    """Ball slots per image of the early stages (each at most K / 2)."""
    return tuple(K // d for d in _EARLY_CAPACITY_DIVISORS if K // d >= 8)


_EARLY_CAPACITY_DIVISORS = (8,)


def _cluster_labels(x_BNF, threshold, purity, *, K, max_rounds, kmeans_iters, multilevel):
    """Runs the split rounds on a batch; returns (labels_BN, n_balls_B, saturated_B, rounds_B).

    Ball slot k of image b is segment b * Kc + k, Kc the capacity of the
    stage: while every image has at most Ke / 2 balls (Ke = K / 8), rounds run
    with Kc = Ke slots per image (no split can overflow them, and per-ball
    arrays are 8x smaller), then with Kc = K.
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

        def step(state):
            gs, open_, n_balls, saturated, rounds, active, rnd, _ = state
            sums1 = _segsum(x1s, gs, Sc + 1)[:Sc]  # integer-valued features: exact sums and counts
            cnt = sums1[:, F].astype(jnp.int32)
            c = _means(sums1[:, :F], sums1[:, F])
            d2 = _sqdist(xs, _ext(c, 0.0)[gs])
            within = _segsum((d2 < t2).astype(jnp.int32), gs, Sc + 1)[:Sc]
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
            b = xs[_argmax_member(_sqdist(xs, a[gs]), gs, Sc + 1)]
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
            side = _sqdist(xs, cg[:, 1]) < _sqdist(xs, cg[:, 0])

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
            rounds = rounds + active.astype(jnp.int32)
            return (
                gs,
                still | opened,
                n_balls + n_split,
                saturated,
                rounds,
                n_split > 0,
                rnd + 1,
                n_open,
            )

        return step

    def going(s, n):
        return jnp.any(s[5]) & (s[6] < max_rounds) & (s[7] > n)

    state = (
        None,
        None,
        jnp.ones(B, jnp.int32),
        jnp.zeros(B, bool),
        jnp.zeros(B, jnp.int32),
        jnp.ones(B, bool),
        jnp.int32(0),
        jnp.int32(M),
    )
    caps = (_early_capacities(K) if multilevel else ()) + (K,)
    n1 = sizes[1] if len(sizes) > 1 else -1
    Kc = caps[0]
    offc = jnp.arange(B, dtype=jnp.int32) * Kc
    state = (jnp.repeat(offc, N), jnp.zeros(B * Kc, bool).at[offc].set(True)) + state[2:]
    for Kn in caps[1:]:
        state = jax.lax.while_loop(
            lambda s, Kc=Kc: going(s, n1) & (jnp.max(s[2]) <= Kc // 2),
            split_round(x, x1, sizes, Kc),
            state,
        )
        gs, open_ = state[0], state[1]
        gs = (gs // Kc) * Kn + gs % Kc
        open_ = jnp.pad(open_.reshape(B, Kc), ((0, 0), (0, Kn - Kc))).reshape(B * Kn)
        state = (gs, open_) + state[2:]
        Kc = Kn

    g_full = state[0]
    pix, xs, x1s = jnp.arange(M, dtype=jnp.int32), x, x1
    for r, size in enumerate(sizes):
        if r > 0:
            g_full = g_full.at[pix].set(state[0], mode="drop")
            keep = _ext(state[1], False)[state[0]]
            pix, xs, x1s, gs = _compact(
                keep, size, [(pix, M), (xs, 0.0), (x1s, 0.0), (state[0], S)]
            )
            state = (gs,) + state[1:]
        nxt_size = sizes[r + 1] if r + 1 < len(sizes) else -1
        state = jax.lax.while_loop(
            lambda s, n=nxt_size: going(s, n), split_round(xs, x1s, sizes[r:], K), state
        )
    g_full = g_full.at[pix].set(state[0], mode="drop")
    _, _, n_balls, saturated, rounds, _, _, _ = state
    return (g_full - jnp.repeat(off, N)).reshape(B, N), n_balls, saturated, rounds


def _nearest_kept(x_BNF, c_BKF, kept_BK, noise_BN):
    """Index of the nearest kept centre for every noise pixel (B, N); other pixels: unspecified.

    Noise pixels are few, so they are first compacted, batch-wide, into M/1024
    or else M/64 slots (M = B * N), and only those are compared with their
    image's K centres; failing that, per image into N/8 slots; failing that,
    all pixels are compared.
    """
    B, N, F = x_BNF.shape
    M = B * N
    csq = jnp.sum(c_BKF * c_BKF, -1)

    def nearest(xq_BQF):
        dd = csq[:, None, :] - 2.0 * jnp.einsum("bqf,bkf->bqk", xq_BQF, c_BKF)
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
            dd = csq[b] - 2.0 * jnp.einsum("qf,qkf->qk", xq, c_BKF[b])
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


# Below this many pixels per compiled call (64 CIFAR-10 images), the
# working-set levels and the early-capacity stage are left out: they save
# little on small batches, where the batch waits less for its slowest image,
# and their loops nearly double the compile time (128 images of 32x32x3: 5.7 s
# against 3.3 s on the 2-core development machine), which attacks on small
# batches pay for every attack program they compile.
_MULTILEVEL_MIN_PIXELS = 65536


def _multilevel(pixels: int) -> bool:
    return pixels >= _MULTILEVEL_MIN_PIXELS


@functools.partial(
    jax.jit,
    static_argnames=(
        "K",
        "max_rounds",
        "kmeans_iters",
        "min_ball_size",
        "features",
        "out_dtype",
        "multilevel",
    ),
)
def _cluster_batch(
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
    multilevel=None,
):
    """The compiled program: a batch of images in input units -> GBResult."""
    B, H, W, C = images_BHWC.shape
    N = H * W
    x_BNF = jax.vmap(lambda im: image_features(im, features))(
        images_BHWC.astype(jnp.float32) * scale
    )
    F = x_BNF.shape[-1]
    if multilevel is None:
        multilevel = _multilevel(B * N)
    # The partition is piecewise constant in the input: no gradient through it.
    labels, n_balls, saturated, rounds = _cluster_labels(
        jax.lax.stop_gradient(x_BNF),
        threshold,
        purity,
        K=K,
        max_rounds=max_rounds,
        kmeans_iters=kmeans_iters,
        multilevel=multilevel,
    )

    # Final statistics, differentiable in the pixel values (for end-to-end attacks).
    S = B * K
    x = x_BNF.reshape(B * N, F)
    g = (labels + (jnp.arange(B, dtype=jnp.int32) * K)[:, None]).reshape(-1)
    cnt, c = _ball_stats(x, g, S)
    d2 = _sqdist(x, c[g])
    safe = d2 > 0
    dist = jnp.where(safe, jnp.sqrt(jnp.where(safe, d2, 1.0)), 0.0)
    cntf = jnp.maximum(cnt, 1).astype(jnp.float32)
    radii = _segsum(dist, g, S) / cntf
    within = (
        _segsum((d2 < jnp.asarray(threshold, jnp.float32) ** 2).astype(jnp.float32), g, S) / cntf
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
    if jnp.issubdtype(out_dtype, jnp.integer):
        info = jnp.iinfo(out_dtype)
        img = jnp.clip(jnp.round(colour), info.min, info.max).astype(out_dtype)
    else:
        img = (colour / scale).astype(out_dtype)
    return GBResult(
        labels=labels.reshape(B, H, W),
        centers=(c * (cnt > 0)[:, None]).reshape(B, K, F),
        radii=radii.reshape(B, K),
        counts=cnt.reshape(B, K),
        within_fraction=within.reshape(B, K),
        n_balls=n_balls,
        noise=noise.reshape(B, H, W),
        image=img.reshape(B, H, W, C),
        saturated=saturated,
        rounds=rounds,
    )


# --------------------------------------------------------------------------
# Validation and the public API
# --------------------------------------------------------------------------


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_positive_int(name, v, minimum=1):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v!r}")
    return int(v)


def _validate(
    images, threshold, purity, capacity, min_ball_size, max_rounds, kmeans_iters, features, scale
):
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        images = np.asarray(images)
    if images.ndim not in (3, 4):
        raise ValueError(f"images: expected shape (H, W, C) or (B, H, W, C), got {images.shape}")
    if images.shape[-1] not in (1, 3):
        raise ValueError(f"images: expected 1 or 3 channels (last axis), got shape {images.shape}")
    if any(s == 0 for s in images.shape):
        raise ValueError(f"images: empty image or batch, got shape {images.shape}")
    dt = np.dtype(images.dtype)
    if dt == np.bool_ or not (np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating)):
        raise ValueError(f"images: expected an integer (uint8) or float dtype, got {dt}")
    if not (
        isinstance(threshold, (int, float, np.number))
        and math.isfinite(threshold)
        and threshold > 0
    ):
        raise ValueError(
            f"threshold: expected a finite number > 0 (pixel units), got {threshold!r}"
        )
    if not (isinstance(purity, (int, float, np.number)) and 0 < purity <= 1):
        raise ValueError(f"purity: expected a number in (0, 1], got {purity!r}")
    _check_positive_int("capacity", capacity)
    _check_positive_int("min_ball_size", min_ball_size)
    if max_rounds is not None:
        _check_positive_int("max_rounds", max_rounds)
    _check_positive_int("kmeans_iters", kmeans_iters)
    if features is None:
        features = Features()
    elif isinstance(features, dict):
        features = Features(**features)
    elif not isinstance(features, Features):
        raise ValueError(f"features: expected a gbjax.Features, a dict or None, got {features!r}")
    if scale is not None:
        if not (isinstance(scale, (int, float, np.number)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale: expected a finite number > 0, got {scale!r}")
        if np.issubdtype(dt, np.integer):
            raise ValueError(
                "scale: only for float images (integer images are in pixel units 0..255)"
            )
    if not _is_traced(images):
        a = np.asarray(images)
        if np.issubdtype(dt, np.floating):
            if not np.all(np.isfinite(a)):
                raise ValueError("images: contains NaN or inf")
        lo, hi = a.min(), a.max()
        s = 1.0 if scale is None else float(scale)
        if lo < 0:
            raise ValueError(f"images: expected values >= 0 (pixel units 0..255), got min {lo}")
        if hi * s > 255.0 + 1e-3:
            raise ValueError(
                f"images: expected values in pixel units 0..255, got max {hi}"
                + ("" if scale is None else f" (x scale {scale} = {hi * s})")
            )
        if scale is None and np.issubdtype(dt, np.floating) and 0 < hi <= 1.0:
            raise ValueError(
                "images: float values all in [0, 1] look like images scaled to [0, 1], but "
                "thresholds are in pixel units 0..255; pass scale=255.0 (or multiply by 255)"
            )
    return images, features


def memory_estimate(
    batch: int,
    height: int,
    width: int,
    channels: int = 3,
    *,
    capacity: int = 256,
    min_ball_size: int = 2,
    features: Features = Features(),
) -> int:
    """Rough peak bytes of the compiled program for a batch (float32 working set).

    Per pixel: the features and about a dozen per-pixel temporaries of the round
    and Lloyd loops; plus, when ``min_ball_size > 1``, one (pixels x capacity)
    distance matrix for the nearest-kept-ball search. Per ball: a few (K, F)
    arrays (negligible).
    """
    n = height * width
    f = features.num_features(channels)
    per_image = 4 * n * (4 * f + 16) + 4 * capacity * (4 * f + 16)
    if min_ball_size > 1:
        per_image += 4 * n * capacity
    return batch * per_image


def gb_cluster(
    images,
    *,
    threshold: float = 20.0,
    purity: float = 0.9,
    capacity: int = 256,
    min_ball_size: int = 2,
    max_rounds: int | None = None,
    features: Features | dict | None = None,
    kmeans_iters: int = 20,
    scale: float | None = None,
    chunk_size: int | None = None,
    memory_budget: int = 2 << 30,
    progress: bool = False,
) -> GBResult:
    """Granular-ball clustering of one image (H, W, C) or a batch (B, H, W, C).

    Args:
      images: C = 1 or 3, uint8 (or any int) or float, values in pixel units
        0..255. Float images in [0, 1] need ``scale=255.0``.
      threshold: distance (pixel units, in feature space) under which a member
        counts as within its ball.
      purity: a ball is kept when its within fraction is >= purity, else split.
      capacity: K, the fixed number of ball slots per image.
      min_ball_size: balls with fewer members are noise (1 disables noise).
      max_rounds: cap on split rounds (default: ``capacity``, i.e. no cap).
      features: :class:`Features` (colour only by default).
      kmeans_iters: cap on Lloyd assignments per 2-means split.
      scale: multiply float images by this before clustering (and divide the
        painted image by it), e.g. 255.0 for [0, 1] images.
      chunk_size: images per compiled call (default: as many as fit in
        ``memory_budget`` bytes, see :func:`memory_estimate`). The last chunk is
        padded, so every chunk reuses one compilation.
      memory_budget: bytes per chunk used to pick the default ``chunk_size``.
      progress: show a progress bar over chunks.

    Works inside ``jax.jit``/``jax.grad`` on float inputs (value checks are then
    skipped); the painted image is differentiable in the pixel values with the
    partition held fixed.

    With several devices, each chunk is sharded over them along the batch axis.
    """
    images, features = _validate(
        images,
        threshold,
        purity,
        capacity,
        min_ball_size,
        max_rounds,
        kmeans_iters,
        features,
        scale,
    )
    unbatched = images.ndim == 3
    x = images[None] if unbatched else images
    B, H, W, C = x.shape
    out_dtype = np.dtype(x.dtype)
    static = dict(
        K=int(capacity),
        max_rounds=int(max_rounds or capacity),
        kmeans_iters=int(kmeans_iters),
        min_ball_size=int(min_ball_size),
        features=features,
        out_dtype=out_dtype,
    )
    args = (
        jnp.float32(threshold),
        jnp.float32(purity),
        jnp.float32(1.0 if scale is None else scale),
    )

    if _is_traced(x):
        res = _cluster_batch(x, *args, **static, multilevel=_multilevel(B * H * W))
    else:
        res = _run_chunked(x, args, static, chunk_size, memory_budget, progress)
    if unbatched:
        res = jax.tree_util.tree_map(lambda a: a[0], res)
    return res


def _run_chunked(x, args, static, chunk_size, memory_budget, progress):
    B, H, W, C = x.shape
    ndev = jax.device_count()
    if chunk_size is None:
        per = memory_estimate(
            1,
            H,
            W,
            C,
            capacity=static["K"],
            min_ball_size=static["min_ball_size"],
            features=static["features"],
        )
        chunk_size = max(1, int(memory_budget // per))
        if jax.default_backend() == "cpu":
            # Batch-synchronous loops run as long as the slowest image: on CPU,
            # where larger batches buy no parallelism, smaller chunks are faster.
            chunk_size = min(chunk_size, 128)
    else:
        _check_positive_int("chunk_size", chunk_size)
    chunk = min(int(chunk_size), B)
    if ndev > 1:
        chunk = -(-chunk // ndev) * ndev
        from jax.sharding import Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        sharding = NamedSharding(Mesh(np.array(jax.devices()), ("batch",)), P("batch"))
    else:
        sharding = None

    starts = range(0, B, chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, total=-(-B // chunk), desc="gb_cluster", unit="chunk")
    outs = []
    for s in starts:
        part = x[s : s + chunk]
        n = part.shape[0]
        if n < chunk:  # pad the ragged tail to reuse the compiled program
            pad_idx = np.concatenate([np.arange(n), np.full(chunk - n, n - 1)])
            part = part[pad_idx] if isinstance(part, np.ndarray) else jnp.take(part, pad_idx, 0)
        part = jax.device_put(part, sharding) if sharding is not None else jnp.asarray(part)
        r = _cluster_batch(part, *args, **static, multilevel=_multilevel(chunk * H * W))
        outs.append(jax.tree_util.tree_map(lambda a: a[:n], r) if n < chunk else r)
    if len(outs) == 1:
        return outs[0]
    return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, 0), *outs)


def gb_denoise(images, **kwargs):
    """The GB-painted image: same shape and dtype as ``images``.

    Keyword arguments are those of :func:`gb_cluster`.
    """
    return gb_cluster(images, **kwargs).image


def gb_multiscale(images, thresholds: Sequence[float] = (40.0, 20.0, 10.0), **kwargs) -> GBResult:
    """Coarse-to-fine family: :func:`gb_cluster` at each threshold.

    Returns a :class:`GBResult` whose fields are stacked on a new leading axis of
    length ``len(thresholds)`` (so ``.image`` is (T, [B,] H, W, C)). The
    threshold is a traced argument: all thresholds share one compilation.
    """
    if "threshold" in kwargs:
        raise ValueError("threshold: use thresholds=(...) with gb_multiscale")
    thresholds = tuple(thresholds)
    if not thresholds:
        raise ValueError("thresholds: expected at least one threshold")
    res = [gb_cluster(images, threshold=t, **kwargs) for t in thresholds]
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a, 0), *res)
