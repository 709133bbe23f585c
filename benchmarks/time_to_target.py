"""Time to a target test accuracy: one training run, read off its metrics.

    # the issue's target: ResNet-18 on CIFAR-10 >= 93%, stretch < 60 s on one H100
    python benchmarks/time_to_target.py --config gbjax/configs/resnet18_cifar10.py \
        --target 0.93 --budget-s 60 --json r18_ttt.json
    # seconds on CPU: only checks that the script works
    python benchmarks/time_to_target.py --config gbjax/configs/resnet18_cifar10.py:smoke \
        --target 0.0

Runs ``gbjax.train.train_and_evaluate`` with an evaluation after every epoch
and reports the first evaluation at or above ``--target``: its epoch, the
summed train-step time up to it (compilation and evaluations excluded:
``train_time_s``) and the wall time since the start, data loading, compilation
and evaluations included (``elapsed_s``).  The ratio printed is train time over
``--budget-s`` (the issue's stretch budget), so < 1 means within budget.  There
is no in-run baseline here: the comparison is with a stated budget, and the
throughput comparison lives in ``train_throughput.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile

import jax

from gbjax import train


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="path/to/config.py[:arg]")
    p.add_argument("--target", type=float, required=True, help="test accuracy in [0, 1], e.g. 0.93")
    p.add_argument("--budget-s", type=float, default=60.0)
    p.add_argument(
        "--workdir",
        default=None,
        help="default: a fresh temporary directory (a used one would resume)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not 0.0 <= args.target <= 1.0:
        p.error(f"--target must be in [0, 1], got {args.target}")

    config = train.apply_overrides(
        train.load_config(args.config), [*args.set, "eval_every_epochs=1"]
    )
    workdir = args.workdir or tempfile.mkdtemp(prefix="gbjax_ttt_")
    dev = jax.devices()[0]
    machine = dict(
        backend=jax.default_backend(),
        device=dev.device_kind,
        device_count=jax.device_count(),
        cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        jax=jax.__version__,
    )
    print(f"# {machine}")
    _, summary = train.train_and_evaluate(config, workdir)
    hit = train.time_to_target(workdir, args.target)
    row = dict(
        config=args.config,
        overrides=args.set,
        target=args.target,
        reached=hit is not None,
        final_test_accuracy=summary["test_accuracy"],
        total_steps=summary["step"],
        compile_time_s=summary["compile_time_s"],
        total_wall_s=summary["wall_time_s"],
        budget_s=args.budget_s,
        machine=machine,
        workdir=str(workdir),
    )
    if hit is not None:
        row.update(
            epoch=hit["epoch"],
            step=hit["step"],
            test_accuracy=hit["test_accuracy"],
            train_time_s=hit["train_time_s"],
            elapsed_s=hit["elapsed_s"],
            ratio=hit["train_time_s"] / args.budget_s,
        )
        print(
            f"target {args.target:.4f} reached at epoch {hit['epoch']:g} (step {hit['step']}): "
            f"test {hit['test_accuracy']:.4f}, train time {hit['train_time_s']:.1f} s, "
            f"elapsed {hit['elapsed_s']:.1f} s; train time / budget "
            f"{args.budget_s:g} s = {row['ratio']:.2f}"
        )
    else:
        print(
            f"target {args.target:.4f} NOT reached: final test accuracy "
            f"{summary['test_accuracy']:.4f} after {summary['step']} steps "
            f"({summary['wall_time_s']:.1f} s wall)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2, default=str)
    return 0 if hit is not None else 1


if __name__ == "__main__":
    sys.exit(main())
