"""Plain numpy granular-ball clustering of one image: the test oracle.

A direct transcription of Algorithm 1 with a Python list of balls, written
independently of ``gbjax.gb`` (no shared code), with the same documented
choices: strict ``distance < threshold``, keep when ``within >= purity``,
2-means seeded at the member farthest from the centre and then the member
farthest from that seed (lowest index on ties), Lloyd until the assignment
repeats or ``kmeans_iters`` assignments, side B appended as a new ball id in
parent order. Arithmetic is float32 like the library's.
"""

from __future__ import annotations

import numpy as np


def _mean(x):
    return (x.sum(axis=0, dtype=np.float32) / np.float32(len(x))).astype(np.float32)


def _sq(x, c):
    d = (x - c).astype(np.float32)
    return (d * d).sum(axis=1, dtype=np.float32)


def _farthest(x, c):
    d = _sq(x, c)
    return int(np.flatnonzero(d == d.max())[0])


def two_means(x, kmeans_iters):
    """Boolean side (True = B) for members x (n, F)."""
    a = x[_farthest(x, _mean(x))]
    b = x[_farthest(x, a)]
    side = np.zeros(len(x), bool)
    for _ in range(kmeans_iters):
        new = _sq(x, b) < _sq(x, a)
        changed = bool(np.any(new != side))
        side = new
        if side.all() or (~side).all():
            break
        a, b = _mean(x[~side]), _mean(x[side])
        if not changed:
            break
    return side


def gb_oracle(features, threshold, purity, *, capacity=256, kmeans_iters=20, max_rounds=None):
    """Clusters (N, F) float32 features. Returns (labels (N,), n_balls, saturated)."""
    x = np.asarray(features, np.float32)
    balls = [np.arange(len(x))]  # ball id -> member pixel indices (ascending)
    frozen = set()
    saturated = False
    max_rounds = capacity if max_rounds is None else max_rounds
    t2 = np.float32(threshold) ** 2
    for _ in range(max_rounds):
        cands = []
        for k, idx in enumerate(balls):
            xs = x[idx]
            within = int(np.sum(_sq(xs, _mean(xs)) < t2))
            frac = np.float32(within) / np.float32(len(idx))
            if len(idx) >= 2 and frac < np.float32(purity) and k not in frozen:
                cands.append((frac, -len(idx), k))
        free = capacity - len(balls)
        if len(cands) > free:
            saturated = True
            cands = sorted(cands)[:free]
        chosen = sorted(k for _, _, k in cands)
        new_balls = []
        for k in chosen:
            idx = balls[k]
            side = two_means(x[idx], kmeans_iters)
            if side.all() or (~side).all():
                frozen.add(k)
                continue
            balls[k] = idx[~side]
            new_balls.append(idx[side])
        balls.extend(new_balls)
        if not new_balls:
            break
    labels = np.empty(len(x), np.int32)
    for k, idx in enumerate(balls):
        labels[idx] = k
    return labels, len(balls), saturated


def same_partition(a, b):
    """True when two label arrays group the pixels identically (up to relabelling)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))
