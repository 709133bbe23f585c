"""Command line: ``python -m gbjax denoise IN... -o OUTDIR``.

Clusters image files (PNG/JPEG, or folders of them, searched recursively) with
granular balls and writes the painted images; ``--compare`` also writes the GB
paper's Figures 3 and 4 side by side for each image: the original, k-means
colour quantisation with k = 2, 10, 50, and GB at thresholds 40, 20, 10.

A file that cannot be read is reported with its reason and skipped; the exit
status is then 1 (``--fail-fast`` stops at the first one instead). 16-bit
greyscale PNGs are clustered and written at 16 bits (thresholds stay in 8-bit
pixel units); 16-bit colour PNGs are read at 8 bits, with a warning. Images
that fill the ball capacity are counted and reported; ``--capacity auto``
grows the capacity for them.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def _collect(inputs):
    """(source path, output relative path) pairs; folders are searched recursively."""
    found = []
    for arg in inputs:
        p = Path(arg)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise SystemExit(f"error: no PNG/JPEG files under folder {p}")
            found += [(f, Path(p.name) / f.relative_to(p)) for f in files]
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise SystemExit(f"error: {p}: not a PNG/JPEG file")
            found.append((p, Path(p.name)))
        else:
            raise SystemExit(f"error: {p}: no such file or folder")
    return found


class ReadError(Exception):
    """An input image that cannot be used, with the reason."""


def _png_bit_depth(path) -> int | None:
    with open(path, "rb") as f:
        head = f.read(26)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return head[24]
    return None


def _read(path):
    """``(image HWC, warning or None)``: uint8, or float32 in 0..255 pixel units for
    16-bit greyscale (precision kept). Raises :class:`ReadError`."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im, np.float64)
                if a.max() > 65535 or a.min() < 0:
                    raise ReadError(f"unsupported integer image range {a.min()}..{a.max()}")
                return (a / 257.0).astype(np.float32)[..., None], None
            grey = im.mode in ("L", "1", "LA")
            a = np.asarray(im.convert("L" if grey else "RGB"))
    except ReadError:
        raise
    except Exception as e:  # unreadable, truncated, not an image
        raise ReadError(str(e) or type(e).__name__) from e
    warning = None
    if path.suffix.lower() == ".png" and _png_bit_depth(path) == 16:
        warning = "16-bit colour PNG read at 8 bits per channel (precision dropped)"
    return (a[..., None] if a.ndim == 2 else a), warning


def _write(path, img_HWC):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = img_HWC[..., 0] if img_HWC.shape[-1] == 1 else img_HWC
    if np.issubdtype(img.dtype, np.floating):  # 16-bit greyscale in 0..255 units
        img = np.clip(np.round(img * 257.0), 0, 65535).astype(np.uint16)
    Image.fromarray(img).save(path)


def compare_figure(image_HWC, path, *, purity=0.9, seed=0, **gb_kwargs):
    """Original | k-means k=2,10,50 | GB thresholds 40,20,10, saved as one PNG."""
    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gbjax._kmeans import kmeans_quantize
    from gbjax.gb import gb_multiscale

    keys = jax.random.split(jax.random.key(seed), 3)
    panels = [("original", image_HWC)]
    panels += [
        (f"k-means k={k}", kmeans_quantize(image_HWC, k, key=kk))
        for k, kk in zip((2, 10, 50), keys)
    ]
    ms = gb_multiscale(image_HWC, thresholds=(40, 20, 10), purity=purity, **gb_kwargs)
    panels += [
        (f"GB t={t} ({int(n)} balls)", np.asarray(im))
        for t, im, n in zip((40, 20, 10), ms.image, ms.n_balls)
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.6))
    for ax, (title, im) in zip(axes, panels):
        ax.imshow(
            im[..., 0] if im.shape[-1] == 1 else im,
            cmap="gray",
            vmin=0,
            vmax=255,
            interpolation="nearest",
        )
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _denoise(args):
    from tqdm.auto import tqdm

    from gbjax.gb import Features, gb_cluster

    files = _collect(args.inputs)
    out = Path(args.output)
    capacity = args.capacity if args.capacity == "auto" else int(args.capacity)
    kw = dict(
        threshold=args.threshold,
        purity=args.purity,
        capacity=capacity,
        min_ball_size=args.min_ball_size,
        features=Features(spatial=args.spatial, texture=args.texture),
    )
    gb_cluster(np.zeros((2, 2, 3), np.uint8), **kw)  # validate the options before any work

    # Same-shape images are clustered together: one compilation per shape.
    groups, failed, saturated, written = defaultdict(list), [], 0, 0
    for src, rel in files:
        try:
            img, warning = _read(src)
        except ReadError as e:
            failed.append((src, str(e)))
            print(f"error: cannot read image {src}: {e}", file=sys.stderr)
            if args.fail_fast:
                return 1
            continue
        if warning:
            print(f"warning: {src}: {warning}", file=sys.stderr)
        groups[(img.shape, img.dtype.str)].append((img, rel))
    with tqdm(total=len(files), desc="gb denoise", unit="img", disable=args.quiet) as bar:
        bar.update(len(failed))
        for items in groups.values():
            for s in range(0, len(items), args.batch_size):
                chunk = items[s : s + args.batch_size]
                res = gb_cluster(np.stack([im for im, _ in chunk]), **kw)
                painted = np.asarray(res.image)
                saturated += int(np.sum(np.asarray(res.saturated)))
                for (img, rel), p, n in zip(chunk, painted, np.asarray(res.n_balls)):
                    _write(out / rel.with_name(rel.stem + "_gb.png"), p)
                    written += 1
                    if args.compare:
                        compare_figure(
                            np.clip(np.round(img), 0, 255).astype(np.uint8),
                            out / rel.with_name(rel.stem + "_compare.png"),
                            purity=args.purity,
                            capacity=args.capacity if args.capacity != "auto" else 256,
                            min_ball_size=args.min_ball_size,
                            features=kw["features"],
                        )
                    bar.set_postfix(balls=int(n))
                    bar.update(1)
    if saturated:
        hint = "" if capacity == "auto" else " (try --capacity auto)"
        print(
            f"warning: {saturated} of {written} image(s) filled the {args.capacity} ball slots: "
            f"some regions kept unsplit balls{hint}",
            file=sys.stderr,
        )
    if not args.quiet:
        print(f"wrote {written} image(s) to {out}")
    if failed:
        print(f"{len(failed)} file(s) could not be read:", file=sys.stderr)
        for src, why in failed:
            print(f"  {src}: {why}", file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m gbjax",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("denoise", help="granular-ball clustering of image files")
    d.add_argument("inputs", nargs="+", metavar="IN", help="image files (PNG/JPEG) or folders")
    d.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    d.add_argument("--threshold", type=float, default=20.0, help="pixel units (default 20)")
    d.add_argument("--purity", type=float, default=0.9, help="in (0, 1] (default 0.9)")
    d.add_argument(
        "--capacity",
        default="256",
        type=lambda v: v if v == "auto" else int(v),
        help="ball slots per image (default 256), or 'auto': grow it for images that fill it",
    )
    d.add_argument(
        "--min-ball-size", type=int, default=2, help="smaller balls are noise (default 2)"
    )
    d.add_argument("--spatial", type=float, default=0.0, help="weight of pixel coordinates")
    d.add_argument("--texture", type=float, default=0.0, help="weight of local contrast")
    d.add_argument("--batch-size", type=int, default=256)
    d.add_argument(
        "--compare",
        action="store_true",
        help="also write original | k-means 2,10,50 | GB 40,20,10 figures",
    )
    d.add_argument("--quiet", action="store_true")
    d.add_argument(
        "--fail-fast", action="store_true", help="stop at the first unreadable file (exit 1)"
    )
    args = parser.parse_args(argv)
    try:
        return _denoise(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
