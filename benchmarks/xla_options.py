"""XLA:CPU options on the airbench training step and the GB engine, one process each.

    python benchmarks/xla_options.py --data-dir ../shared/data            # ~10 min on 2 cores
    python benchmarks/xla_options.py --steps 3 --gb-images 128 --json x.json

For every option set it starts a fresh Python process (XLA reads ``XLA_FLAGS``
once per process) that times

* ``train``: images/s of :class:`gbjax.train.Trainer`'s step on the airbench94
  network (batch 256, synthetic CIFAR-shaped data, compilation excluded);
* ``gb``: images/s of ``gb_cluster`` at threshold 20 on CIFAR-10 test images
  (synthetic noise images when no data set is found), compilation excluded.

The baseline runs with no flag and gbjax's own per-jit option switched off
(``GBJAX_XLA_CPU_OPTIONS=0``); ``gbjax default`` is what a user gets (the
per-jit YNN option on conv-net programs only). Ratios are against the baseline
of the same run. Options are the ones this jaxlib accepts (listed by
``XLA_FLAGS=--xla_cpu_experimental_xnn_fusion_type=help``); a flag it rejects
is reported as failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

OPTIONS = {
    "baseline (no options)": ("", "0"),
    "gbjax default (per-jit YNN dot)": ("", "1"),
    "ynn fusion: dot (process-wide)": ("--xla_cpu_experimental_ynn_fusion_type=dot", "0"),
    "xnn fusion: dot,eltwise,reduce": (
        "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
        "0",
    ),
    "xnn graph fusion: greedy": (
        "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
        "0",
    ),
    "oneDNN thunks": ("--xla_cpu_use_onednn=true", "0"),
    "oneDNN custom call": ("--xla_cpu_experimental_onednn_custom_call=true", "0"),
    "fast math": ("--xla_cpu_enable_fast_math=true", "0"),
    "vector width 512": ("--xla_cpu_prefer_vector_width=512", "0"),
}


def worker(args):
    import jax
    import numpy as np

    import gbjax
    from gbjax import train
    from gbjax.configs import airbench_cifar10

    out = {}
    cfg = airbench_cifar10.get_config()
    cfg.batch_size, cfg.num_train, cfg.num_test = 256, None, None
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2048, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 2048).astype(np.int32)
    model = train.init_model(cfg, x, 10)
    tr = train.Trainer(cfg, model, num_classes=10, num_train=len(x), total_steps=10**6)
    state, data, perm = tr.init_state, tr.put_data(x, y), tr.epoch_permutation(0)
    for _ in range(2):
        state = tr.train_step(state, data, perm)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state = tr.train_step(state, data, perm)
    jax.block_until_ready(state)
    out["train_images_per_sec"] = 256 * args.steps / (time.perf_counter() - t0)

    try:
        xs, _ = gbjax.data.load("cifar10", "test", data_dir=args.data_dir, progress=False)
        xs = gbjax.data.random_subset(xs, np.zeros(len(xs)), args.gb_images)[0]
        out["gb_data"] = "cifar10 test"
    except Exception as e:  # no data set: noise images (a different, harder workload)
        xs = rng.integers(0, 256, (args.gb_images, 32, 32, 3), dtype=np.uint8)
        out["gb_data"] = f"synthetic ({type(e).__name__})"
    kw = dict(threshold=20.0, purity=0.9, chunk_size=128)
    jax.block_until_ready(gbjax.gb_cluster(xs[:128], **kw))  # compile
    t0 = time.perf_counter()
    jax.block_until_ready(gbjax.gb_cluster(xs, **kw))
    out["gb_images_per_sec"] = len(xs) / (time.perf_counter() - t0)
    print("RESULT" + json.dumps(out), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("GBJAX_DATA_DIR"))
    p.add_argument("--steps", type=int, default=6, help="timed training steps (batch 256)")
    p.add_argument("--gb-images", type=int, default=512)
    p.add_argument("--only", nargs="*", default=None, help="a subset of the option names")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if os.environ.get("XLA_FLAGS"):
        print(f"note: your XLA_FLAGS ({os.environ['XLA_FLAGS']}) are replaced in the workers")
    machine = dict(
        cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        python=sys.version.split()[0],
    )
    print(f"# {machine}")
    print(f"{'option':36s} {'train img/s':>11s} {'ratio':>6s} {'GB img/s':>9s} {'ratio':>6s}")
    rows, base = [], None
    for name, (flags, ours) in OPTIONS.items():
        if args.only and name not in args.only and not name.startswith("baseline"):
            continue
        env = dict(os.environ, XLA_FLAGS=flags, GBJAX_XLA_CPU_OPTIONS=ours)
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--steps",
            str(args.steps),
            "--gb-images",
            str(args.gb_images),
        ] + (["--data-dir", args.data_dir] if args.data_dir else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
        if proc.returncode or not line:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1][:80]
            rows.append(dict(option=name, flags=flags, failed=err))
            print(f"{name:36s} failed: {err}")
            continue
        r = dict(option=name, flags=flags, gbjax_per_jit=ours == "1", **json.loads(line[0][6:]))
        base = base or r
        r["train_ratio"] = r["train_images_per_sec"] / base["train_images_per_sec"]
        r["gb_ratio"] = r["gb_images_per_sec"] / base["gb_images_per_sec"]
        rows.append(r)
        print(
            f"{name:36s} {r['train_images_per_sec']:11.1f} {r['train_ratio']:6.2f} "
            f"{r['gb_images_per_sec']:9.1f} {r['gb_ratio']:6.2f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, results=rows), f, indent=2)


if __name__ == "__main__":
    main()
