"""Granular-ball clustering throughput: gbjax vs the usual per-image implementation.

    python benchmarks/gb_throughput.py --data-dir ../shared/data [--n 512] [--n-ref 48]

Clusters N CIFAR-10 test images (a fixed random subset, seed 0: the image
folders are sorted by class) at thresholds 40, 20 and 10 (purity 0.9) and
prints, from one run, the per-image time of gbjax (steady state, best of two
calls after a first, compiling call on the same shapes; compile time reported
separately) and of the reference: the usual
public implementation, a Python list of balls with one scikit-learn 2-means
call per split (KMeans(n_clusters=2, n_init=1, seeded), one thread), timed on the first
``--n-ref`` of the same images; their ratio; and balls per image for both. On a
GPU (``--n 10000``) it also prints images/s and peak device memory.

Expected runtime on a 2-core CPU: about 2 minutes with the defaults.
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


def time_gbjax(x, threshold, chunk_size=None, repeats=2):
    """Best of ``repeats`` steady-state calls on all of ``x``; compile time is
    the first call's excess over that (same shapes, so the same compilation)."""
    kw = dict(threshold=threshold, chunk_size=chunk_size)
    t0 = time.perf_counter()
    jax.block_until_ready(gbjax.gb_cluster(x, **kw))
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = gbjax.gb_cluster(x, **kw)
        jax.block_until_ready(r)
        best = min(best, time.perf_counter() - t0)
    return best, max(first - best, 0.0), np.asarray(r.n_balls), np.asarray(r.saturated)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-dir", default=os.environ.get("GBJAX_DATA_DIR"))
    p.add_argument("--n", type=int, default=512, help="images for gbjax")
    p.add_argument("--n-ref", type=int, default=48, help="images for the reference (0: skip)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[40.0, 20.0, 10.0])
    p.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="images per compiled call (default: gb_cluster's choice)",
    )
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    x, _ = data.load("cifar10", "test", data_dir=args.data_dir)
    if not 1 <= args.n <= len(x):
        p.error(f"--n must be in [1, {len(x)}], got {args.n}")
    # A fixed random subset: image folders (ours included) are sorted by class,
    # and the first N images would all be airplanes.
    x = np.asarray(x[np.sort(np.random.default_rng(0).permutation(len(x))[: args.n])])
    dev = jax.devices()[0]
    print(
        f"device: {dev.platform} {dev.device_kind} x{jax.device_count()}, "
        f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"jax {jax.__version__}"
    )
    print(f"gbjax on {len(x)} CIFAR-10 test images, reference on {min(args.n_ref, len(x))}\n")
    rows = []
    for t in args.thresholds:
        sec, comp, nb, sat = time_gbjax(x, t, args.chunk_size)
        row = dict(
            threshold=t,
            gbjax_ms_per_image=1e3 * sec / len(x),
            gbjax_images_per_s=len(x) / sec,
            compile_s=comp,
            gbjax_balls_mean=float(nb.mean()),
            gbjax_balls_max=int(nb.max()),
            saturated=int(sat.sum()),
        )
        if args.n_ref > 0:
            ref = x[: args.n_ref]
            from threadpoolctl import threadpool_limits

            # One BLAS/OpenMP thread: scikit-learn's default thread pool makes
            # these tiny 2-means calls ~10x slower, which would flatter gbjax.
            with threadpool_limits(1):
                reference_cluster(ref[0], t, 0.9)  # warm-up: imports, thread pools
                t0 = time.perf_counter()
                rb = [reference_cluster(im, t, 0.9) for im in ref]
                rsec = time.perf_counter() - t0
            row.update(
                reference_ms_per_image=1e3 * rsec / len(ref),
                reference_balls_mean=float(np.mean(rb)),
                reference_balls_max=int(np.max(rb)),
                speedup=(rsec / len(ref)) / (sec / len(x)),
            )
        if dev.platform != "cpu":
            stats = dev.memory_stats() or {}
            row["peak_device_bytes"] = stats.get("peak_bytes_in_use")
        rows.append(row)

    hdr = f"{'thr':>5} {'gbjax ms/img':>12} {'img/s':>9} {'compile s':>9} {'balls':>11}"
    hdr += f" {'ref ms/img':>10} {'ref balls':>11} {'speedup':>8}" if args.n_ref > 0 else ""
    print(hdr)
    for r in rows:
        line = (
            f"{r['threshold']:5.0f} {r['gbjax_ms_per_image']:12.3f} {r['gbjax_images_per_s']:9.0f}"
            f" {r['compile_s']:9.2f} {r['gbjax_balls_mean']:6.1f}/{r['gbjax_balls_max']:<4d}"
        )
        if args.n_ref > 0:
            line += (
                f" {r['reference_ms_per_image']:10.2f} {r['reference_balls_mean']:6.1f}/"
                f"{r['reference_balls_max']:<4d} {r['speedup']:7.1f}x"
            )
        print(line)
    if any(r.get("peak_device_bytes") for r in rows):
        print(
            "peak device memory: %.2f GiB"
            % (max(r["peak_device_bytes"] or 0 for r in rows) / 2**30)
        )
    print("(balls: mean/max per image; speedup = reference ms/img / gbjax ms/img, same run)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
