"""Test accuracy against epoch for finished (or running) training runs.

    python experiments/plot_training.py --run raw=/tmp/raw --run pe=/tmp/pe \
        --hline "raw target=98.5" --hline "paper raw=98.7" --out docs/mnist_training.png

Each ``--run LABEL=WORKDIR`` names a ``python -m gbjax.train`` workdir; its
``metrics.jsonl`` evaluation lines are plotted (a resumed run's repeated steps
count once) and printed as a table, with the best and the last epoch.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def read_evals(workdir) -> list[tuple[float, float]]:
    """``[(epoch, test accuracy %)]`` from ``workdir/metrics.jsonl``, by step."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {workdir}")
    by_step = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "event" not in rec and "test_accuracy" in rec:
            by_step[rec["step"]] = (rec["epoch"], 100.0 * rec["test_accuracy"])
    return [by_step[s] for s in sorted(by_step)]


def _pair(text: str, what: str) -> tuple[str, str]:
    label, sep, value = text.partition("=")
    if not sep or not label or not value:
        raise argparse.ArgumentTypeError(f"{what} must be LABEL=VALUE, got {text!r}")
    return label, value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="LABEL=WORKDIR",
        type=lambda t: _pair(t, "--run"),
    )
    p.add_argument(
        "--hline",
        action="append",
        default=[],
        metavar="LABEL=PERCENT",
        type=lambda t: _pair(t, "--hline"),
    )
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--title", default="test accuracy during training")
    args = p.parse_args(argv)

    runs = {label: read_evals(wd) for label, wd in args.run}
    for label, evals in runs.items():
        if not evals:
            p.error(f"run {label!r} has no evaluation yet")
    print(f"{'run':12s} {'epochs':>6s} {'last %':>7s} {'best %':>7s} {'best epoch':>10s}")
    for label, evals in runs.items():
        best = max(evals, key=lambda e: e[1])
        print(f"{label:12s} {evals[-1][0]:6g} {evals[-1][1]:7.2f} {best[1]:7.2f} {best[0]:10g}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    lo = 100.0
    for label, evals in runs.items():
        ep, acc = zip(*evals)
        ax.plot(ep, acc, marker="o", ms=3, label=label)
        lo = min(lo, min(acc))
    for i, (label, value) in enumerate(args.hline):
        v = float(value)
        ax.axhline(
            v,
            ls="--" if i % 2 == 0 else ":",
            lw=1,
            color=f"C{len(runs) + i}",
            label=f"{label} ({v:g}%)",
        )
        lo = min(lo, v)
    ax.set_ylim(max(0.0, lo - 0.5), 100.0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(args.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
