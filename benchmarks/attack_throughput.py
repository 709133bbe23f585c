"""Attack throughput: FGSM and PGD-10 images/s on a small CNN, plus data-load times.

Usage::

    python benchmarks/attack_throughput.py [--batch-size 128] [--repeats 5]
        [--image-shape 32 32 3] [--data-dir DIR] [--skip-data] [--json OUT]

Compile time is reported separately from steady-state time; steady-state
times are the median of ``--repeats`` calls, each ended with
``block_until_ready``.  The baseline measured in the same run is a clean
forward pass (argmax) on the same model and batch; the table reports each
attack's cost relative to it and the PGD-10 / FGSM cost ratio (expected
roughly 10x: PGD-10 is ten forward+backward passes, FGSM one).

Data-load times come from ``benchmarks/data_load.py``'s
``measure_load_times(data_dir)`` when that module exists; the data directory is
``--data-dir``, else ``$GBJAX_DATA_DIR``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gbjax import attacks  # noqa: E402


class TinyCNN(nnx.Module):
    """conv16-pool-conv32-pool-dense: a small CIFAR-sized classifier."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(in_channels, 16, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
        self.head = nnx.Linear(32, num_classes, rngs=rngs)

    def __call__(self, x_BHWC):
        x = (x_BHWC - 0.5) / 0.25  # normalisation inside the model: eps in pixel space
        x = nnx.avg_pool(jax.nn.relu(self.conv1(x)), (2, 2), (2, 2))
        x = nnx.avg_pool(jax.nn.relu(self.conv2(x)), (2, 2), (2, 2))
        return self.head(x.mean(axis=(1, 2)))


def _time(fn, repeats: int) -> tuple[float, float]:
    """(first-call seconds, median steady-state seconds) of ``fn()``."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def _while_loop_pgd(logits_fn, x, y, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return attacks.pgd(logits_fn, x, y, unroll=1, **kw)


def bench_attacks(
    batch_size: int, image_shape: tuple[int, int, int], repeats: int, pgd_steps: int = 10
) -> list[dict]:
    h, w, c = image_shape
    model = TinyCNN(c, 10, rngs=nnx.Rngs(0))
    model.eval()
    # Partial(graph call, state): reused across calls, so nothing retraces.
    logits_fn = attacks.as_logits_fn(model)
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.uniform(kx, (batch_size, h, w, c))
    y = jax.random.randint(ky, (batch_size,), 0, 10)
    eps = 8 / 255

    clean = jax.jit(lambda f, x: jnp.argmax(f(x), -1))
    cases = [
        ("clean forward (baseline)", lambda: clean(logits_fn, x)),
        ("FGSM", lambda: attacks.fgsm(logits_fn, x, y, eps=eps)),
        (
            f"PGD-{pgd_steps}",
            lambda: attacks.pgd(
                logits_fn, x, y, eps=eps, step_size=2.5 * eps / pgd_steps, steps=pgd_steps, key=kp
            ),
        ),
        # the same attack as a rolled while loop: on CPU XLA runs convolutions in loop
        # bodies several times slower (jax-ml/jax#12868), hence pgd's default (unrolled
        # on CPU). Only the deprecated unroll=1 still asks for the while loop on CPU.
        (
            f"PGD-{pgd_steps} (while loop)",
            lambda: _while_loop_pgd(
                logits_fn,
                x,
                y,
                eps=eps,
                step_size=2.5 * eps / pgd_steps,
                steps=pgd_steps,
                key=kp,
            ),
        ),
    ]
    rows = []
    for name, fn in cases:
        first, steady = _time(fn, repeats)
        rows.append(
            dict(
                name=name,
                batch_size=batch_size,
                compile_s=max(first - steady, 0.0),
                steady_s=steady,
                images_per_s=batch_size / steady,
            )
        )
    base = rows[0]["steady_s"]
    for r in rows:
        r["cost_vs_clean"] = r["steady_s"] / base
    return rows


def bench_data(data_dir: str | None) -> list[dict] | None:
    path = Path(__file__).resolve().parent / "data_load.py"
    if not path.exists():
        print(f"[data] skipped: {path.name} not found (gbjax.data benchmark not written yet)")
        return None
    spec = importlib.util.spec_from_file_location("gbjax_bench_data_load", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
        measure = mod.measure_load_times
    except Exception as e:  # noqa: BLE001 - report and carry on with the attack table
        print(f"[data] skipped: could not import measure_load_times ({type(e).__name__}: {e})")
        return None
    try:
        result = measure(data_dir)
    except Exception as e:  # noqa: BLE001 - e.g. data not found
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"[data] skipped: {type(e).__name__}: {msg} (pass --data-dir or set GBJAX_DATA_DIR)")
        return None
    if isinstance(result, dict):
        result = [
            dict(name=k, **v) if isinstance(v, dict) else dict(name=k, value=v)
            for k, v in result.items()
        ]
    return list(result) if result is not None else None


def print_attack_table(rows: list[dict]) -> None:
    print(
        f"\nAttack throughput on {jax.devices()[0].platform.upper()} "
        f"({jax.device_count()} device(s)), TinyCNN, batch {rows[0]['batch_size']}"
    )
    print(f"{'case':<26} {'compile s':>10} {'ms/batch':>10} {'images/s':>11} {'x clean':>8}")
    for r in rows:
        print(
            f"{r['name']:<26} {r['compile_s']:10.2f} {1e3 * r['steady_s']:10.2f} "
            f"{r['images_per_s']:11.0f} {r['cost_vs_clean']:8.1f}"
        )
    fgsm = next(r for r in rows if r["name"] == "FGSM")
    pgd = next(r for r in rows if r["name"].startswith("PGD"))  # the default (chunk=None)
    print(
        f"{pgd['name']} / FGSM cost ratio: {pgd['steady_s'] / fgsm['steady_s']:.1f}x "
        f"(expected about {pgd['name'].split('-')[1]}x)"
    )


def print_data_table(rows: list[dict]) -> None:
    print("\nData-load times")
    keys = sorted({k for r in rows for k in r if k != "name"})
    print(f"{'dataset':<24}" + "".join(f"{k:>16}" for k in keys))
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k, "")
            cells.append(f"{v:16.3f}" if isinstance(v, float) else f"{str(v):>16}")
        print(f"{str(r.get('name', '')):<24}" + "".join(cells))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--image-shape", type=int, nargs=3, default=(32, 32, 3), metavar=("H", "W", "C"))
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--data-dir", default=os.environ.get("GBJAX_DATA_DIR"))
    p.add_argument("--skip-data", action="store_true", help="skip the data-load timings")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)

    rows = bench_attacks(args.batch_size, tuple(args.image_shape), args.repeats, args.pgd_steps)
    print_attack_table(rows)
    data_rows = None
    if not args.skip_data:
        data_rows = bench_data(args.data_dir)
        if data_rows:
            print_data_table(data_rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(device=str(jax.devices()[0]), attacks=rows, data=data_rows),
                f,
                indent=2,
                default=str,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
