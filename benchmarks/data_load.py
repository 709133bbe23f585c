"""Data-load times: first load (decode from the source files) vs cached load.

Usage::

    python benchmarks/data_load.py [--data-dir DIR] [--datasets mnist cifar10]
        [--splits train test] [--repeats 3] [--json OUT]

The data directory is ``--data-dir``, else ``$GBJAX_DATA_DIR`` (for example
``../shared/data``). Each first load decodes into a fresh temporary cache
directory (so the user's own cache is neither used nor touched); the cached
time is the median of ``--repeats`` further loads served from that cache.
Other processes on the machine affect the first-load (decode) times most.

``measure_load_times(data_dir)`` is also imported by
``benchmarks/attack_throughput.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from gbjax import data


def measure_load_times(
    data_dir: str | None = None,
    *,
    datasets: tuple[str, ...] = ("mnist", "cifar10"),
    splits: tuple[str, ...] = ("train", "test"),
    repeats: int = 3,
) -> dict[str, dict]:
    """Time ``gbjax.data.load`` uncached and cached for each dataset and split.

    Returns ``{"<name>/<split>": {"n": images, "first_s": s, "cached_s": s,
    "speedup": first / cached}}``. Raises ``DataNotFoundError`` when a data set
    is missing (no download is attempted).
    """
    data_dir = data_dir or os.environ.get("GBJAX_DATA_DIR")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gbjax-bench-cache-") as cache_dir:
        for name in datasets:
            for split in splits:
                t = time.perf_counter()
                x, _ = data.load(
                    name, split, data_dir, cache_dir=cache_dir, download=False, progress=False
                )
                first = time.perf_counter() - t
                cached = []
                for _ in range(max(1, repeats)):
                    t = time.perf_counter()
                    data.load(
                        name, split, data_dir, cache_dir=cache_dir, download=False, progress=False
                    )
                    cached.append(time.perf_counter() - t)
                c = statistics.median(cached)
                results[f"{name}/{split}"] = dict(
                    n=int(len(x)), first_s=first, cached_s=c, speedup=first / c
                )
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("GBJAX_DATA_DIR"))
    p.add_argument(
        "--datasets", nargs="+", default=["mnist", "cifar10"], choices=list(data.DATASETS)
    )
    p.add_argument("--splits", nargs="+", default=["train", "test"], choices=list(data.SPLITS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if not args.data_dir:
        print("no data directory: pass --data-dir or set GBJAX_DATA_DIR", file=sys.stderr)
        return 2
    res = measure_load_times(
        args.data_dir,
        datasets=tuple(args.datasets),
        splits=tuple(args.splits),
        repeats=args.repeats,
    )
    print(f"Data-load times from {args.data_dir} ({os.cpu_count()} CPUs)")
    print(
        f"{'dataset/split':<16} {'images':>8} {'first load s':>13} {'cached s':>10} {'speedup':>8}"
    )
    for k, r in res.items():
        times = f"{r['first_s']:>13.2f} {r['cached_s']:>10.3f} {r['speedup']:>7.0f}x"
        print(f"{k:<16} {r['n']:>8} {times}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
