"""Classical defences' throughput: gbjax (jitted, batched) against the reference libraries.

    python benchmarks/defence_throughput.py --data-dir ../shared/data          # the table
    python benchmarks/defence_throughput.py --n 32 --n-ref 8 --rounds 2        # a quick check

For each defence in :mod:`gbjax.defences` (Median 3x3, BitDepth 4 bits, JPEG
quality 75, KMeans k=8 with 20 iterations, TV weight 0.1 with scikit-image's
defaults, GaussianBlur sigma 1) on CIFAR-10-sized images (``--n`` CIFAR-10
test images, a fixed random subset, when ``--data-dir`` / ``$GBJAX_DATA_DIR``
is given, else synthetic smooth images with noise):

* **gbjax**: one jitted call on the whole batch (float32 in [0, 1]); a first
  call compiles (its time is reported apart and excluded), then the median of
  ``--rounds`` timed calls;
* **reference**: the reference library one image at a time, as ART's
  preprocessors do, on the first ``--n-ref`` images, float [0, 1] in and out
  (conversions included), median of ``--rounds`` passes:
  ``scipy.ndimage.median_filter`` / the FeatureSqueezing formula in numpy /
  Pillow ``save(format="JPEG")`` + decode / ``sklearn.cluster.KMeans`` from
  gbjax's initial centres (computed untimed; ``n_init=1``, BLAS and OpenMP pinned to one thread when
  threadpoolctl is available: faster for such small problems) /
  ``skimage.restoration.denoise_tv_chambolle`` / ``scipy.ndimage.gaussian_filter``.

The table gives images/s for both, the same-run ratio (gbjax / reference) and
the largest absolute difference between the two outputs on the reference's
images (on a shared machine only ratios taken in the same run mean anything).
``--json`` writes the rows. Default runtime on a 2-core CPU: about a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from gbjax import data
from gbjax.defences import JPEG, TV, BitDepth, GaussianBlur, KMeans, Median


def synthetic(n, seed=0, h=32, w=32, c=3):
    """Smooth random waves and gradients plus Gaussian noise, uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = np.empty((n, h, w, c), np.uint8)
    for i in range(n):
        f = rng.uniform(0.3, 2, (c, 2))
        base = np.stack(
            [np.sin(2 * np.pi * (f[j, 0] * xx + f[j, 1] * yy)) for j in range(c)], -1
        ) * rng.uniform(40, 100, c) + rng.uniform(60, 200, c)
        out[i] = np.clip(np.round(base + rng.normal(0, 12, (h, w, c))), 0, 255)
    return out


# ------------------------------------------------------------------ references, one image
def ref_median(img):
    from scipy import ndimage

    return ndimage.median_filter(img, size=(3, 3, 1), mode="reflect")


def ref_bitdepth(img):
    return np.rint(img * 15) / 15  # ART FeatureSqueezing(bit_depth=4, clip_values=(0, 1))


def ref_jpeg(img):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(img * 255).astype(np.uint8)).save(buf, format="JPEG", quality=75)
    buf.seek(0)
    return np.asarray(Image.open(buf), np.float32) / 255.0


def ref_kmeans(img, c0):
    from sklearn.cluster import KMeans as SK

    px = img.reshape(-1, img.shape[-1])
    km = SK(n_clusters=8, init=c0, n_init=1, max_iter=20, tol=0.0, algorithm="lloyd").fit(px)
    return km.cluster_centers_[km.labels_].reshape(img.shape).astype(np.float32)


def ref_tv(img):
    from skimage.restoration import denoise_tv_chambolle

    return denoise_tv_chambolle(img, weight=0.1, channel_axis=-1)


def ref_gaussian(img):
    from scipy import ndimage

    return ndimage.gaussian_filter(img, sigma=(1.0, 1.0, 0), mode="reflect")


CASES = {
    "Median(3)": (Median(3), ref_median, "scipy.ndimage.median_filter"),
    "BitDepth(4)": (BitDepth(4), ref_bitdepth, "numpy (ART FeatureSqueezing)"),
    "JPEG(75)": (JPEG(75), ref_jpeg, "Pillow save+decode"),
    "KMeans(8, 20)": (KMeans(8, 20), ref_kmeans, "sklearn KMeans"),
    "TV(0.1)": (TV(0.1), ref_tv, "skimage denoise_tv_chambolle"),
    "GaussianBlur(1)": (GaussianBlur(1.0), ref_gaussian, "scipy.ndimage.gaussian_filter"),
}


def _single_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1)


def time_gbjax(defence, x, rounds):
    f = jax.jit(lambda z: defence(z))
    t0 = time.perf_counter()
    out = jax.block_until_ready(f(x))
    first = time.perf_counter() - t0
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return np.asarray(out), med, max(first - med, 0.0)


def time_reference(ref, images, rounds, extra=None):
    """Median time of ``rounds`` passes of ``ref(image[, extra[i]])`` over ``images``."""
    args = [(img,) if extra is None else (img, e) for img, e in zip(images, extra or images)]
    times = []
    with _single_thread():
        ref(*args[0])  # imports and first-call set-up, untimed
        for _ in range(rounds):
            t0 = time.perf_counter()
            out = [ref(*a) for a in args]
            times.append(time.perf_counter() - t0)
    return np.stack(out), statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-dir", default=os.environ.get("GBJAX_DATA_DIR"))
    p.add_argument("--n", type=int, default=512, help="images per gbjax call")
    p.add_argument("--n-ref", type=int, default=64, help="images for the references")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--defences", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.n < 1 or args.n_ref < 1 or args.rounds < 1:
        p.error("--n, --n-ref and --rounds must be >= 1")

    if args.data_dir:
        x, _ = data.load("cifar10", "test", data_dir=args.data_dir, progress=False)
        if args.n > len(x):
            p.error(f"--n must be at most {len(x)}")
        x = np.asarray(x[np.sort(np.random.default_rng(0).permutation(len(x))[: args.n])])
        source = "CIFAR-10 test"
    else:
        x, source = synthetic(args.n), "synthetic"
    x01 = x.astype(np.float32) / 255.0
    n_ref = min(args.n_ref, args.n)
    dev = jax.devices()[0]
    meta = dict(
        device=f"{dev.platform} {dev.device_kind}",
        host=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        jax=jax.__version__,
        images=source,
        n=args.n,
        n_ref=n_ref,
        rounds=args.rounds,
    )
    print(
        f"device: {meta['device']}, host: {meta['host']}, {meta['cpus']} cpus, jax {meta['jax']}"
        f"\n{args.n} {source} images (32x32x3) per gbjax call, {n_ref} per reference pass,"
        f" median of {args.rounds} rounds; compilation excluded\n"
    )
    head = (
        f"{'defence':<16} {'gbjax img/s':>12} {'compile s':>10} {'reference':<30}"
        f" {'ref img/s':>10} {'ratio':>8} {'max|diff|':>10}"
    )
    print(head + "\n" + "-" * len(head))
    rows = []
    xj = jnp.asarray(x01)
    for name in args.defences:
        defence, ref, ref_name = CASES[name]
        out, sec, compile_s = time_gbjax(defence, xj, args.rounds)
        extra = None
        if isinstance(defence, KMeans):  # sklearn starts from gbjax's initial centres
            extra = list(np.asarray(defence.fit(xj[:n_ref])[0]))
        rout, rsec = time_reference(ref, x01[:n_ref], args.rounds, extra)
        row = dict(
            defence=name,
            gbjax_images_per_s=args.n / sec,
            compile_s=compile_s,
            reference=ref_name,
            reference_images_per_s=n_ref / rsec,
            max_abs_diff=float(np.abs(out[:n_ref] - rout).max()),
        )
        row["ratio"] = row["gbjax_images_per_s"] / row["reference_images_per_s"]
        rows.append(row)
        print(
            f"{name:<16} {row['gbjax_images_per_s']:>12.0f} {compile_s:>10.2f} {ref_name:<30}"
            f" {row['reference_images_per_s']:>10.0f} {row['ratio']:>7.1f}x"
            f" {row['max_abs_diff']:>10.2g}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
