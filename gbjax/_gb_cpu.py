"""The granular-ball CPU kernel: one compiled loop per image (numba), private.

:mod:`gbjax.gb` calls it from inside ``jax.jit`` as an XLA custom call on CPU
when ``engine="numba"`` (the default on a single CPU device when numba is
installed, see :func:`gbjax.gb_cluster`). It computes exactly what the XLA
program of :mod:`gbjax._gb_engine` computes, ball ids and every float32
statistic included, for the same features: the same float32 operations in the
same order (no fused multiply-adds, per-ball sums in ascending pixel order as
XLA:CPU's sequential scatter adds them, centres divided column by column). The
partition and the choice of paint colour are piecewise constant in the pixels
and need no gradient; the painting and its gradient stay in JAX
(:func:`cluster_and_paint`).

Per image the kernel keeps every ball's members contiguous, in ascending pixel
order, in a permuted copy of the features; a split partitions its ball's range
stably (side A first, keeping the id; side B after it, taking the next id).
Each round tests the open balls (those not yet found pure or frozen), ranks the
candidates when the capacity binds, and splits the chosen ones in id order, so
the work per image is that of its own rounds: no image waits for another's.
Only members of the balls being tested or split are visited. The loops run
over contiguous per-ball slices (which numba vectorises; indexing the whole
arrays at a run-time offset would not be); a split hands its sides' integer
sums to their next tests; the final statistics reuse each ball's last test at
that threshold; and with integer features the partitions move one int64 per
member (its features and pixel index packed) instead of four arrays.
Inside a JAX program the images of a call run one after another (numba's
parallel loop, entered from an XLA thread, kept the process from exiting); on
host arrays (:func:`cluster_numpy`) they run over numba's threads (``prange``). numba
compiles the kernel on first use and caches it on disk (``cache=True``).
"""

from __future__ import annotations

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np

try:  # optional at import time: without numba the XLA program is used
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

AVAILABLE = numba is not None


def available() -> bool:
    """True when numba is importable, so ``engine="numba"`` can run."""
    return AVAILABLE


# --------------------------------------------------------------------------
# The compiled loop
# --------------------------------------------------------------------------

if AVAILABLE:
    _jit = functools.partial(njit, cache=True, nogil=True)

    # Members are kept feature-major, X (F, N), so that the loops over a ball's
    # members read contiguous memory and compile to vector instructions. When
    # there are three features and they are integers whose sums stay exact in
    # float32 (uint8 colour, the default: ``integral``), sums taken as integers
    # are the same in any order, so the 2-means and purity loops add integers
    # (vectorised) instead of floats (which must be added one by one, in pixel
    # order, to match XLA's sums).

    @_jit
    def _sq(X, j, c):
        """Squared distance of member j of ``X`` to ``c``, summed left to right in float32."""
        d = X[0, j] - c[0]
        s = d * d
        for f in range(1, c.shape[0]):
            d = X[f, j] - c[f]
            s = s + d * d
        return s

    @_jit
    def _sq_row(x, p, c):
        """Squared distance of row p of ``x`` (N, F) to ``c``, as :func:`_sq`."""
        d = x[p, 0] - c[0]
        s = d * d
        for f in range(1, c.shape[0]):
            d = x[p, f] - c[f]
            s = s + d * d
        return s

    @_jit(inline="always")
    def _test(X, integral, s, n, d2, t2, cen, tot, known):
        """Purity test of members s..s+n: the centre (into ``cen``; integer sums
        into ``tot`` when ``integral``, or taken from it when ``known``), squared
        distances (into ``d2``) and the number of members strictly within the
        threshold."""
        F = X.shape[0]
        fn = np.float32(n)
        if integral:
            x0, x1, x2 = X[0, s : s + n], X[1, s : s + n], X[2, s : s + n]
            dd = d2[s : s + n]
            if known:
                s0, s1, s2 = tot[0], tot[1], tot[2]
            else:
                s0 = s1 = s2 = np.int32(0)
                for j in range(n):
                    s0 = np.int32(s0 + np.int32(x0[j]))
                    s1 = np.int32(s1 + np.int32(x1[j]))
                    s2 = np.int32(s2 + np.int32(x2[j]))
                tot[0], tot[1], tot[2] = s0, s1, s2
            c0, c1, c2 = np.float32(s0) / fn, np.float32(s1) / fn, np.float32(s2) / fn
            cen[0], cen[1], cen[2] = c0, c1, c2
            w = np.int32(0)
            for j in range(n):
                e0 = x0[j] - c0
                e1 = x1[j] - c1
                e2 = x2[j] - c2
                e = (e0 * e0 + e1 * e1) + e2 * e2
                dd[j] = e
                w = np.int32(w + np.int32(e < t2))
            return w
        for f in range(F):
            acc = np.float32(0.0)
            for j in range(s, s + n):
                acc += X[f, j]
            cen[f] = acc / fn
        w = 0
        if F == 3:
            c0, c1, c2 = cen[0], cen[1], cen[2]
            x0, x1, x2 = X[0, s : s + n], X[1, s : s + n], X[2, s : s + n]
            dd = d2[s : s + n]
            for j in range(n):
                e0 = x0[j] - c0
                e1 = x1[j] - c1
                e2 = x2[j] - c2
                e = (e0 * e0 + e1 * e1) + e2 * e2
                dd[j] = e
                w += e < t2
            return w
        for j in range(s, s + n):
            dd = _sq(X, j, cen)
            d2[j] = dd
            w += dd < t2
        return w

    @_jit(inline="always")
    def _first_max(di):
        """The first index of the largest of ``di``: the bits of float32 values
        >= 0 (sums of squares, never NaN), which order as the values do. One
        vectorised maximum of (value, -index) pairs packed in int64."""
        low = np.int64(0xFFFFFFFF)
        top = np.int64(-1)
        for j in range(di.shape[0]):
            top = max(top, (np.int64(di[j]) << 32) | (low - j))
        return low - (top & low)

    @_jit(inline="always")
    def _two_means(
        X, integral, s, n, d2, d2i, tmp, tmpi, side, kmeans_iters, ca, cb, acc_a, acc_b, tot, sumb
    ):  # fmt: skip
        """2-means of members s..s+n; sides in ``side`` (True: B).

        Seeds: A the member with the largest ``d2`` (distance to the centre),
        B the member farthest from A, lowest index on ties. Lloyd: assign to the
        nearer centre (ties to A), recompute the means; stop when they equal
        the centres that made the assignment, a side is empty, or after
        ``kmeans_iters`` assignments. Returns the size of side B (0 or n: the
        ball cannot be split). ``tot``: the members' integer sums (``integral``).
        """
        F = X.shape[0]
        ia = s + _first_max(d2i[s : s + n])
        for f in range(F):
            ca[f] = X[f, ia]
        if F == 3:
            a0, a1, a2 = ca[0], ca[1], ca[2]
            x0, x1, x2 = X[0, s : s + n], X[1, s : s + n], X[2, s : s + n]
            ti = tmpi[:n]
            tf = tmp[:n]
            for j in range(n):
                e0 = x0[j] - a0
                e1 = x1[j] - a1
                e2 = x2[j] - a2
                tf[j] = (e0 * e0 + e1 * e1) + e2 * e2
            ib = s + _first_max(ti)
        else:
            ib = s
            best = _sq(X, s, ca)
            for j in range(s + 1, s + n):
                dd = _sq(X, j, ca)
                if dd > best:
                    best = dd
                    ib = j
        for f in range(F):
            cb[f] = X[f, ib]
        if integral:
            return _lloyd3_integral(X, s, n, side, kmeans_iters, ca, cb, tot, sumb)
        if F == 3:
            return _lloyd3_float(X, s, n, side, kmeans_iters, ca, cb)
        it = 0
        while True:
            for f in range(F):
                acc_a[f] = np.float32(0.0)
                acc_b[f] = np.float32(0.0)
            na = 0
            nb = 0
            for j in range(s, s + n):
                if _sq(X, j, cb) < _sq(X, j, ca):
                    side[j] = True
                    nb += 1
                    for f in range(F):
                        acc_b[f] += X[f, j]
                else:
                    side[j] = False
                    na += 1
                    for f in range(F):
                        acc_a[f] += X[f, j]
            it += 1
            if na == 0 or nb == 0:
                return nb
            fa = np.float32(na)
            fb = np.float32(nb)
            moved = False
            for f in range(F):
                ma = acc_a[f] / fa
                mb = acc_b[f] / fb
                if ma != ca[f] or mb != cb[f]:
                    moved = True
                acc_a[f] = ma
                acc_b[f] = mb
            if not moved or it >= kmeans_iters:
                return nb
            for f in range(F):
                ca[f] = acc_a[f]
                cb[f] = acc_b[f]

    @_jit(inline="always")
    def _lloyd3_integral(X, s, n, side, kmeans_iters, ca, cb, tot, sumb):
        """The Lloyd loop of :func:`_two_means` for three integer features: the
        same float32 distances and comparisons; side B's sums in integers and
        side A's as the total minus B's (both exact, so the means are those of
        float32 sums in pixel order)."""
        a0, a1, a2 = ca[0], ca[1], ca[2]
        b0, b1, b2 = cb[0], cb[1], cb[2]
        t0, t1, t2 = tot[0], tot[1], tot[2]
        y0, y1, y2 = X[0, s : s + n], X[1, s : s + n], X[2, s : s + n]
        sd = side[s : s + n]
        it = 0
        while True:
            # int32 accumulators (numba would widen to int64, halving the lanes)
            nb = sb0 = sb1 = sb2 = np.int32(0)
            for j in range(n):
                x0 = y0[j]
                x1 = y1[j]
                x2 = y2[j]
                e0 = x0 - a0
                e1 = x1 - a1
                e2 = x2 - a2
                g0 = x0 - b0
                g1 = x1 - b1
                g2 = x2 - b2
                b = (g0 * g0 + g1 * g1) + g2 * g2 < (e0 * e0 + e1 * e1) + e2 * e2
                sd[j] = b
                m = np.int32(b)
                nb = np.int32(nb + m)
                sb0 = np.int32(sb0 + np.int32(x0) * m)
                sb1 = np.int32(sb1 + np.int32(x1) * m)
                sb2 = np.int32(sb2 + np.int32(x2) * m)
            sumb[0], sumb[1], sumb[2] = sb0, sb1, sb2
            na = n - nb
            it += 1
            if na == 0 or nb == 0:
                return nb
            fa = np.float32(na)
            fb = np.float32(nb)
            m0 = np.float32(t0 - sb0) / fa
            m1 = np.float32(t1 - sb1) / fa
            m2 = np.float32(t2 - sb2) / fa
            q0, q1, q2 = np.float32(sb0) / fb, np.float32(sb1) / fb, np.float32(sb2) / fb
            moved = m0 != a0 or m1 != a1 or m2 != a2 or q0 != b0 or q1 != b1 or q2 != b2
            if not moved or it >= kmeans_iters:
                return nb
            a0, a1, a2 = m0, m1, m2
            b0, b1, b2 = q0, q1, q2

    @_jit(inline="always")
    def _lloyd3_float(X, s, n, side, kmeans_iters, ca, cb):
        """The Lloyd loop of :func:`_two_means` for three float features, in
        scalars: each side's sums in float32, in pixel order (branch-free: adding
        an exact 0 leaves a sum unchanged)."""
        a0, a1, a2 = ca[0], ca[1], ca[2]
        b0, b1, b2 = cb[0], cb[1], cb[2]
        zero = np.float32(0.0)
        y0, y1, y2 = X[0, s : s + n], X[1, s : s + n], X[2, s : s + n]
        sd = side[s : s + n]
        it = 0
        while True:
            sa0 = sa1 = sa2 = sb0 = sb1 = sb2 = zero
            nb = 0
            for j in range(n):
                x0 = y0[j]
                x1 = y1[j]
                x2 = y2[j]
                e0 = x0 - a0
                e1 = x1 - a1
                e2 = x2 - a2
                g0 = x0 - b0
                g1 = x1 - b1
                g2 = x2 - b2
                b = (g0 * g0 + g1 * g1) + g2 * g2 < (e0 * e0 + e1 * e1) + e2 * e2
                sd[j] = b
                nb += b
                w = np.float32(b)
                sb0 += x0 * w
                sb1 += x1 * w
                sb2 += x2 * w
                sa0 += x0 - x0 * w
                sa1 += x1 - x1 * w
                sa2 += x2 - x2 * w
            na = n - nb
            it += 1
            if na == 0 or nb == 0:
                return nb
            fa = np.float32(na)
            fb = np.float32(nb)
            m0, m1, m2 = sa0 / fa, sa1 / fa, sa2 / fa
            q0, q1, q2 = sb0 / fb, sb1 / fb, sb2 / fb
            moved = m0 != a0 or m1 != a1 or m2 != a2 or q0 != b0 or q1 != b1 or q2 != b2
            if not moved or it >= kmeans_iters:
                return nb
            a0, a1, a2 = m0, m1, m2
            b0, b1, b2 = q0, q1, q2

    @_jit(inline="always")
    def _stable_split(a, sd, buf, n):
        """Reorders ``a[:n]`` stably: the entries whose ``sd`` is False first, then
        the others. Branch-free: every entry is written to both destinations and
        only the cursor of its side moves (the sides alternate unpredictably)."""
        w = 0
        m = 0
        for j in range(n):
            b = sd[j]
            v = a[j]
            a[w] = v
            buf[m] = v
            w += not b
            m += b
        for i in range(m):
            a[w + i] = buf[i]

    @_jit(inline="always")
    def _partition(X, perm, s, n, side, bufx, bufp):
        """Stable partition of members s..s+n: side A (False) first, then side B."""
        sd = side[s : s + n]
        _stable_split(perm[s : s + n], sd, bufp, n)
        for f in range(X.shape[0]):
            _stable_split(X[f, s : s + n], sd, bufx[f], n)

    @_jit(inline="always")
    def _partition_packed(X, key, s, n, side, bufk, lo, bf, bp):
        """:func:`_partition` for packed members (``key``: each member's three
        integer features, less ``lo``, in ``bf`` bits each above its pixel index
        in ``bp`` bits): one array to move instead of four, then the features
        unpacked (exact: integers below 2**24)."""
        kk = key[s : s + n]
        _stable_split(kk, side[s : s + n], bufk, n)
        mask = (np.int64(1) << bf) - 1
        x0, x1, x2 = X[0, s : s + n], X[1, s : s + n], X[2, s : s + n]
        for j in range(n):
            v = kk[j] >> bp
            x2[j] = np.float32((v & mask) + lo)
            v >>= bf
            x1[j] = np.float32((v & mask) + lo)
            v >>= bf
            x0[j] = np.float32((v & mask) + lo)

    @_jit
    def _before(k1, k2, frac, size):
        """Capacity ranking: lower within fraction, then larger ball, then lower id."""
        if frac[k1] != frac[k2]:
            return frac[k1] < frac[k2]
        if size[k1] != size[k2]:
            return size[k1] > size[k2]
        return k1 < k2

    @_jit
    def _image(
        x, thr, purity, K, max_rounds, kmeans_iters, min_ball_size,
        labels, counts, centres, radii, within, n_out, noise, paint, sat_out, rounds_out,
    ):  # fmt: skip
        """One image ``x`` (N, F) at the non-increasing thresholds ``thr`` (T,).

        Each threshold continues from the partition of the one before with all
        its balls open (the first starts from one ball). Writes row t of every
        output; ``counts``, ``centres``, ``radii`` and ``within`` must be zeros.
        """
        N, F = x.shape
        X = np.empty((F, N), np.float32)
        if F == 3:
            xr = x.reshape(N * 3)  # flat indices vectorise the transposition
            for j in range(N):
                X[0, j] = xr[3 * j]
                X[1, j] = xr[3 * j + 1]
                X[2, j] = xr[3 * j + 2]
        else:
            for j in range(N):
                for f in range(F):
                    X[f, j] = x[j, f]
        # integer sums exact in float32 (and in int32): every value an integer
        # and every sum below 2**24 (in branch-free, vectorised passes)
        integral = F == 3
        lo = hi = np.int64(0)
        xf = X.reshape(N * F)
        if integral:
            bad = np.int32(0)
            for i in range(N * F):
                v = xf[i]
                bad |= np.int32(v != np.floor(v)) | np.int32(not abs(v) < np.float32(2.0**24))
            integral = bad == 0
        if integral:
            imin = np.int32(xf[0])
            imax = imin
            for i in range(N * F):
                u = np.int32(xf[i])
                imin = min(imin, u)
                imax = max(imax, u)
            lo = np.int64(imin)
            hi = np.int64(imax)
            integral = max(-lo, hi) * N < 2**24
        perm = np.arange(N).astype(np.int32)
        # integer features packed with the pixel index into one int64 per
        # member when they fit, for the partitions
        packed = False
        bf = np.int64(0)
        bp = np.int64(0)
        if integral:
            span = hi - lo
            while (np.int64(1) << bf) <= span:
                bf += 1
            while (np.int64(1) << bp) < N:
                bp += 1
            packed = 3 * bf + bp <= 62
        key = np.empty(N if packed else 0, np.int64)
        bufk = np.empty(N if packed else 0, np.int64)
        if packed:
            for j in range(N):
                u0 = np.int64(X[0, j]) - lo
                u1 = np.int64(X[1, j]) - lo
                u2 = np.int64(X[2, j]) - lo
                key[j] = (((((u0 << bf) | u1) << bf) | u2) << bp) | j
        start = np.zeros(K, np.int32)
        size = np.zeros(K, np.int32)
        size[0] = N
        opn = np.zeros(K, np.bool_)
        frac = np.zeros(K, np.float32)
        cand = np.empty(K, np.int32)
        order = np.empty(K, np.int32)
        chosen = np.zeros(K, np.bool_)
        kept = np.zeros(K, np.bool_)
        tot = np.zeros((K, 3), np.int64)
        d2 = np.empty(N, np.float32)
        tmp = np.empty(N, np.float32)
        d2i = d2.view(np.int32)  # the same memory, as integers (see _two_means)
        tmpi = tmp.view(np.int32)
        side = np.zeros(N, np.bool_)
        bufx = np.empty((F, N), np.float32)
        bufp = np.empty(N, np.int32)
        cenk = np.empty((K, F), np.float32)  # the centre of each ball's last test
        wk = np.zeros(K, np.int32)  # and its within count
        fresh = np.zeros(K, np.bool_)  # the last test (and d2) still hold
        known = np.zeros(K, np.bool_)  # tot holds the ball's integer sums
        sumb = np.zeros(3, np.int64)
        ca = np.empty(F, np.float32)
        cb = np.empty(F, np.float32)
        acc_a = np.empty(F, np.float32)
        acc_b = np.empty(F, np.float32)
        nb = 1
        for t in range(thr.shape[0]):
            t2 = thr[t] * thr[t]
            for k in range(nb):
                opn[k] = True
                fresh[k] = False
            saturated = False
            rounds = 0
            active = True
            while active and rounds < max_rounds:
                # the purity test of every open ball
                nc = 0
                for k in range(nb):
                    if not opn[k]:
                        continue
                    n = size[k]
                    w = _test(X, integral, start[k], n, d2, t2, cenk[k], tot[k], known[k])
                    wk[k] = w
                    fresh[k] = True
                    known[k] = integral
                    fr = np.float32(w) / np.float32(n)
                    if n >= 2 and fr < purity:
                        frac[k] = fr
                        cand[nc] = k
                        nc += 1
                    else:
                        opn[k] = False  # pure (or one pixel): never changes again
                # the capacity
                free = K - nb
                for i in range(nc):
                    chosen[cand[i]] = True
                if nc > free:
                    saturated = True
                    for i in range(nc):  # insertion sort: most impure, largest, lowest id
                        k = cand[i]
                        j = i
                        while j > 0 and _before(k, order[j - 1], frac, size):
                            order[j] = order[j - 1]
                            j -= 1
                        order[j] = k
                    for i in range(free, nc):
                        chosen[order[i]] = False  # stays open: impure, tried again
                # the splits, in id order
                n_split = 0
                for i in range(nc):
                    k = cand[i]
                    if not chosen[k]:
                        continue
                    chosen[k] = False
                    s = start[k]
                    n = size[k]
                    m = _two_means(
                        X, integral, s, n, d2, d2i, tmp, tmpi, side, kmeans_iters, ca, cb,
                        acc_a, acc_b, tot[k], sumb,
                    )  # fmt: skip
                    if m == 0 or m == n:
                        opn[k] = False  # frozen: kept as it is
                        continue
                    if packed:
                        _partition_packed(X, key, s, n, side, bufk, lo, bf, bp)
                    else:
                        _partition(X, perm, s, n, side, bufx, bufp)
                    size[k] = n - m
                    start[nb] = s + n - m
                    size[nb] = m
                    opn[nb] = True
                    fresh[k] = fresh[nb] = False
                    if integral:  # the sides' sums, from the last assignment
                        for f in range(3):
                            tot[nb, f] = sumb[f]
                            tot[k, f] -= sumb[f]
                    known[nb] = known[k] = integral
                    nb += 1
                    n_split += 1
                rounds += 1
                active = n_split > 0
            # final statistics of every ball, the labels and the paint colour
            if packed:
                pmask = (np.int64(1) << bp) - 1
                for j in range(N):
                    perm[j] = key[j] & pmask
            any_kept = False
            for k in range(nb):
                s = start[k]
                n = size[k]
                fn = np.float32(n)
                if fresh[k]:  # tested at this threshold since its last change
                    w = wk[k]
                else:
                    w = _test(X, integral, s, n, d2, t2, cenk[k], tot[k], known[k])
                    known[k] = integral
                for f in range(F):
                    centres[t, k, f] = cenk[k, f]
                rs = np.float32(0.0)
                dd = d2[s : s + n]
                lab = labels[t]
                pm = perm[s : s + n]
                for j in range(n):
                    v = dd[j]
                    if v > 0:
                        rs += np.sqrt(v)
                    lab[pm[j]] = k
                radii[t, k] = rs / fn
                within[t, k] = np.float32(w) / fn
                counts[t, k] = n
                kept[k] = n >= min_ball_size
                any_kept = any_kept or kept[k]
            lab = labels[t]
            pt = paint[t]
            nz = noise[t]
            for p in range(N):
                k = lab[p]
                nz[p] = not kept[k]
                pt[p] = k
            for k in range(nb):
                if kept[k] or not any_kept:
                    continue
                for j in range(start[k], start[k] + size[k]):
                    p = perm[j]
                    best = np.float32(np.inf)
                    if F == 3:
                        p0, p1, p2 = x[p, 0], x[p, 1], x[p, 2]
                        for q in range(nb):  # the nearest kept centre, lowest id on ties
                            if kept[q]:
                                e0 = p0 - cenk[q, 0]
                                e1 = p1 - cenk[q, 1]
                                e2 = p2 - cenk[q, 2]
                                dd = (e0 * e0 + e1 * e1) + e2 * e2
                                if dd < best:
                                    best = dd
                                    pt[p] = q
                    else:
                        for q in range(nb):
                            if kept[q]:
                                dd = _sq_row(x, p, cenk[q])
                                if dd < best:
                                    best = dd
                                    pt[p] = q
            n_out[t] = nb
            sat_out[t] = saturated
            rounds_out[t] = rounds

    @_jit
    def _batch_serial(
        x, thr, purity, K, max_rounds, kmeans_iters, min_ball_size,
        labels, counts, centres, radii, within, n_out, noise, paint, sat_out, rounds_out,
    ):  # fmt: skip
        for i in range(x.shape[0]):
            _image(
                x[i], thr[i], purity[i], K, max_rounds, kmeans_iters, min_ball_size,
                labels[i], counts[i], centres[i], radii[i], within[i], n_out[i], noise[i],
                paint[i], sat_out[i], rounds_out[i],
            )  # fmt: skip

    # A separate function, not a second dispatcher of the one above: numba's
    # on-disk cache keys entries by function, not by the ``parallel`` flag.
    @_jit(parallel=True)
    def _batch_parallel(
        x, thr, purity, K, max_rounds, kmeans_iters, min_ball_size,
        labels, counts, centres, radii, within, n_out, noise, paint, sat_out, rounds_out,
    ):  # fmt: skip
        for i in prange(x.shape[0]):
            _image(
                x[i], thr[i], purity[i], K, max_rounds, kmeans_iters, min_ball_size,
                labels[i], counts[i], centres[i], radii[i], within[i], n_out[i], noise[i],
                paint[i], sat_out[i], rounds_out[i],
            )  # fmt: skip


# Several host threads may call it at once (e.g. concurrent calls): the kernel
# already uses every core, so they take turns.
_LOCK = threading.Lock()


def cluster_numpy(x, thresholds, purity, *, K, max_rounds, kmeans_iters, min_ball_size,
                  parallel=None):  # fmt: skip
    """The kernel on host arrays: ``x`` (I, N, F), ``thresholds`` (I, T), ``purity`` (I,).

    Returns (labels (I, T, N) int32, counts (I, T, K) int32, centres (I, T, K, F)
    float32, radii (I, T, K) float32, within (I, T, K) float32, n_balls (I, T)
    int32, noise (I, T, N) bool, paint (I, T, N) int32, saturated (I, T) bool,
    rounds (I, T) int32); ``paint`` is the ball whose centre paints each pixel.
    ``parallel``: run images over numba's threads (default: when there are
    several images and threads).
    """
    x = np.ascontiguousarray(x, np.float32)
    thresholds = np.ascontiguousarray(thresholds, np.float32)
    purity = np.ascontiguousarray(purity, np.float32)
    Ii, N, F = x.shape
    T = thresholds.shape[1]
    out = (
        np.zeros((Ii, T, N), np.int32),
        np.zeros((Ii, T, K), np.int32),
        np.zeros((Ii, T, K, F), np.float32),
        np.zeros((Ii, T, K), np.float32),
        np.zeros((Ii, T, K), np.float32),
        np.zeros((Ii, T), np.int32),
        np.zeros((Ii, T, N), np.bool_),
        np.zeros((Ii, T, N), np.int32),
        np.zeros((Ii, T), np.bool_),
        np.zeros((Ii, T), np.int32),
    )
    if parallel is None:
        parallel = Ii > 1 and numba.get_num_threads() > 1
    fn = _batch_parallel if parallel else _batch_serial
    with _LOCK:
        fn(x, thresholds, purity, int(K), int(max_rounds), int(kmeans_iters),
           int(min_ball_size), *out)  # fmt: skip
    return out


# --------------------------------------------------------------------------
# The JAX side: custom call, painting and gradient
# --------------------------------------------------------------------------


# The kernel is an XLA custom call on CPU: a numba ``cfunc`` registered as a
# foreign-function target (XLA's "custom call" API with status and opaque
# string, version 3), so XLA runs the compiled loop directly on its own thread,
# on its own buffers. A Python callback (``jax.pure_callback``) would hold the
# GIL and copy the operands into new CPU arrays before calling: with one XLA
# worker thread (a process confined to one core), that copy waits for the very
# thread that waits for the callback, and the program hangs.

_META = 8  # I, N, F, T, K, max_rounds, kmeans_iters, min_ball_size


@functools.cache
def _target() -> str:
    """Compile the kernel's entry point (once per process) and register it with XLA."""
    import ctypes

    from numba import carray, types

    ptrs = types.CPointer(types.voidptr)

    @numba.cfunc(types.void(ptrs, ptrs, types.voidptr, types.uintp, types.voidptr), cache=True)
    def entry(out, ins, opaque, opaque_len, status):  # pragma: no cover - runs inside XLA
        m = carray(ins[3], _META, dtype=np.int32)
        Ii, N, F, T, K = m[0], m[1], m[2], m[3], m[4]
        x = carray(ins[0], (Ii, N, F), dtype=np.float32)
        th = carray(ins[1], (Ii, T), dtype=np.float32)
        pu = carray(ins[2], (Ii,), dtype=np.float32)
        labels = carray(out[0], (Ii, T, N), dtype=np.int32)
        counts = carray(out[1], (Ii, T, K), dtype=np.int32)
        centres = carray(out[2], (Ii, T, K, F), dtype=np.float32)
        radii = carray(out[3], (Ii, T, K), dtype=np.float32)
        within = carray(out[4], (Ii, T, K), dtype=np.float32)
        n_balls = carray(out[5], (Ii, T), dtype=np.int32)
        noise = carray(out[6], (Ii, T, N), dtype=np.bool_)
        paint = carray(out[7], (Ii, T, N), dtype=np.int32)
        saturated = carray(out[8], (Ii, T), dtype=np.bool_)
        rounds = carray(out[9], (Ii, T), dtype=np.int32)
        # XLA does not zero its output buffers; the kernel starts from zeros
        labels.fill(0)
        counts.fill(0)
        centres.fill(0)
        radii.fill(0)
        within.fill(0)
        n_balls.fill(0)
        noise.fill(False)
        paint.fill(0)
        saturated.fill(False)
        rounds.fill(0)
        # one image after another: numba's parallel loop (OpenMP), entered from an XLA
        # worker thread, kept the process from exiting (the CPU client's thread pool
        # never joined); XLA may run several calls at once instead
        _batch_serial(
            x, th, pu, K, m[5], m[6], m[7], labels, counts, centres, radii, within,
            n_balls, noise, paint, saturated, rounds,
        )  # fmt: skip

    new_capsule = ctypes.pythonapi.PyCapsule_New
    new_capsule.restype = ctypes.py_object
    new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    name = "gbjax_gb_cluster_cpu"
    jax.ffi.register_ffi_target(
        name, new_capsule(entry.address, b"xla._CUSTOM_CALL_TARGET", None), platform="cpu",
        api_version=0,
    )  # fmt: skip
    _target.entry = entry  # keep the compiled function alive with the registration
    return name


@functools.cache
def _kernel(K, max_rounds, kmeans_iters, min_ball_size):
    """``(x (I, N, F), thresholds (I, T), purity (I,)) -> the kernel's ten outputs``,
    as a JAX function: one custom call, mapped by ``vmap`` into the same call
    on all images at once (every mapped axis folds into the image axis)."""

    @jax.custom_batching.custom_vmap
    def call(x_INF, thr_IT, pur_I):
        Ii, N, F = x_INF.shape
        T = thr_IT.shape[1]
        i32, f32 = jnp.int32, jnp.float32
        name = _target()
        meta = np.array([Ii, N, F, T, K, max_rounds, kmeans_iters, min_ball_size], np.int32)
        sd = jax.ShapeDtypeStruct
        shapes = (
            sd((Ii, T, N), i32), sd((Ii, T, K), i32), sd((Ii, T, K, F), f32), sd((Ii, T, K), f32),
            sd((Ii, T, K), f32), sd((Ii, T), i32), sd((Ii, T, N), jnp.bool_), sd((Ii, T, N), i32),
            sd((Ii, T), jnp.bool_), sd((Ii, T), i32),
        )  # fmt: skip
        return tuple(
            jax.ffi.ffi_call(name, shapes, custom_call_api_version=3)(
                x_INF.astype(f32), thr_IT.astype(f32), pur_I.astype(f32), jnp.asarray(meta)
            )
        )

    @call.def_vmap
    def _(axis_size, in_batched, x_INF, thr_IT, pur_I):
        args = [
            a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
            for a, b in zip((x_INF, thr_IT, pur_I), in_batched)
        ]
        Ii = args[0].shape[1]
        out = call(*(a.reshape((axis_size * Ii,) + a.shape[2:]) for a in args))
        return tuple(o.reshape((axis_size, Ii) + o.shape[1:]) for o in out), (True,) * len(out)

    return call


def _centres_radii(x_BNF, labels_BTN, K):
    """Centres (B, T, K, F; 0 for empty slots) and radii (B, T, K) of a partition, in JAX."""
    from gbjax._gb_engine import ball_stats, segsum, sqdist

    B, T, N = labels_BTN.shape
    F = x_BNF.shape[-1]
    S = B * T * K
    x = jnp.broadcast_to(x_BNF[:, None], (B, T, N, F)).reshape(B * T * N, F)
    g = (labels_BTN + (jnp.arange(B * T, dtype=jnp.int32) * K).reshape(B, T, 1)).reshape(-1)
    cnt, c = ball_stats(x, g, S)
    d2 = sqdist(x, c[g])
    safe = d2 > 0
    dist = jnp.where(safe, jnp.sqrt(jnp.where(safe, d2, 1.0)), 0.0)
    radii = segsum(dist, g, S) / jnp.maximum(cnt, 1).astype(jnp.float32)
    c = c * (cnt > 0)[:, None]
    return c.reshape(B, T, K, F), radii.reshape(B, T, K)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _differentiable(K, x_BNF, labels_BTN, centres, radii):
    """``(centres, radii)`` as computed by the kernel, differentiable in ``x_BNF``
    with the partition held fixed (the derivative of the JAX formulas)."""
    del x_BNF, labels_BTN
    return centres, radii


@_differentiable.defjvp
def _differentiable_jvp(K, primals, tangents):
    x_BNF, labels_BTN, centres, radii = primals
    _, tangent_out = jax.jvp(lambda z: _centres_radii(z, labels_BTN, K), (x_BNF,), (tangents[0],))
    return (centres, radii), tangent_out


def cluster_and_paint(
    x_BNF, thresholds_T, purity, scale, *, C, K, max_rounds, kmeans_iters, min_ball_size,
    features, out_dtype,
):  # fmt: skip
    """The kernel's partition and statistics, painted in JAX: a GBResult (B, T, ...).

    Per-pixel fields are flat (B, T, N[, C]). ``centers``, ``radii`` and the
    painted ``image`` are differentiable in ``x_BNF`` as in the XLA program.
    """
    from gbjax._gb_engine import GBResult, painted_image

    B, N, F = x_BNF.shape
    T = thresholds_T.shape[0]
    f32 = jnp.float32
    kernel = _kernel(K, max_rounds, kmeans_iters, min_ball_size)
    labels, counts, centres, radii, within, n_balls, noise, paint, saturated, rounds = kernel(
        jax.lax.stop_gradient(x_BNF),
        jnp.broadcast_to(jnp.asarray(thresholds_T, f32), (B, T)),
        jnp.broadcast_to(jnp.asarray(purity, f32), (B,)),
    )
    centres, radii = _differentiable(K, x_BNF, labels, centres, radii)
    flat = centres.reshape(B * T * K, F)
    idx = (paint + (jnp.arange(B * T, dtype=jnp.int32) * K).reshape(B, T, 1)).reshape(-1)
    colour = flat[idx][:, :C] / jnp.float32(features.color)
    img = painted_image(colour, out_dtype, scale)
    return GBResult(
        labels=labels,
        centers=centres,
        radii=radii,
        counts=counts,
        within_fraction=within,
        n_balls=n_balls,
        noise=noise,
        image=img.reshape(B, T, N, C),
        saturated=saturated,
        rounds=rounds,
    )
