"""Command-line pieces shared by ``gbjax`` (:mod:`gbjax.__main__`) and ``python -m
gbjax.distributed``: argument types and the ``gbjax cluster`` command.

The cluster command's multi-process form is given to :func:`run_cluster` by its
caller (``gbjax.distributed.gb_processed_distributed``), so this module sits
below :mod:`gbjax.distributed` and both command lines import it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax

from gbjax import data, gb, train
from gbjax._files import cache_root
from gbjax.config import apply_overrides, load_config
from gbjax.data import DATASETS, CorruptDataError, DataNotFoundError
from gbjax.data._entries import gb_key

__all__ = [
    "checked",
    "positive_int",
    "positive_float",
    "non_negative",
    "fraction",
    "capacity",
    "config_missing",
    "GB_OPTIONS",
    "add_cluster_arguments",
    "cluster_jobs",
    "run_cluster",
]


def checked(convert, ok, want: str):
    """An argparse ``type``: ``convert(text)`` that must satisfy ``ok``, else a parser error."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value

    return parse


positive_int = checked(int, lambda v: v >= 1, "an integer >= 1")
positive_float = checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
non_negative = checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
fraction = checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
capacity = checked(
    lambda t: t if t == "auto" else int(t), lambda v: v == "auto" or v >= 1, "'auto' or an int >= 1"
)


def add_cluster_arguments(c: argparse.ArgumentParser) -> None:
    """The options of ``gbjax cluster`` (shared with ``python -m gbjax.distributed``).

    Args:
      c: the (sub)parser to add them to.
    """
    c.add_argument(
        "dataset",
        nargs="?",
        choices=DATASETS,
        help=f"one of {', '.join(DATASETS)} (or give --config)",
    )
    c.add_argument(
        "--config",
        metavar="CFG[:ARG]",
        help="take the data set, subsets, GB parameters and cache folder from this training "
        "configuration",
    )
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of --config (a Python literal)")  # fmt: skip
    c.add_argument(
        "--split",
        action="append",
        choices=("train", "test"),
        help="split to process; repeatable (default: train and test)",
    )
    c.add_argument("--data-dir", metavar="DIR", help="data folder (default $GBJAX_DATA_DIR)")
    c.add_argument("--cache-dir", metavar="DIR", help="GB cache (default $GBJAX_CACHE_DIR)")
    c.add_argument(
        "--num", type=positive_int, metavar="N", help="a fixed random subset of N images"
    )
    g = c.add_argument_group("GB parameters (gbjax.GBParams; they give the cache key)")
    g.add_argument("--threshold", type=positive_float, help="pixel units (gb_cluster: 20)")
    g.add_argument("--purity", type=fraction, help="in (0, 1] (gb_cluster: 0.9)")
    g.add_argument("--capacity", type=positive_int, help="ball slots per image (256)")
    g.add_argument("--min-ball-size", type=positive_int, help="smaller balls are noise (2)")
    g.add_argument("--spatial", type=non_negative, help="weight of pixel coordinates (0)")
    g.add_argument("--texture", type=non_negative, help="weight of local contrast (0)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")


def config_missing(spec: str) -> str | None:
    """Why ``--config spec`` cannot be loaded (a missing file or module), else None."""
    path = spec.partition(":")[0]
    if path.endswith(".py"):
        return None if Path(path).is_file() else f"config file {path} not found"
    try:
        found = importlib.util.find_spec(path) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"config module {path} not found (a file needs the .py ending)"


GB_OPTIONS = ("threshold", "purity", "capacity", "min_ball_size", "spatial", "texture")


def cluster_jobs(args):
    """``[(split, images)]`` and the ``gb_processed`` keyword arguments of ``args``."""
    if args.config is not None:
        if args.dataset is not None or args.num is not None or args.data_dir is not None:
            raise ValueError("--config takes the data set, --num and --data-dir from the config")
        gb_given = [k for k in GB_OPTIONS if getattr(args, k) is not None]
        if gb_given:
            raise ValueError(f"--config takes the GB parameters from the config (gave {gb_given})")
        missing = config_missing(args.config)
        if missing:
            raise ValueError(missing)
        config = apply_overrides(load_config(args.config), args.set)
        if config.preprocess != "gb":
            raise ValueError(
                f"the config does not use GB preprocessing (preprocess={config.preprocess!r}); "
                'add --set preprocess="\'gb\'" --set gb="{...}"'
            )
        plain = dataclasses.replace(config, preprocess="none", progress=not args.quiet)
        xtr, _, xte, _ = train.load_datasets(plain)
        splits = {"train": xtr, "test": xte}
        jobs = [(s, splits[s]) for s in (args.split or ("train", "test"))]
        cache_dir = args.cache_dir if args.cache_dir is not None else config.cache_dir
        gb_kw = config.gb  # the keyword arguments of gb_denoise, or a GBParams
        if isinstance(gb_kw, gb.GBParams):
            gb_kw = {name: getattr(gb_kw, name) for name in gb.PARAM_NAMES}
        return jobs, dict(cache_dir=cache_dir, **gb_kw)
    if args.set:
        raise ValueError("--set needs --config")
    if args.dataset is None:
        raise ValueError("give a data set (positional) or --config")
    jobs = []
    for split in args.split or ("train", "test"):
        x, y = data.load(args.dataset, split, data_dir=args.data_dir, progress=not args.quiet)
        x, _ = data.random_subset(x, y, args.num)
        jobs.append((split, x[..., None] if x.ndim == 3 else x))
    kw = {k: getattr(args, k) for k in GB_OPTIONS[:4] if getattr(args, k) is not None}
    feats = {k: getattr(args, k) for k in ("spatial", "texture") if getattr(args, k) is not None}
    if feats:
        kw["features"] = feats
    return jobs, dict(cache_dir=args.cache_dir, **kw)


def run_cluster(args, *, across_processes: Callable | None = None) -> int:
    """``gbjax cluster``: GB-process the chosen splits into the cache.

    Args:
      args: the parsed options of :func:`add_cluster_arguments`.
      across_processes: in a run joined with :func:`gbjax.distributed.initialize`,
        :func:`gbjax.distributed.gb_processed_distributed`, which splits the
        clustering over the processes (progress shown on process 0 only);
        ``None``: :func:`gbjax.data.gb_processed` on this process.

    Returns:
      The exit status: 0 done, 1 clustering failed, 2 refused before any work.
    """
    try:
        jobs, kw = cluster_jobs(args)
    except (ValueError, DataNotFoundError, CorruptDataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cache_dir = kw.pop("cache_dir")
    show = not args.quiet
    multi_process = across_processes is not None
    if multi_process:
        show = show and jax.process_index() == 0
    for split, images in jobs:
        t0 = time.perf_counter()
        try:
            if multi_process:
                out = across_processes(images, cache_dir=cache_dir, progress=show, **kw)
            else:
                out = data.gb_processed(images, cache_dir=cache_dir, progress=show, **kw)
        except ValueError as e:  # GB parameters refused by gb_cluster
            print(f"error: {split}: {e}", file=sys.stderr)
            return 2
        except Exception as e:
            print(f"error: {split}: clustering failed ({type(e).__name__}: {e})", file=sys.stderr)
            return 1
        params, _ = gb.as_params(None, kw)
        path = cache_root(cache_dir) / f"gb_{gb_key(images, params)}.npz"
        if show:
            dt = time.perf_counter() - t0
            print(f"{split}: {len(out)} images {tuple(out.shape[1:])} -> {path} ({dt:.1f} s)")
    return 0
