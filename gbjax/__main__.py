"""The ``gbjax`` command line (also ``python -m gbjax``): ``denoise``, ``train``, ``cluster``.

* ``gbjax denoise IN... -o OUTDIR``: granular-ball clustering of image files;
* ``gbjax train --config CFG --workdir DIR``: training, as ``python -m gbjax.train``
  (:func:`gbjax.train.main`);
* ``gbjax cluster DATASET`` (or ``--config CFG``): a data set to its GB-processed
  copy in the cache of :func:`gbjax.data.gb_processed`, which training with
  ``preprocess="gb"`` then reads; with ``--coordinator ... --num-processes N
  --process-id I`` the clustering is split over processes (:mod:`gbjax.distributed`).

Exit status (every subcommand): 0 done; 1 the work failed part-way (an input not
written, a non-finite training loss, a clustering error); 2 refused before any
work (bad options, missing inputs or data, a workdir or output that must not be
used).

``denoise``
-----------
Clusters image files (PNG/JPEG, or folders of them, searched recursively with
symlinked folders followed) with granular balls and writes the painted images
as ``OUTDIR/<relative path>/<stem>_gb.png``; ``--compare`` also writes the GB
paper's Figures 3 and 4 side by side for each image (``<stem>_compare.png``):
the original, k-means colour quantisation with k = 2, 10, 50, and GB at
thresholds 40, 20, 10.

Nothing is lost silently. Inputs of one folder that share a stem (``a.jpg``,
``a.png``) keep their extension in the output name (``a.jpg_gb.png``,
``a.png_gb.png``); inputs that would still share an output name (two ``a.png``
from different folders given as files, or two folders with the same name) are
refused before any work. Existing output files are refused too unless
``--overwrite`` is given, and an output folder that is a file or cannot be
written is refused before anything is read or clustered. Options are checked
by the argument parser (exit status 2).

A file that cannot be read, a folder that cannot be listed, or an image that
cannot be clustered or written is reported with its reason and skipped; the
run ends with the list of every input not written and exit status 1
(``--fail-fast`` stops at the first one instead). 16-bit greyscale PNGs are
clustered and written at 16 bits (thresholds stay in 8-bit pixel units); 16-bit
colour PNGs are read at 8 bits, with a warning. Images that fill the ball
capacity are counted and reported; ``--capacity auto`` grows the capacity for
them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np

# Imported up front, Flax and the trainer included: a fast ``--help`` is not worth
# a hidden import graph (issue 27).
from gbjax import __version__, _files, _kmeans, distributed, gb, train
from gbjax._cli import (
    add_cluster_arguments,
    capacity,
    config_missing,
    fraction,
    non_negative,
    positive_float,
    positive_int,
    run_cluster,
)
from gbjax.data import CorruptDataError, DataNotFoundError
from gbjax.data._decode import walk_tree

# What `denoise` reads and writes back in the same format: a narrower set than the
# loaders' gbjax.data.IMAGE_EXTENSIONS (which also decode BMP, GIF, WebP, PPM/PGM to
# arrays but are not written back here).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


# --------------------------------------------------------------------------- #
# Inputs and output names
# --------------------------------------------------------------------------- #


def _folder_images(root: Path, unreadable: list) -> list[Path]:
    """Image files below ``root`` (symlinked folders followed); folders that cannot be
    listed are appended to ``unreadable`` as ``(path, reason)``."""

    def on_error(err: OSError) -> None:
        unreadable.append((Path(err.filename), f"cannot read folder ({err.strerror or err})"))

    files = []
    for dirpath, _, filenames in walk_tree(str(root), skip_hidden=False, on_error=on_error):
        files += [Path(dirpath) / f for f in filenames if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return files


def _collect(inputs):
    """``(pairs, unreadable)``: (source path, output relative path) pairs, folders searched
    recursively, and the ``(folder, reason)`` of every folder that could not be listed."""
    found, unreadable = [], []
    for arg in inputs:
        p = Path(arg)
        if p.is_dir():
            n_unreadable = len(unreadable)
            files = _folder_images(p, unreadable)
            if not files and len(unreadable) == n_unreadable:
                raise ValueError(f"no PNG/JPEG files under folder {p}")
            prefix = Path(p.resolve().name if p.name == ".." else p.name)
            found += [(f, prefix / f.relative_to(p)) for f in files]
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"{p}: not a PNG/JPEG file")
            found.append((p, Path(p.name)))
        else:
            raise ValueError(f"{p}: no such file or folder")
    return found, unreadable


class _Job(NamedTuple):
    """One input and the files written for it."""

    src: Path
    gb: Path
    compare: Path | None


def _plan(pairs, out: Path, compare: bool) -> list[_Job]:
    """Output paths for every input, in input order; refuses names that would collide.

    ``<stem>_gb.png`` as a rule; where inputs of one folder share a stem
    (``a.jpg`` and ``a.png``) their outputs keep the extension (``a.jpg_gb.png``).
    """
    seen, unique = set(), []
    for src, rel in pairs:  # the same file given twice is written once
        key = (src.resolve(), rel)
        if key not in seen:
            seen.add(key)
            unique.append((src, rel))
    by_stem = defaultdict(list)
    for _, rel in unique:
        by_stem[(rel.parent, rel.stem)].append(rel)
    jobs = []
    for src, rel in unique:
        base = rel.name if len(by_stem[(rel.parent, rel.stem)]) > 1 else rel.stem
        folder = out / rel.parent
        cmp = folder / f"{base}_compare.png" if compare else None
        jobs.append(_Job(src, folder / f"{base}_gb.png", cmp))
    _refuse_collisions(jobs)
    return jobs


def _refuse_collisions(jobs: list[_Job]) -> None:
    """Refuse two inputs that would write one file (compared after resolving symlinks)."""
    owner, clashes = {}, []
    for job in jobs:
        for path in (job.gb, job.compare):
            if path is None:
                continue
            key = path.resolve()
            if key in owner:
                clashes.append(f"{owner[key]} and {job.src} would both be written to {path}")
            owner[key] = job.src
    if clashes:
        more = f" (and {len(clashes) - 3} more)" if len(clashes) > 3 else ""
        raise ValueError(
            f"output names collide: {'; '.join(clashes[:3])}{more}. Nothing was done: "
            "process such inputs in separate runs with different -o folders, or rename one"
        )


# --------------------------------------------------------------------------- #
# The output folder, checked before any work
# --------------------------------------------------------------------------- #


def _nearest_existing(path: Path) -> Path:
    for q in (path, *path.parents):
        if q.exists() or q.is_symlink():
            return q
    return Path(".")


def _check_outputs(jobs: list[_Job], out: Path, overwrite: bool) -> None:
    """Refuse, before anything is read or clustered, outputs that cannot or must not be
    written: ``out`` or a folder on the way a file, a folder without write permission,
    an output that would replace an input, an existing output without ``--overwrite``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} is a file, not a folder; pass a folder to -o")
    for folder in sorted({p.parent for job in jobs for p in (job.gb, job.compare) if p}):
        anc = _nearest_existing(folder)
        if not anc.is_dir():
            raise ValueError(f"cannot create output folder {folder}: {anc} is a file")
        if not os.access(anc, os.W_OK | os.X_OK):
            raise ValueError(
                f"cannot write to {anc} (permission denied); choose another -o or fix its "
                "permissions"
            )
    inputs = {job.src.resolve() for job in jobs}
    existing = []
    for job in jobs:
        for path in (job.gb, job.compare):
            if path is None or not (path.exists() or path.is_symlink()):
                continue
            if path.resolve() in inputs:
                raise ValueError(f"output {path} would replace an input; choose another -o")
            if path.is_dir():
                raise ValueError(f"output {path} is a folder; remove it or choose another -o")
            existing.append(path)
    if existing and not overwrite:
        shown = ", ".join(map(str, existing[:3])) + (", ..." if len(existing) > 3 else "")
        raise ValueError(
            f"{len(existing)} output file(s) already exist ({shown}); pass --overwrite to "
            "replace them, or choose another -o"
        )


def _open_output(out: Path) -> None:
    """Create ``out`` and prove a file can be written there (also as root, on a read-only
    file system), before the clustering starts."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(f"cannot write to output folder {out} ({e}); choose another -o") from e


# --------------------------------------------------------------------------- #
# Reading and writing images
# --------------------------------------------------------------------------- #


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
    """Save as PNG via a temporary file, so an interrupted run leaves no partial output."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = img_HWC[..., 0] if img_HWC.shape[-1] == 1 else img_HWC
    if np.issubdtype(img.dtype, np.floating):  # 16-bit greyscale in 0..255 units
        img = np.clip(np.round(img * 257.0), 0, 65535).astype(np.uint16)
    with _files.atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


def compare_figure(image_HWC, path, *, purity=0.9, seed=0, **gb_kwargs):
    """Original | k-means k=2,10,50 | GB thresholds 40,20,10, saved as one PNG."""
    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = jax.random.split(jax.random.key(seed), 3)
    panels = [("original", image_HWC)]
    panels += [
        (f"k-means k={k}", _kmeans.kmeans_quantize(image_HWC, k, key=kk))
        for k, kk in zip((2, 10, 50), keys)
    ]
    ms = gb.gb_multiscale(image_HWC, thresholds=(40, 20, 10), purity=purity, **gb_kwargs)
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


# --------------------------------------------------------------------------- #
# The command
# --------------------------------------------------------------------------- #


def _report(failed: list, src, why: str) -> None:
    print(f"error: {src}: {why}", file=sys.stderr)
    failed.append((src, why))


def _read_all(jobs, failed, fail_fast):
    """Same-shape images grouped together (one compilation per shape); None on fail-fast."""
    groups = defaultdict(list)
    for job in jobs:
        try:
            img, warning = _read(job.src)
        except ReadError as e:
            print(f"error: cannot read image {job.src}: {e}", file=sys.stderr)
            failed.append((job.src, f"cannot read image ({e})"))
            if fail_fast:
                return None
            continue
        if warning:
            print(f"warning: {job.src}: {warning}", file=sys.stderr)
        groups[(img.shape, img.dtype.str)].append((img, job))
    return groups


def _write_job(job, img, painted, args, kw) -> None:
    _write(job.gb, painted)
    if job.compare is not None:
        compare_figure(
            np.clip(np.round(img), 0, 255).astype(np.uint8),
            job.compare,
            purity=args.purity,
            capacity=args.capacity if args.capacity != "auto" else 256,
            min_ball_size=args.min_ball_size,
            features=kw["features"],
        )


def _cluster_and_write(groups, args, kw, failed, bar):
    """``(written, saturated)``; every image that fails is added to ``failed``."""
    written = saturated = 0
    for items in groups.values():
        for s in range(0, len(items), args.batch_size):
            chunk = items[s : s + args.batch_size]
            try:
                res = gb.gb_cluster(np.stack([im for im, _ in chunk]), **kw)
                painted, n_balls = np.asarray(res.image), np.asarray(res.n_balls)
                saturated += int(np.sum(np.asarray(res.saturated)))
            except Exception as e:  # one group failing must not hide the others' results
                for _, job in chunk:
                    _report(failed, job.src, f"clustering failed ({type(e).__name__}: {e})")
                bar.update(len(chunk))
                if args.fail_fast:
                    return written, saturated
                continue
            for (img, job), p, n in zip(chunk, painted, n_balls):
                try:
                    _write_job(job, img, p, args, kw)
                    written += 1
                except Exception as e:  # disk full, permission changed meanwhile, ...
                    _report(failed, job.src, f"cannot write its output ({type(e).__name__}: {e})")
                    if args.fail_fast:
                        return written, saturated
                bar.set_postfix(balls=int(n))
                bar.update(1)
    return written, saturated


def _denoise(args):
    from tqdm.auto import tqdm

    pairs, unreadable = _collect(args.inputs)
    out = Path(args.output)
    jobs = _plan(pairs, out, args.compare)
    _check_outputs(jobs, out, args.overwrite)
    kw = dict(
        threshold=args.threshold,
        purity=args.purity,
        capacity=args.capacity,
        min_ball_size=args.min_ball_size,
        features=gb.Features(spatial=args.spatial, texture=args.texture),
        memory_budget=int(args.memory_budget * 2**30),
    )
    gb.gb_cluster(np.zeros((2, 2, 3), np.uint8), **kw)  # validate the options before any work

    failed = []
    for folder, why in unreadable:
        _report(failed, folder, why)
    if failed and args.fail_fast:
        return 1
    groups = _read_all(jobs, failed, args.fail_fast)
    if groups is None:
        return 1
    if groups:
        _open_output(out)
    with tqdm(total=len(jobs), desc="gb denoise", unit="img", disable=args.quiet) as bar:
        bar.update(len(jobs) - sum(map(len, groups.values())))
        written, saturated = _cluster_and_write(groups, args, kw, failed, bar)
    if saturated:
        hint = "" if args.capacity == "auto" else " (try --capacity auto)"
        print(
            f"warning: {saturated} of {written} image(s) filled the {args.capacity} ball slots: "
            f"some regions kept unsplit balls{hint}",
            file=sys.stderr,
        )
    if not args.quiet:
        print(f"wrote {written} of {len(jobs)} image(s) to {out}")
    if failed:
        print(f"{len(failed)} input(s) not written:", file=sys.stderr)
        for src, why in failed:
            print(f"  {src}: {why}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- #
# Arguments
# --------------------------------------------------------------------------- #


_DENOISE_DESCRIPTION = __doc__.split("``denoise``\n-----------\n", 1)[1]

_EXIT_CODES = """\
exit status:
  0  done
  1  the work failed part-way (an input not written, a non-finite training loss,
     a clustering error); each failure is reported on stderr
  2  refused before any work: bad options, missing inputs or data, a workdir or
     output that must not be used
"""

_MAIN_EPILOG = (
    """\
examples:
  gbjax denoise photos/ -o out/ --threshold 20 --compare
  gbjax train --config gbjax.configs.pe_mnist:smoke --workdir /tmp/pe
  gbjax cluster cifar10 --data-dir DATA --threshold 20 --purity 0.9
  gbjax <command> --help    (options and examples of one command)

"""
    + _EXIT_CODES
)

_DENOISE_EPILOG = (
    """\
examples:
  gbjax denoise photo.jpg -o out/                 # out/photo_gb.png
  gbjax denoise photos/ scans/ -o out/ --threshold 10 --purity 0.95
  gbjax denoise photos/ -o out/ --compare --capacity auto --overwrite

"""
    + _EXIT_CODES
)

_TRAIN_DESCRIPTION = """\
Train a configuration (a Python file or module with get_config(arg=None)) in a
workdir, as `python -m gbjax.train`: resumes from the workdir's latest
checkpoint, writes metrics.jsonl and checkpoints there, and prints the final
metrics as JSON. A workdir made with another configuration is refused unless
--overwrite. Multi-process data-parallel training: `python -m gbjax.distributed
train` (documentation: "Scaling out").
"""

_TRAIN_EPILOG = (
    """\
examples:
  gbjax train --config gbjax.configs.pe_mnist:smoke --workdir /tmp/pe
  gbjax train --config gbjax.configs.airbench_cifar10 --workdir runs/ab \\
      --set preprocess="'gb'" --set gb="{'threshold': 20.0, 'purity': 0.9}"
  gbjax train --config my_configs/run.py:fast --workdir runs/mine --set seed=3 --overwrite

  --config takes a file (path/to/config.py[:ARG]) or a module (gbjax.configs.NAME[:ARG]);
  the configurations shipped with gbjax: airbench_cifar10, resnet18_cifar10, pe_mnist,
  raw_mnist (each accepts ARG=smoke for a seconds-long check).

"""
    + _EXIT_CODES
)

_CLUSTER_DESCRIPTION = """\
GB-process a data set (every image painted with its granular balls) and store
it in the GB cache ($GBJAX_CACHE_DIR, else ~/.cache/gbjax, or --cache-dir),
under the key gbjax.data.gb_processed uses: training with preprocess="gb" and
the same GB parameters then reads it instead of clustering. With --config the
data set, subsets and GB parameters are the training configuration's, so the
cache is exactly the one `gbjax train` with that configuration reads. Only the
GB options given enter the cache key (as in a config's gb={...} dict).
With --coordinator/--num-processes/--process-id (or --auto), run the same
command on every process: each clusters its shard and all get the result.
"""

_CLUSTER_EPILOG = (
    """\
examples:
  gbjax cluster cifar10 --data-dir DATA --threshold 20 --purity 0.9
  gbjax cluster mnist --split test --num 1000 --threshold 40 --capacity 512
  gbjax cluster --config gbjax.configs.airbench_cifar10 \\
      --set preprocess="'gb'" --set gb="{'threshold': 20.0, 'purity': 0.9}"
  # two processes on one machine (run both; JAX_PLATFORMS=cpu on a CPU host):
  gbjax cluster cifar10 --threshold 20 --coordinator 127.0.0.1:5555 \\
      --num-processes 2 --process-id 0
  gbjax cluster cifar10 --threshold 20 --coordinator 127.0.0.1:5555 \\
      --num-processes 2 --process-id 1

"""
    + _EXIT_CODES
)


def _add_denoise_arguments(d: argparse.ArgumentParser) -> None:
    d.add_argument("inputs", nargs="+", metavar="IN", help="image files (PNG/JPEG) or folders")
    d.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    d.add_argument(
        "--threshold", type=positive_float, default=20.0, help="pixel units (default 20)"
    )
    d.add_argument("--purity", type=fraction, default=0.9, help="in (0, 1] (default 0.9)")
    d.add_argument(
        "--capacity",
        default=256,
        type=capacity,
        help="ball slots per image (default 256), or 'auto': grow it for images that fill it",
    )
    d.add_argument(
        "--min-ball-size", type=positive_int, default=2, help="smaller balls are noise (default 2)"
    )
    d.add_argument("--spatial", type=non_negative, default=0.0, help="weight of pixel coordinates")
    d.add_argument("--texture", type=non_negative, default=0.0, help="weight of local contrast")
    d.add_argument("--batch-size", type=positive_int, default=256, help="images per compiled call")
    d.add_argument(
        "--memory-budget",
        type=positive_float,
        default=2.0,
        help="GiB of working memory per compiled call (default 2); a single image whose "
        "working set exceeds it is refused before any work (large photos: raise it)",
    )
    d.add_argument(
        "--compare",
        action="store_true",
        help="also write original | k-means 2,10,50 | GB 40,20,10 figures",
    )
    d.add_argument(
        "--overwrite", action="store_true", help="replace output files that already exist"
    )
    d.add_argument("--quiet", action="store_true")
    d.add_argument(
        "--fail-fast",
        action="store_true",
        help="stop at the first input that cannot be read or written (exit 1)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gbjax",
        description="gbjax from the command line: granular-ball clustering of image files, "
        "training, and GB preprocessing of data sets.",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"gbjax {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter
    d = sub.add_parser(
        "denoise",
        help="granular-ball clustering of image files",
        description=_DENOISE_DESCRIPTION,
        epilog=_DENOISE_EPILOG,
        formatter_class=raw,
        allow_abbrev=False,
    )
    _add_denoise_arguments(d)
    t = sub.add_parser(
        "train",
        help="train a configuration in a workdir (python -m gbjax.train)",
        description=_TRAIN_DESCRIPTION,
        epilog=_TRAIN_EPILOG,
        formatter_class=raw,
        allow_abbrev=False,
    )
    train.add_arguments(t)  # one home: python -m gbjax.train has the same
    c = sub.add_parser(
        "cluster",
        help="a data set to its GB-processed copy in the cache",
        description=_CLUSTER_DESCRIPTION,
        epilog=_CLUSTER_EPILOG,
        formatter_class=raw,
        allow_abbrev=False,
    )
    add_cluster_arguments(c)
    distributed.add_process_flags(c)
    return parser


def _version() -> str:
    return __version__


# --------------------------------------------------------------------------- #
# train and cluster
# --------------------------------------------------------------------------- #


def _train(argv: list[str]) -> int:
    """``gbjax train``: :func:`gbjax.train.main` on the arguments after ``train``."""
    try:
        return train.main(argv)
    except (DataNotFoundError, CorruptDataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv=None):
    """Run the command line; returns the exit status (argument errors exit with 2).

    0: done (``denoise``: every input written); 1: the work failed part-way
    (``denoise``: some input not written, each one listed; ``train``: a
    non-finite loss; ``cluster``: the clustering failed); 2: refused before any
    work (unusable inputs, colliding or existing outputs, an output folder that
    cannot be written, a missing data set or config, a workdir made with
    another configuration).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":
        missing = config_missing(args.config)
        if missing:
            parser.error(missing)
        # forwarded verbatim: gbjax.train.main parses them again (and any flag it adds)
        return _train(argv[argv.index("train") + 1 :])
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "cluster":
        try:
            joined = distributed.start_from_flags(args)
        except ValueError as e:
            parser.error(str(e))
        return run_cluster(
            args, across_processes=distributed.gb_processed_distributed if joined else None
        )
    try:
        return _denoise(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
