"""Compile time of random draws: ``jax.random`` against ``gbjax._random`` (same values).

    python benchmarks/random_compile.py            # about 20 s on 2 CPU cores

For each draw the package makes, it compiles the shaped ``jax.random`` draw and
``gbjax._random``'s one-axis draw in turn, ``--repeats`` times each with JAX's caches
cleared in between (no persistent cache), checks that they return the same values,
and prints the median compile seconds and their ratio. Then the same for an 8-query
Square chunk on a small MLP with the queries' draws made one by one against at once
(``gbjax.attacks.square``). Compilation time is a CPU figure; on a GPU it was not
measured.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from gbjax import _random

B = (256, 32, 32, 3)  # a CIFAR-10 attack batch
DRAWS = {
    "uniform start (PGD, APGD, N-FGSM)": (
        lambda k: jax.random.uniform(k, B, jnp.float32, -1.0, 1.0),
        lambda k: _random.uniform(k, B, jnp.float32, -1.0, 1.0),
    ),
    "normal (Gaussian noise)": (
        lambda k: jax.random.normal(k, B),
        lambda k: _random.normal(k, B),
    ),
    "bernoulli sign mask (Square start)": (
        lambda k: jax.random.bernoulli(k, 0.5, (256, 1, 32, 3)),
        lambda k: _random.bernoulli(k, 0.5, (256, 1, 32, 3)),
    ),
    "randint crop offsets (augmentation)": (
        lambda k: jax.random.randint(k, (1024, 2), 0, 5),
        lambda k: _random.randint(k, (1024, 2), 0, 5),
    ),
}


def compile_seconds(fun, *args, repeats):
    times = []
    for _ in range(repeats):
        jax.clear_caches()
        lowered = jax.jit(lambda *a: fun(*a)).lower(*args)  # a new function each time
        t = time.perf_counter()
        lowered.compile()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def square_chunk(n, *, at_once, repeats):
    """Compile seconds of an ``n``-query Square chunk on a 48-image MLP."""
    square = importlib.import_module("gbjax.attacks.square")
    w = jax.random.normal(jax.random.key(5), (16, 3))

    def fn(v):
        return jnp.round(v.reshape(v.shape[0], -1) * 4) / 4 @ w

    x = jax.random.uniform(jax.random.key(6), (48, 4, 4, 1))
    y = jnp.argmax(fn(x), -1).astype(jnp.int32)
    args = (x, y, x, jnp.ones(48), jax.random.key(0), jnp.float32(0.25), 1, 300, 0.8, 0.0, 1.0)

    def run(*a):
        if at_once:
            return square._queries.__wrapped__(fn, *a, n=n)
        return _one_by_one(square, fn, *a, n=n)

    return compile_seconds(run, *args, repeats=repeats)


def _one_by_one(square, fn, x, y, x_best, margin, key, eps, i0, queries, p_init, lo, hi, *, n):
    """``square._queries`` as it was before 17bc9cd: each query draws its own."""
    b, h, w, c = x.shape
    rows = jnp.arange(h)[None, :, None, None]
    cols = jnp.arange(w)[None, None, :, None]
    for j in range(n):
        i = i0 + j
        side, vh, vw, sign = square._draws(key, i, queries, p_init, x.shape)
        vh, vw = vh[:, None, None, None], vw[:, None, None, None]
        mask = (rows >= vh) & (rows < vh + side) & (cols >= vw) & (cols < vw + side)
        delta = x_best - x
        cand = jnp.clip(x + jnp.where(mask, eps * sign, delta), lo, hi)
        same = jnp.all(jnp.where(mask, jnp.abs(cand - x_best) < 1e-7, True), axis=(1, 2, 3))
        flipped = jnp.clip(x + jnp.where(mask, -eps * sign, delta), lo, hi)
        cand = jnp.where(same[:, None, None, None], flipped, cand).astype(x.dtype)
        m = square.margins(fn, cand, y)
        better = (i < queries) & (margin > 0) & (m < margin)
        x_best = jnp.where(better[:, None, None, None], cand, x_best)
        margin = jnp.where(better, m, margin)
    return x_best, margin


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    key = jax.random.key(0)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; median of {args.repeats}")
    print(f"{'draw':40s} {'jax.random s':>13s} {'one axis s':>11s} {'ratio':>6s}  same values")
    for name, (shaped, flat) in DRAWS.items():
        same = bool(np.array_equal(jax.jit(shaped)(key), jax.jit(flat)(key)))
        a = compile_seconds(shaped, key, repeats=args.repeats)
        b = compile_seconds(flat, key, repeats=args.repeats)
        print(f"{name:40s} {a:13.3f} {b:11.3f} {a / b:5.1f}x  {same}")
    a = square_chunk(8, at_once=False, repeats=args.repeats)
    b = square_chunk(8, at_once=True, repeats=args.repeats)
    name = "Square chunk, 8 queries (MLP)"
    print(f"{name:40s} {a:13.3f} {b:11.3f} {a / b:5.1f}x  (one by one / at once)")


if __name__ == "__main__":
    main()
