"""Granular-ball clustering throughput: gbjax against two per-image references.

    python benchmarks/gb_throughput.py --data-dir ../shared/data          # headline figures
    python benchmarks/gb_throughput.py --data-dir ../shared/data --n 64 --n-ref 8 --n-sklearn 2 \\
        --photos 1                                                          # a quick check

Five parts, all timed in one run (on a shared machine only ratios taken in the
same run mean anything):

1. **Single scale**, on ``--n`` CIFAR-10 test images (a fixed random subset,
   seed 0: the image folders are sorted by class) at thresholds 40, 20 and 10
   (purity 0.9, capacity 256): the per-image time of gbjax (steady state, best
   of ``--repeats`` calls after a first, compiling call on the same shapes;
   compile time reported separately) against

   * the **lean reference** (the headline): the same algorithm and choices as
     gbjax, written as lean as we could in numpy, one image at a time (a Python
     list of balls; only balls not yet found pure are tested again; 2-means
     exactly as gbjax defines it, in vectorised numpy; no uniqueness check, no
     thread pinning), timed on the first ``--n-ref`` images. It must give the
     same partitions as gbjax, ids included; the benchmark checks it on every
     image it times (and tests/test_gb.py checks it against the oracle);
   * the **usual reference**: the usual public implementation, a Python list of
     balls with one scikit-learn 2-means call per split (KMeans(n_clusters=2,
     n_init=1, seeded), pinned to one thread, which makes these tiny calls ~10x
     faster than scikit-learn's default pool) and a ``np.unique`` check per
     split, timed on the first ``--n-sklearn`` images. Its 2-means seeds
     differ, so its partitions (and ball counts) differ a little.

2. **Multiscale**: ``gb_multiscale`` at thresholds (40, 20, 10) in one pass
   against the sum of the three ``gb_cluster`` calls, interleaved in the same
   run (goal: at most 0.6x).

3. **Photo-sized images** (``--photos`` per size, 0 to skip): 512 x 512 and
   768 x 1024 photos bundled with scikit-image when it is installed (else
   synthetic smooth images with edges and noise), at threshold 20 with
   ``capacity="auto"``: gbjax time per megapixel, how many images need more than
   256 balls (they saturate at 256 and are re-run with more slots), and the lean
   reference on the same images.

4. On a GPU (``--n 10000``): images/s and peak device memory.

5. The **compiled-loop reference** (issue 28): a plain numba loop, one image per
   call, one thread (:func:`numba_reference_cluster`), timed on all ``--n``
   images in the same run against ``gb_cluster`` with its default engine (the
   numba kernel on CPU), with ``engine="xla"``, and with the kernel on one
   thread; ratios reference / gbjax and checks that all partitions are
   identical. ``--profile-xla`` adds where the XLA engine's time goes on one
   chunk of 128 images (split rounds, painting, time per round).

Measured runtime on a 2-core CPU: about a minute with the defaults (2026-11-23,
before parts 5 and ``--profile-xla``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

import gbjax
from gbjax import data

HEADLINE_THRESHOLD = 20.0


# ---------------------------------------------------------------------------- references
def reference_cluster(image_HWC, threshold, purity, seed=0):
    """The usual implementation: list of balls, scikit-learn 2-means per split."""
    from sklearn.cluster import KMeans

    x = image_HWC.reshape(-1, image_HWC.shape[-1]).astype(np.float64)
    balls = [x]
    while True:
        new = []
        for b in balls:
            c = b.mean(0)
            within = np.mean(np.linalg.norm(b - c, axis=1) < threshold)
            if within < purity and len(b) >= 2 and len(np.unique(b, axis=0)) >= 2:
                lab = KMeans(n_clusters=2, n_init=1, random_state=seed).fit(b).labels_
                new += [b[lab == 0], b[lab == 1]]
            else:
                new.append(b)
        if len(new) == len(balls):
            return len(balls)
        balls = new


def _sqdist(x_nF, c_F):
    d = x_nF - c_F
    d *= d
    return d.sum(axis=1)  # ((d0^2 + d1^2) + d2^2) in float32, as gbjax and the oracle


def lean_reference_cluster(image_HWC, threshold, purity, capacity=256, kmeans_iters=20):
    """The leanest faithful per-image implementation we could write (numpy).

    gbjax's algorithm and choices exactly (strict within test, keep at
    ``within_fraction >= purity``, seeds farthest from the centre and then from
    that seed with the lowest index on ties, Lloyd until the assignment repeats
    or ``kmeans_iters`` assignments, side B appended as a new id in parent order,
    the capacity ranking), in float32. Lean where that changes nothing: a ball
    found pure is never tested again (its members never change); the distances
    of the purity test are reused for seed A; per-side sums are one
    matrix-vector product (for integer pixel values every sum is an exact
    integer in float32, so any summation order gives the oracle's centres).
    Colour features, integer images. Returns (labels (H*W,), n_balls, saturated).
    """
    x = np.ascontiguousarray(image_HWC.reshape(-1, image_HWC.shape[-1]), dtype=np.float32)
    t2 = np.float32(threshold) ** 2
    purity = np.float32(purity)
    balls = [np.arange(len(x))]  # ball id -> member pixel indices, ascending
    todo = [0]  # ids of the balls to test this round, ascending
    saturated = False
    for _ in range(capacity):
        cands = []
        for k in todo:
            xs = x[balls[k]]
            n = len(xs)
            tot = xs.sum(axis=0)
            d2 = _sqdist(xs, tot / np.float32(n))
            frac = np.float32(np.count_nonzero(d2 < t2)) / np.float32(n)
            if frac < purity:  # a single pixel is always pure
                cands.append((frac, -n, k, xs, d2, tot))
        free = capacity - len(balls)
        left = []
        if len(cands) > free:  # most impure first, then largest, then lowest id
            saturated = True
            ranked = sorted(cands, key=lambda c: c[:3])
            cands = sorted(ranked[:free], key=lambda c: c[2])
            left = [c[2] for c in ranked[free:]]  # impure, tried again next round
        split, new = [], []
        for _, _, k, xs, d2, tot in cands:
            n = len(xs)
            a = xs[np.argmax(d2)]
            b = xs[np.argmax(_sqdist(xs, a))]
            side = None
            for _ in range(kmeans_iters):
                new_side = _sqdist(xs, b) < _sqdist(xs, a)
                nb = np.count_nonzero(new_side)
                if nb == 0 or nb == n or (side is not None and np.array_equal(new_side, side)):
                    side = new_side
                    break
                side = new_side
                sb = new_side.astype(np.float32) @ xs
                a, b = (tot - sb) / np.float32(n - nb), sb / np.float32(nb)
            nb = np.count_nonzero(side)
            if nb == 0 or nb == n:
                continue  # one side empty: kept as it is and not tried again
            idx = balls[k]
            balls[k] = idx[~side]
            new.append(idx[side])
            split.append(k)
        if not new:
            break
        todo = sorted(split + left) + list(range(len(balls), len(balls) + len(new)))
        balls.extend(new)
    labels = np.empty(len(x), np.int32)
    for k, idx in enumerate(balls):
        labels[idx] = k
    return labels, len(balls), saturated


def _numba_reference():
    """The compiled-loop reference, built on first use (numba is needed)."""
    global _NUMBA_REF
    if _NUMBA_REF is not None:
        return _NUMBA_REF
    from numba import njit

    # no on-disk cache: a closure of a module loaded by path (the tests, a second suite
    # run) was cached under the module name '<dynamic>', which numba cannot re-import
    @njit(cache=False, nogil=True)
    def cluster(x, threshold, purity, capacity, kmeans_iters):  # pragma: no cover - compiled
        N = x.shape[0]
        K = capacity
        t2 = np.float32(threshold) * np.float32(threshold)
        purity = np.float32(purity)
        labels = np.zeros(N, np.int32)
        d2 = np.empty(N, np.float32)
        side = np.zeros(N, np.bool_)
        open_ = np.zeros(K, np.bool_)
        open_[0] = True
        cnt = np.zeros(K, np.int32)
        sums = np.zeros((K, 3), np.float32)
        cen = np.zeros((K, 3), np.float32)
        within = np.zeros(K, np.int32)
        frac = np.zeros(K, np.float32)
        chosen = np.zeros(K, np.bool_)
        moving = np.zeros(K, np.bool_)
        best = np.zeros(K, np.float32)
        arg = np.zeros(K, np.int32)
        ca = np.zeros((K, 3), np.float32)
        cb = np.zeros((K, 3), np.float32)
        sa = np.zeros((K, 3), np.float32)
        sb = np.zeros((K, 3), np.float32)
        na = np.zeros(K, np.int32)
        nbb = np.zeros(K, np.int32)
        newid = np.zeros(K, np.int32)
        order = np.zeros(K, np.int32)
        nb = 1
        saturated = False
        for _ in range(K):
            # purity test of the open balls: one pass for the sums, one for distances
            for k in range(nb):
                if open_[k]:
                    cnt[k] = 0
                    within[k] = 0
                    sums[k, 0] = sums[k, 1] = sums[k, 2] = np.float32(0.0)
            for p in range(N):
                k = labels[p]
                if open_[k]:
                    cnt[k] += 1
                    sums[k, 0] += x[p, 0]
                    sums[k, 1] += x[p, 1]
                    sums[k, 2] += x[p, 2]
            for k in range(nb):
                if open_[k]:
                    n = np.float32(cnt[k])
                    cen[k, 0] = sums[k, 0] / n
                    cen[k, 1] = sums[k, 1] / n
                    cen[k, 2] = sums[k, 2] / n
            for p in range(N):
                k = labels[p]
                if open_[k]:
                    e0 = x[p, 0] - cen[k, 0]
                    e1 = x[p, 1] - cen[k, 1]
                    e2 = x[p, 2] - cen[k, 2]
                    d = (e0 * e0 + e1 * e1) + e2 * e2
                    d2[p] = d
                    if d < t2:
                        within[k] += 1
            nc = 0
            for k in range(nb):
                chosen[k] = False
                if open_[k]:
                    frac[k] = np.float32(within[k]) / np.float32(cnt[k])
                    if cnt[k] >= 2 and frac[k] < purity:
                        chosen[k] = True
                        order[nc] = k
                        nc += 1
                    else:
                        open_[k] = False
            free = K - nb
            if nc > free:  # most impure, then largest, then lowest id
                saturated = True
                for i in range(1, nc):
                    k = order[i]
                    j = i
                    while j > 0:
                        q = order[j - 1]
                        if frac[k] < frac[q] or (
                            frac[k] == frac[q] and (cnt[k] > cnt[q] or (cnt[k] == cnt[q] and k < q))
                        ):
                            order[j] = q
                            j -= 1
                        else:
                            break
                    order[j] = k
                for i in range(free, nc):
                    chosen[order[i]] = False
            # seeds: farthest from the centre, then farthest from that (lowest index on ties)
            for k in range(nb):
                best[k] = np.float32(-1.0)
            for p in range(N):
                k = labels[p]
                if chosen[k] and d2[p] > best[k]:
                    best[k] = d2[p]
                    arg[k] = p
            for k in range(nb):
                if chosen[k]:
                    ca[k, 0], ca[k, 1], ca[k, 2] = x[arg[k], 0], x[arg[k], 1], x[arg[k], 2]
                    best[k] = np.float32(-1.0)
            for p in range(N):
                k = labels[p]
                if chosen[k]:
                    e0 = x[p, 0] - ca[k, 0]
                    e1 = x[p, 1] - ca[k, 1]
                    e2 = x[p, 2] - ca[k, 2]
                    d = (e0 * e0 + e1 * e1) + e2 * e2
                    if d > best[k]:
                        best[k] = d
                        arg[k] = p
            any_moving = False
            for k in range(nb):
                moving[k] = chosen[k]
                any_moving = any_moving or chosen[k]
                if chosen[k]:
                    cb[k, 0], cb[k, 1], cb[k, 2] = x[arg[k], 0], x[arg[k], 1], x[arg[k], 2]
            # Lloyd, every chosen ball at once, until each one stops
            it = 0
            while any_moving:
                for k in range(nb):
                    if moving[k]:
                        na[k] = nbb[k] = 0
                        sa[k, 0] = sa[k, 1] = sa[k, 2] = np.float32(0.0)
                        sb[k, 0] = sb[k, 1] = sb[k, 2] = np.float32(0.0)
                for p in range(N):
                    k = labels[p]
                    if moving[k]:
                        x0, x1, x2 = x[p, 0], x[p, 1], x[p, 2]
                        e0, e1, e2 = x0 - ca[k, 0], x1 - ca[k, 1], x2 - ca[k, 2]
                        g0, g1, g2 = x0 - cb[k, 0], x1 - cb[k, 1], x2 - cb[k, 2]
                        b = (g0 * g0 + g1 * g1) + g2 * g2 < (e0 * e0 + e1 * e1) + e2 * e2
                        side[p] = b
                        if b:
                            nbb[k] += 1
                            sb[k, 0] += x0
                            sb[k, 1] += x1
                            sb[k, 2] += x2
                        else:
                            na[k] += 1
                            sa[k, 0] += x0
                            sa[k, 1] += x1
                            sa[k, 2] += x2
                it += 1
                any_moving = False
                for k in range(nb):
                    if not moving[k]:
                        continue
                    if na[k] == 0 or nbb[k] == 0:
                        moving[k] = False
                        continue
                    fa, fb = np.float32(na[k]), np.float32(nbb[k])
                    moved = False
                    for f in range(3):
                        ma, mb = sa[k, f] / fa, sb[k, f] / fb
                        if ma != ca[k, f] or mb != cb[k, f]:
                            moved = True
                        ca[k, f] = ma
                        cb[k, f] = mb
                    moving[k] = moved and it < kmeans_iters
                    any_moving = any_moving or moving[k]
            # side B of every ball that split takes the next id, parents in id order
            n_split = 0
            for k in range(nb):
                newid[k] = -1
                if chosen[k]:
                    if na[k] == 0 or nbb[k] == 0:
                        open_[k] = False  # cannot split: kept as it is
                    else:
                        newid[k] = nb + n_split
                        open_[nb + n_split] = True
                        n_split += 1
            if n_split == 0:
                break
            for p in range(N):
                k = labels[p]
                if newid[k] >= 0 and side[p]:
                    labels[p] = newid[k]
            nb += n_split
        return labels, nb, saturated

    _NUMBA_REF = cluster
    return cluster


_NUMBA_REF = None


def numba_reference_cluster(image_HWC, threshold, purity, capacity=256, kmeans_iters=20):
    """The compiled-loop reference: one image, flat arrays, a plain loop, one thread.

    The same algorithm and choices as gbjax (and :func:`lean_reference_cluster`),
    as a performance engineer would write it for one image: numba, float32,
    per-ball accumulators indexed by a flat label array, every open ball's
    purity test in two passes over the pixels, every chosen ball's Lloyd steps
    in one pass per step. Partition only (no statistics, no noise painting):
    the floor a CPU implementation of GB can be measured against. Colour
    features of a 3-channel integer image. Returns (labels (H*W,), n_balls,
    saturated).
    """
    x = np.ascontiguousarray(image_HWC.reshape(-1, 3), dtype=np.float32)
    lab, n, sat = _numba_reference()(x, threshold, purity, capacity, kmeans_iters)
    return lab, int(n), bool(sat)


# ---------------------------------------------------------------------------- images
def synthetic_photo(h, w, seed):
    """A smooth shaded image with a dozen sharp-edged shapes and mild noise (uint8)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / h, xx / w
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        f = rng.uniform(0.5, 3.0, 4)
        p = rng.uniform(0, 2 * np.pi, 4)
        img[..., c] = 128 + 40 * np.cos(2 * np.pi * f[0] * xx + p[0]) * np.cos(
            2 * np.pi * f[1] * yy + p[1]
        )
    for _ in range(12):
        cy, cx, ry, rx = rng.uniform(0, 1, 2).tolist() + rng.uniform(0.05, 0.3, 2).tolist()
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        shade = 1 + 0.25 * (yy - cy) / ry  # a shaded, not flat, object
        img[mask] = np.clip(colour * shade[mask, None], 0, 255)
    img += rng.normal(0, 3, img.shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def photos(h, w, count):
    """``count`` photos of shape (h, w, 3): scikit-image's bundled ones, else synthetic."""
    try:
        import skimage.data
        from skimage.transform import resize
    except ImportError:
        return np.stack([synthetic_photo(h, w, s) for s in range(count)]), "synthetic"
    names = [
        "astronaut",
        "coffee",
        "rocket",
        "chelsea",
        "immunohistochemistry",
        "hubble_deep_field",
    ]
    out = []
    for name in names[:count]:
        im = getattr(skimage.data, name)()[..., :3]
        im = resize(im, (h, w), order=1, anti_aliasing=True, preserve_range=True)
        out.append(np.clip(np.round(im), 0, 255).astype(np.uint8))
    out += [synthetic_photo(h, w, s) for s in range(count - len(out))]
    return np.stack(out), "scikit-image photos (resized)" + (
        ", synthetic" if count > len(names) else ""
    )


# ---------------------------------------------------------------------------- timing
def time_gbjax(x, threshold, chunk_size=None, repeats=2, capacity=256, engine="auto"):
    """Best of ``repeats`` steady-state calls on all of ``x``; compile time is
    the first call's excess over that (same shapes, so the same compilation)."""
    kw = dict(threshold=threshold, chunk_size=chunk_size, capacity=capacity, engine=engine)
    t0 = time.perf_counter()
    jax.block_until_ready(gbjax.gb_cluster(x, **kw))
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = gbjax.gb_cluster(x, **kw)
        jax.block_until_ready(r)
        best = min(best, time.perf_counter() - t0)
    return best, max(first - best, 0.0), r


def interleaved(fns, repeats):
    """Seconds per call of each function, calls interleaved (A B A B ...) after a warm-up."""
    for f in fns.values():
        jax.block_until_ready(f())
    out = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            out[k].append(time.perf_counter() - t0)
    return out


def time_numba_reference(images, threshold, repeats):
    """Best of ``repeats`` passes of the compiled-loop reference over ``images``
    (after a warm-up call, which compiles it or loads it from numba's cache)."""
    numba_reference_cluster(images[0], threshold, 0.9)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = [numba_reference_cluster(im, threshold, 0.9) for im in images]
        best = min(best, time.perf_counter() - t0)
    return best, res


def _per_image(a, b):
    """Pairs of per-image GBResults of two batch results."""
    a = [np.asarray(v) for v in a]
    b = [np.asarray(v) for v in b]
    for i in range(len(a[0])):
        yield (
            gbjax.GBResult(*(v[i] for v in a)),
            gbjax.GBResult(*(v[i] for v in b)),
        )


def same_gbresult(a, b):
    """Every field equal, radii to 1e-4 (XLA:CPU may round its sums by an ulp)."""
    for name, u, v in zip(a._fields, a, b):
        u, v = np.asarray(u), np.asarray(v)
        if name == "radii":
            if not np.allclose(u, v, rtol=1e-6, atol=1e-4):
                return False
        elif not np.array_equal(u, v):
            return False
    return True


def time_lean(images, threshold):
    t0 = time.perf_counter()
    res = [lean_reference_cluster(im, threshold, 0.9) for im in images]
    return time.perf_counter() - t0, res


# ---------------------------------------------------------------------------- parts
def single_scale(x, args):
    rows = []
    dev = jax.devices()[0]
    default_engine = gbjax.gb._resolve_engine("auto")
    for t in args.thresholds:
        sec, comp, r = time_gbjax(x, t, args.chunk_size, args.repeats)
        nb, sat = np.asarray(r.n_balls), np.asarray(r.saturated)
        row = dict(
            threshold=t,
            engine=default_engine,
            gbjax_ms_per_image=1e3 * sec / len(x),
            gbjax_images_per_s=len(x) / sec,
            compile_s=comp,
            gbjax_balls_mean=float(nb.mean()),
            gbjax_balls_max=int(nb.max()),
            saturated=int(sat.sum()),
        )
        if default_engine != "xla":
            xsec, xcomp, xr = time_gbjax(x, t, args.chunk_size, args.repeats, engine="xla")
            row.update(
                xla_ms_per_image=1e3 * xsec / len(x),
                xla_compile_s=xcomp,
                xla_same_as_default=f"{sum(same_gbresult(*ab) for ab in _per_image(xr, r))}"
                f"/{len(x)}",
            )
            if args.one_thread:
                import numba

                n_threads = numba.get_num_threads()
                numba.set_num_threads(1)
                try:
                    row["numba_1thread_ms_per_image"] = (
                        1e3 * time_gbjax(x, t, args.chunk_size, args.repeats)[0] / len(x)
                    )
                finally:
                    numba.set_num_threads(n_threads)
        else:
            xsec, xr = sec, r
            row["xla_ms_per_image"] = row["gbjax_ms_per_image"]
        if args.compiled_ref:
            csec, cres = time_numba_reference(x, t, args.repeats)
            labels = np.asarray(r.labels).reshape(len(x), -1)
            xlabels = np.asarray(xr.labels).reshape(len(x), -1)
            xnb, xsat = np.asarray(xr.n_balls), np.asarray(xr.saturated)
            row.update(
                compiled_ref_ms_per_image=1e3 * csec / len(x),
                compiled_ref_same_as_default=f"{sum(np.array_equal(lab, labels[i]) and n == nb[i] and s == sat[i] for i, (lab, n, s) in enumerate(cres))}/{len(x)}",  # noqa: E501
                compiled_ref_same_as_xla=f"{sum(np.array_equal(lab, xlabels[i]) and n == xnb[i] and s == xsat[i] for i, (lab, n, s) in enumerate(cres))}/{len(x)}",  # noqa: E501
                ratio_ref_over_default=csec / sec,
                ratio_ref_over_xla=csec / xsec,
            )
            if "numba_1thread_ms_per_image" in row:
                row["ratio_ref_over_1thread"] = (
                    row["compiled_ref_ms_per_image"] / row["numba_1thread_ms_per_image"]
                )
        if args.n_ref > 0:
            ref = x[: args.n_ref]
            # Same-process warm-up (imports, caches), then timed.
            lean_reference_cluster(ref[0], t, 0.9)
            lsec, lres = time_lean(ref, t)
            lean_time_per_image = lsec / len(ref)
            labels = np.asarray(r.labels[: len(ref)]).reshape(len(ref), -1)
            same = sum(
                np.array_equal(lab, g) and n == int(nb[i]) and s == bool(sat[i])
                for i, ((lab, n, s), g) in enumerate(zip(lres, labels))
            )
            row.update(
                lean_ms_per_image=1e3 * lean_time_per_image,
                lean_balls_mean=float(np.mean([n for _, n, _ in lres])),
                lean_same_as_gbjax=f"{same}/{len(ref)}",
                speedup_vs_lean=lean_time_per_image / (sec / len(x)),
            )
        if args.n_sklearn > 0:
            ref = x[: args.n_sklearn]
            from threadpoolctl import threadpool_limits

            # One BLAS/OpenMP thread: scikit-learn's default thread pool makes
            # these tiny 2-means calls ~10x slower, which would flatter gbjax.
            with threadpool_limits(1):
                reference_cluster(ref[0], t, 0.9)  # warm-up: imports, thread pools
                t0 = time.perf_counter()
                rb = [reference_cluster(im, t, 0.9) for im in ref]
                rsec = time.perf_counter() - t0
            row.update(
                sklearn_ms_per_image=1e3 * rsec / len(ref),
                sklearn_balls_mean=float(np.mean(rb)),
                speedup_vs_sklearn=(rsec / len(ref)) / (sec / len(x)),
            )
        if dev.platform != "cpu":
            stats = dev.memory_stats() or {}
            row["peak_device_bytes"] = stats.get("peak_bytes_in_use")
        rows.append(row)

    if any("compiled_ref_ms_per_image" in r for r in rows):
        print(
            "compiled-loop reference (numba, one image per call, one thread) against gb_cluster,"
            f" same {len(x)} images, same run (ratio = reference ms / gb_cluster ms):"
        )
        print(
            f"{'thr':>4} {'ref ms/img':>10} {'default ms/img':>14} {'ratio':>6}"
            f" {'xla ms/img':>10} {'ratio':>6} {'1-thread ms/img':>15} {'ratio':>6}"
            f" {'same ref=def':>12} {'ref=xla':>9} {'def=xla':>9}"
        )
        for r in rows:
            one = r.get("numba_1thread_ms_per_image")
            r1 = r.get("ratio_ref_over_1thread")
            print(
                f"{r['threshold']:4.0f} {r['compiled_ref_ms_per_image']:10.4f}"
                f" {r['gbjax_ms_per_image']:14.4f} {r['ratio_ref_over_default']:6.2f}"
                f" {r['xla_ms_per_image']:10.4f} {r['ratio_ref_over_xla']:6.2f}"
                f" {'-' if one is None else f'{one:.4f}':>15}"
                f" {'-' if r1 is None else f'{r1:.2f}':>6}"
                f" {r['compiled_ref_same_as_default']:>12} {r['compiled_ref_same_as_xla']:>9}"
                f" {r.get('xla_same_as_default', '-'):>9}"
            )
        print(
            f"(default: gb_cluster's default engine here, {rows[0]['engine']!r}; xla:"
            " engine='xla'; 1-thread: the default engine with numba.set_num_threads(1); same:"
            " identical partitions, ids, n_balls and saturated (ref) or every GBResult field"
            " (def=xla, radii to 1e-4))"
        )
        head = [r for r in rows if r["threshold"] == HEADLINE_THRESHOLD]
        if head:
            print(
                f"HEADLINE: compiled-loop reference / gb_cluster = "
                f"{head[0]['ratio_ref_over_default']:.2f} at threshold {HEADLINE_THRESHOLD:g}"
                f" (default engine {rows[0]['engine']!r}; XLA engine"
                f" {head[0]['ratio_ref_over_xla']:.2f}; goal >= 1.0)\n"
            )
    print(
        f"{'thr':>4} {'gbjax ms/img':>12} {'img/s':>7} {'compile s':>9} {'balls':>10}"
        f" {'lean ms/img':>11} {'vs lean':>8} {'same':>7} {'sklearn ms/img':>14} {'vs sklearn':>10}"
    )
    for r in rows:
        line = (
            f"{r['threshold']:4.0f} {r['gbjax_ms_per_image']:12.3f} {r['gbjax_images_per_s']:7.0f}"
            f" {r['compile_s']:9.2f} {r['gbjax_balls_mean']:5.1f}/{r['gbjax_balls_max']:<4d}"
        )
        line += (
            f" {r['lean_ms_per_image']:11.2f} {r['speedup_vs_lean']:7.1f}x"
            f" {r['lean_same_as_gbjax']:>7}"
            if "lean_ms_per_image" in r
            else f" {'-':>11} {'-':>8} {'-':>7}"
        )
        line += (
            f" {r['sklearn_ms_per_image']:14.2f} {r['speedup_vs_sklearn']:9.1f}x"
            if "sklearn_ms_per_image" in r
            else ""
        )
        print(line)
    print(
        "(balls: gbjax mean/max per image; vs X = X's ms/img / gbjax ms/img, same run; same:"
        " lean partitions equal to gbjax's, ids included)"
    )
    if any(r.get("peak_device_bytes") for r in rows):
        print(
            "peak device memory: %.2f GiB"
            % (max(r["peak_device_bytes"] or 0 for r in rows) / 2**30)
        )
    head = [r for r in rows if r["threshold"] == HEADLINE_THRESHOLD and "speedup_vs_lean" in r]
    if head:
        print(
            f"gbjax is {head[0]['speedup_vs_lean']:.1f}x the lean (numpy) per-image reference"
            f" at threshold {HEADLINE_THRESHOLD:g} ({len(x)} images for gbjax,"
            f" {args.n_ref} for the reference; goal >= 100x)"
        )
    return rows


def _best_of(f, repeats):
    jax.block_until_ready(f())  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f())
        best = min(best, time.perf_counter() - t0)
    return best


def profile_xla(x, args):
    """Where the XLA engine's time goes on one chunk (gb_cluster's default of 128
    images on CPU): the split rounds against the final statistics and painting,
    the rounds the chunk runs against each image's own, and the time per round
    (from programs capped at 1, 2, ... rounds; each cap compiles once)."""
    import functools

    import jax.numpy as jnp

    from gbjax import _gb_cpu
    from gbjax import _gb_engine as E

    B = min(128, len(x))
    xb = jnp.asarray(x[:B])
    feats = jax.jit(lambda im: E._features_BNF(im, jnp.float32(1.0), gbjax.Features()))(xb)
    static = dict(K=256, kmeans_iters=20, multilevel=gbjax.gb._multilevel(xb.size // 3))
    paint = jax.jit(
        functools.partial(
            E._paint,
            C=3,
            K=256,
            min_ball_size=2,
            features=gbjax.Features(),
            out_dtype=np.dtype(np.uint8),
        )  # fmt: skip
    )
    fx = np.asarray(feats)
    out = []
    print(f"\nXLA engine profile, one call of {B} images (best of {args.repeats}):")
    print(
        f"{'thr':>4} {'total ms/img':>12} {'rounds ms/img':>13} {'paint ms/img':>12}"
        f" {'chunk rounds':>12} {'mean own rounds':>15} {'kernel ms/img':>13}"
    )
    pu = jnp.float32(0.9)
    labels_fn = jax.jit(functools.partial(E._cluster_labels, max_rounds=256, **static))

    def whole(th):
        return E.cluster_batch(
            xb, th, pu, jnp.float32(1.0), max_rounds=256, min_ball_size=2,
            features=gbjax.Features(), out_dtype=np.dtype(np.uint8), **static,
        )  # fmt: skip

    def kernel_call(t):
        return _gb_cpu.cluster_numpy(
            fx, np.full((B, 1), t, np.float32), np.full(B, 0.9, np.float32), K=256,
            max_rounds=256, kmeans_iters=20, min_ball_size=2,
        )  # fmt: skip

    for t in args.thresholds:
        th = jnp.float32(t)
        total = _best_of(functools.partial(whole, th), args.repeats)
        rounds_s = _best_of(functools.partial(labels_fn, feats, th, pu), args.repeats)
        labels, nb, sat, rounds = labels_fn(feats, th, pu)
        paint_s = _best_of(
            functools.partial(paint, feats, labels, nb, sat, rounds, th, jnp.float32(1.0)),
            args.repeats,
        )
        kernel = _best_of(functools.partial(kernel_call, t), args.repeats)
        r = np.asarray(rounds)
        row = dict(
            threshold=t,
            images=B,
            total_ms_per_image=1e3 * total / B,
            rounds_ms_per_image=1e3 * rounds_s / B,
            paint_ms_per_image=1e3 * paint_s / B,
            chunk_rounds=int(r.max()),
            mean_image_rounds=float(r.mean()),
            kernel_ms_per_image=1e3 * kernel / B,
        )
        out.append(row)
        print(
            f"{t:4.0f} {row['total_ms_per_image']:12.4f} {row['rounds_ms_per_image']:13.4f}"
            f" {row['paint_ms_per_image']:12.4f} {row['chunk_rounds']:12d}"
            f" {row['mean_image_rounds']:15.2f} {row['kernel_ms_per_image']:13.4f}"
        )
    th = jnp.float32(HEADLINE_THRESHOLD)
    text = (
        E.cluster_batch.lower(
            xb,
            th,
            pu,
            jnp.float32(1.0),
            max_rounds=256,
            min_ball_size=2,
            features=gbjax.Features(),
            out_dtype=np.dtype(np.uint8),
            **static,
        )  # fmt: skip
        .compile()
        .as_text()
    )
    ops = _trace_ops(functools.partial(whole, th), text, B)
    print(
        "(total: the whole program; rounds: the split rounds alone; paint: the final statistics,"
        " noise search and painting alone; chunk rounds: rounds the call runs, those of its"
        " slowest image; kernel: the numba kernel on the same images, threads as configured)"
    )
    return dict(thresholds=out, ops_at_headline_threshold=ops)


def _trace_ops(fn, text, B):
    """One call of ``fn`` (the XLA program) under ``jax.profiler``: the time of its
    XLA:CPU thunks (leaf operations; loops and branches excluded, their bodies
    counted), grouped by where they run (the split rounds' loop, the 2-means
    loop nested in it, or outside both) and by kind of operation. ``text``: the
    program's optimised HLO, which names the thunks."""
    import collections
    import glob
    import gzip
    import re
    import tempfile

    jax.block_until_ready(fn())
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready(fn())
        paths = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
        if not paths:
            print("(no profiler trace written: per-op profile skipped)")
            return None
        with gzip.open(paths[0]) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    info = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\(.*?op_name=\"([^\"]+)\"",
                         text, re.M):  # fmt: skip
        info[m.group(1)] = (m.group(2), m.group(3))
    by = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name not in info:
            continue
        opcode, op_name = info[name]
        if opcode in ("while", "conditional", "call"):
            continue
        depth = op_name.count("while/body")
        where = ("outside the loops", "split rounds", "2-means (Lloyd) steps")[min(depth, 2)]
        kind = "scatter (segment sums)" if "scatter" in name else (
            "gather" if "gather" in name else "sort" if "sort" in name else
            "reduce" if "reduce" in name else "elementwise and other")  # fmt: skip
        by[(where, kind)] += e.get("dur", 0)
    total = sum(by.values())
    rows = [
        dict(where=w, kind=k, ms_per_image=v / 1e3 / B, share=v / total)
        for (w, k), v in by.most_common()
    ]
    print(
        f"XLA:CPU operations of one call at threshold {HEADLINE_THRESHOLD:g} (jax.profiler;"
        f" leaf thunks, {total / 1e3 / B:.4f} ms per image in all):"
    )
    for r in rows:
        print(
            f"  {r['where']:<24} {r['kind']:<24} {r['ms_per_image']:8.4f} ms/img {r['share']:6.1%}"
        )
    return rows


def multiscale(x, args):
    ths = (40.0, 20.0, 10.0)
    kw = dict(chunk_size=args.chunk_size, engine=args.engine)
    t = interleaved(
        {
            "three gb_cluster calls": lambda: [gbjax.gb_cluster(x, threshold=v, **kw) for v in ths],
            "gb_multiscale": lambda: gbjax.gb_multiscale(x, thresholds=ths, **kw),
        },
        args.repeats + 1,
    )
    a, b = np.array(t["three gb_cluster calls"]), np.array(t["gb_multiscale"])
    row = dict(
        images=len(x),
        three_calls_ms_per_image=1e3 * a.min() / len(x),
        multiscale_ms_per_image=1e3 * b.min() / len(x),
        ratio_of_best=float(b.min() / a.min()),
        median_ratio=float(np.median(b / a)),
    )
    print(
        f"\nmultiscale (40, 20, 10) on {len(x)} images: three gb_cluster calls"
        f" {row['three_calls_ms_per_image']:.3f} ms/img, gb_multiscale (one pass)"
        f" {row['multiscale_ms_per_image']:.3f} ms/img: {row['ratio_of_best']:.2f}x"
        f" (median of interleaved pairs {row['median_ratio']:.2f}x; goal <= 0.6x)"
    )
    return row


def photo_sized(args):
    rows = []
    t = HEADLINE_THRESHOLD
    print(f"\nphoto-sized images, threshold {t:g}, capacity='auto':")
    for h, w in ((512, 512), (768, 1024)):
        x, kind = photos(h, w, args.photos)
        mp = h * w / 1e6
        kw = dict(threshold=t, capacity="auto", chunk_size=args.chunk_size, engine=args.engine)
        t0 = time.perf_counter()
        r = jax.block_until_ready(gbjax.gb_cluster(x, **kw))
        first = time.perf_counter() - t0
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            r = jax.block_until_ready(gbjax.gb_cluster(x, **kw))
            best = min(best, time.perf_counter() - t0)
        nb = np.asarray(r.n_balls)
        row = dict(
            size=f"{h}x{w}",
            images=len(x),
            kind=kind,
            gbjax_s_per_megapixel=best / len(x) / mp,
            first_call_s=first,
            balls_mean=float(nb.mean()),
            balls_max=int(nb.max()),
            over_256=int((nb > 256).sum()),
            capacity_used=int(r.centers.shape[1]),
            saturated_after_auto=int(np.asarray(r.saturated).sum()),
        )
        if args.n_ref > 0:
            lsec, lres = time_lean(x[:1], t)
            row["lean_s_per_megapixel"] = lsec / mp
            row["speedup_vs_lean"] = row["lean_s_per_megapixel"] / row["gbjax_s_per_megapixel"]
        rows.append(row)
        print(
            f"  {row['size']:>9} x{len(x)} ({kind}): gbjax {row['gbjax_s_per_megapixel']:.3f}"
            f" s/MP (first call, with compilation: {first:.1f} s), balls"
            f" {row['balls_mean']:.0f}/{row['balls_max']}, {row['over_256']} of {len(x)}"
            f" saturate at 256 (capacity used {row['capacity_used']}, still saturated"
            f" {row['saturated_after_auto']})"
            + (
                f"; lean reference {row['lean_s_per_megapixel']:.2f} s/MP (1 image):"
                f" {row['speedup_vs_lean']:.1f}x"
                if "lean_s_per_megapixel" in row
                else ""
            )
        )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-dir", default=os.environ.get("GBJAX_DATA_DIR"))
    p.add_argument("--n", type=int, default=1024, help="CIFAR-10 images for gbjax")
    p.add_argument("--n-ref", type=int, default=64, help="images for the lean reference (0: skip)")
    p.add_argument(
        "--n-sklearn", type=int, default=16, help="images for the scikit-learn reference (0: skip)"
    )
    p.add_argument("--thresholds", type=float, nargs="+", default=[40.0, 20.0, 10.0])
    p.add_argument("--repeats", type=int, default=2, help="timed calls (best is reported)")
    p.add_argument("--photos", type=int, default=4, help="photos per size (0: skip)")
    p.add_argument("--no-multiscale", action="store_true", help="skip the multiscale part")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="images per compiled call (default: gb_cluster's choice)",
    )
    p.add_argument(
        "--no-compiled-ref",
        dest="compiled_ref",
        action="store_false",
        help="skip the compiled-loop (numba) reference",
    )
    p.add_argument(
        "--no-one-thread",
        dest="one_thread",
        action="store_false",
        help="skip timing the numba engine on one thread",
    )
    p.add_argument(
        "--engine", default="auto", help="gb_cluster's engine for the multiscale and photo parts"
    )
    p.add_argument(
        "--profile-xla",
        action="store_true",
        help="also profile the XLA engine on one chunk (rounds, painting, time per round)",
    )
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    x, _ = data.load("cifar10", "test", data_dir=args.data_dir)
    if not 1 <= args.n <= len(x):
        p.error(f"--n must be in [1, {len(x)}], got {args.n}")
    # A fixed random subset: image folders (ours included) are sorted by class,
    # and the first N images would all be airplanes.
    x = np.asarray(x[np.sort(np.random.default_rng(0).permutation(len(x))[: args.n])])
    args.n_ref, args.n_sklearn = min(args.n_ref, len(x)), min(args.n_sklearn, len(x))
    dev = jax.devices()[0]
    print(
        f"device: {dev.platform} {dev.device_kind} x{jax.device_count()}, "
        f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"jax {jax.__version__}"
    )
    print(
        f"gbjax on {len(x)} CIFAR-10 test images, lean reference on {args.n_ref},"
        f" scikit-learn reference on {args.n_sklearn}\n"
    )
    out = dict(single_scale=single_scale(x, args))
    if args.profile_xla:
        out["profile_xla"] = profile_xla(x, args)
    if not args.no_multiscale:
        out["multiscale"] = multiscale(x, args)
    if args.photos > 0:
        out["photos"] = photo_sized(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
