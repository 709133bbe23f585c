"""Padding in the attack loops: pow-2 buckets against near-equal batches, same run.

Usage::

    python benchmarks/attack_batching.py [--model airbench94] [--rows 130 308 813 1254]
        [--batch-size 250] [--steps 10] [--repeats 2] [--data-dir DIR] [--json OUT]

A worst-case cascade attacks, at every stage, the rows (image, budget) still
robust; their number is arbitrary, and ``gbjax.attacks`` cuts them into batches of
one compiled shape. The old policy (``bucket_size``: ``--batch-size`` rows, or the
next power of two below it) padded 12-38% of the rows of the default main job's
cascade stages; the new one on CPU
(``row_bucket_size``: the fewest near-equal batches, in multiples of 16) pads a few
percent and compiles a few more shapes. For every row count this times PGD
(``--steps``) through ``attacks.accuracy_under_attack`` under both policies, in
the same process, alternating, compilation included once (the first call of each
shape) and reported apart. The labels are the model's own clean predictions, so
every row is attacked for every step whatever the model's accuracy (a randomly
initialised network; the time of a step does not depend on its weights).
The default rows are the sizes of the default main job's GB cascade stages
(docs/results/fgsm_cifar/full_seed0_20261206b: 1,254 rows at PGD-20, 813 at
APGD-DLR, 308 at Square) and one small set.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import gbjax.attacks.evaluation as ev  # noqa: E402  (the loops whose rule is swapped)
from gbjax import _batching, attacks, train  # noqa: E402
from gbjax.configs import airbench_cifar10  # noqa: E402

SPECS = {"airbench94": None, "airbench_fast": "fast"}


def _images(n, data_dir):
    if data_dir:
        from gbjax import data

        x, _ = data.load("cifar10", "test", data_dir=data_dir, progress=False)
        return np.asarray(x[:n])
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _padded(n, size):
    return -(-n // size) * size - n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(SPECS), default="airbench94")
    p.add_argument("--rows", type=int, nargs="+", default=[130, 308, 813, 1254])
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    cfg = airbench_cifar10.get_config(SPECS[a.model])
    n_img = -(-max(a.rows) // 4)  # each image at up to four budgets, as in a cascade
    x = _images(max(n_img, 512), a.data_dir)
    model = train.init_model(cfg, x, 10)
    model.eval()
    x = x[:n_img]
    y = np.asarray(jnp.argmax(model(jnp.asarray(x, jnp.float32) / 255), -1), np.int32)
    eps = [1 / 255, 2 / 255, 4 / 255, 8 / 255]
    original = _batching.row_bucket_size
    policies = {
        "pow2": lambda n, bs, current=None: _batching.bucket_size(n, bs),
        "near-equal/16": lambda n, bs, current=None: _batching.bucket_size(
            n, bs, minimum=_batching.CPU_QUANTUM, quantum=_batching.CPU_QUANTUM
        ),
    }
    print(
        f"model {a.model}, PGD-{a.steps}, batch <= {a.batch_size}, backend "
        f"{jax.default_backend()}, {a.repeats} timed calls per policy and row count"
    )

    def run(policy, rows):
        mask = np.zeros((len(eps), n_img), bool)
        mask.reshape(-1)[:rows] = True  # budget-major rows, like the cascade's sets
        ev.row_bucket_size = policies[policy]
        try:
            t0 = time.perf_counter()
            attacks.accuracy_under_attack(
                model,
                x,
                y,
                eps_list=eps,
                attack="pgd",
                steps=a.steps,
                batch_size=a.batch_size,
                key=jax.random.key(0),
                robust_so_far=mask,
                progress=False,
            )
            return time.perf_counter() - t0
        finally:
            ev.row_bucket_size = original

    out = []
    for rows in a.rows:
        rec = {"rows": rows}
        for pol in policies:  # first call per shape: compilation + one run
            rec[f"{pol}_first_s"] = run(pol, rows)
        times = {pol: [] for pol in policies}
        for _ in range(a.repeats):
            for pol in policies:
                times[pol].append(run(pol, rows))
        for pol in policies:
            size = policies[pol](rows, a.batch_size)
            rec[f"{pol}_batch"] = size
            rec[f"{pol}_padded_rows"] = _padded(rows, size)
            rec[f"{pol}_s"] = min(times[pol])
        rec["speedup"] = rec["pow2_s"] / rec["near-equal/16_s"]
        out.append(rec)
        print(
            f"{rows:5d} rows: pow2 {rec['pow2_batch']:3d} x {-(-rows // rec['pow2_batch'])} "
            f"({rec['pow2_padded_rows']} padded) {rec['pow2_s']:.1f} s | near-equal "
            f"{rec['near-equal/16_batch']:3d} x {-(-rows // rec['near-equal/16_batch'])} "
            f"({rec['near-equal/16_padded_rows']} padded) {rec['near-equal/16_s']:.1f} s | "
            f"{rec['speedup']:.2f}x (first calls {rec['pow2_first_s']:.1f} / "
            f"{rec['near-equal/16_first_s']:.1f} s)",
            flush=True,
        )
    tot = {pol: sum(r[f"{pol}_s"] for r in out) for pol in policies}
    print(f"all rows: pow2 {tot['pow2']:.1f} s, near-equal {tot['near-equal/16']:.1f} s, "
          f"{tot['pow2'] / tot['near-equal/16']:.2f}x")  # fmt: skip
    if a.json:
        meta = dict(
            args=vars(a),
            machine=platform.processor() or platform.machine(),
            jax=jax.__version__,
            date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        )
        Path(a.json).write_text(json.dumps(dict(meta=meta, rows=out, total_s=tot), indent=1))


if __name__ == "__main__":
    main()
