"""Work the evaluation drivers no longer do, same run: a second forward pass per
iterate, and the rows that have already fallen.

Usage::

    python benchmarks/evaluation_work.py --run OUT_DIR [--data-dir DIR] [--n 25]
        [--steps 20 100] [--repeats 1] [--json OUT]

``--run``: the output folder of a main job (``experiments/fgsm_cifar.py --out``) whose
trainings have finished; its two trained models are restored from
``OUT_DIR/checkpoints``. Without it, randomly initialised airbench94 networks are used
(``--variant``: another airbench variant) with their own predictions as labels: the
times per step then hold, but the rows fall unlike a trained model's.

Three settings, each timed in the same process, round-robin, after one untimed call
that compiles (docs/methods.md 7.1 and 7.6):

* ``before``: the rule used until 2026-12-07: the gradient pass's logits score an
  iterate only when the attacked and scored functions are the same object (or a BPDA
  pair of the same objects); every batch runs to its last step at full size.
* ``shared``: the rule of today (the same function, wrapped or not), full batches.
* ``shared+compact``: today's default: also only the still-robust rows go on between
  compiled chunks.

Workloads, as the main job's convergence runs do them (``fgsm_cifar._convergence``):
PGD and APGD-CE at 8/255 for each of ``--steps`` on the first ``--n`` images of the main
job's evaluation subset, for the unprocessed model (attacked bare, scored as
``Defended(model)``) and for GB's BPDA pair scored by the end-to-end pair's function.
The flags of the three settings must agree (printed; a difference is an error).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "experiments"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import gbjax.attacks.evaluation as ev  # noqa: E402  (the rules swapped below)
from gbjax import attacks, defences, evaluate, train  # noqa: E402
from gbjax.attacks._core import BPDA  # noqa: E402

EPS = 8 / 255


def _old_same_forward(attack_fn, eval_fn) -> bool:
    """The rule before 2026-12-07: object identity only."""
    if attack_fn is eval_fn:
        return True
    return (
        isinstance(attack_fn, defences.Defended)
        and isinstance(eval_fn, defences.Defended)
        and attack_fn.classifier is eval_fn.classifier
        and attack_fn.randomized == eval_fn.randomized
        and isinstance(attack_fn.preprocess, BPDA)
        and attack_fn.preprocess.forward is eval_fn.preprocess
    )


SETTINGS = {
    "before": (_old_same_forward, False),
    "shared": (ev._same_forward, False),
    "shared+compact": (ev._same_forward, True),
}


def _models(run, x, variant):
    from gbjax import models as gmodels

    if run:
        ck = Path(run) / "checkpoints"
        return {
            name: gmodels.in_float32(train.restore_model(ck / f"{name}_seed0"))
            for name in ("unprocessed", "gb")
        }
    from gbjax.configs import airbench_cifar10

    cfg = airbench_cifar10.get_config(variant)
    out = {}
    for name in ("unprocessed", "gb"):
        m = train.init_model(cfg, x, 10)
        m.eval()
        out[name] = m
    return out


def _data(n, data_dir):
    import _common as C

    from gbjax import data

    if data_dir:
        x, y = data.load("cifar10", "test", data_dir=data_dir, progress=False)
    else:
        rng = np.random.default_rng(0)
        x, y = rng.integers(0, 256, (10000, 32, 32, 3), np.uint8), None
    idx = C.eval_indices(len(x), 500)[:n]  # the main job's evaluation subset, first n
    return np.asarray(x)[idx], (None if y is None else np.asarray(y)[idx])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--n", type=int, default=25)
    p.add_argument("--steps", type=int, nargs="+", default=[20, 100])
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--variant", default=None, help="airbench variant without --run (smoke: tests)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import fgsm_cifar

    x_u8, y = _data(a.n, a.data_dir)
    models = _models(a.run, x_u8, a.variant)
    x = x_u8.astype(np.float32) / 255.0
    fns = fgsm_cifar.model_functions(models, defences.GB())
    pairs = {
        "unprocessed": (fns["unprocessed"][1]["none"], fns["unprocessed"][0]),
        "gb (bpda)": (fns["gb"][1]["bpda"], fns["gb"][0]),
    }
    labels = {  # the true labels; without data, each model's own predictions
        name: y if y is not None else np.asarray(evaluate.predict(scored, x), np.int32)
        for name, (_, scored) in pairs.items()
    }
    print(
        f"models {'from ' + a.run if a.run else 'randomly initialised'}, {a.n} images, "
        f"eps 8/255, backend {jax.default_backend()}, {a.repeats} timed call(s) each"
    )
    original = ev._same_forward
    compact = ev.COMPACT

    def call(setting, name, attack, steps):
        same, comp = SETTINGS[setting]
        fn, scored = pairs[name]
        ev._same_forward, ev.COMPACT = same, comp
        try:
            t0 = time.perf_counter()
            res = attacks.accuracy_under_attack(
                fn,
                x,
                labels[name],
                eval_logits_fn=scored,
                eps_list=[EPS],
                attack=attack,
                steps=steps,
                key=jax.random.key(0),
                batch_size=a.batch_size,
                chunk=fgsm_cifar.chunk_for("gb" if name.startswith("gb") else name),
                per_image=True,
                progress=False,
            )
            return time.perf_counter() - t0, np.asarray(res.robust)
        finally:
            ev._same_forward, ev.COMPACT = original, compact

    rows = []
    for name in pairs:
        for attack in ("pgd", "apgd-ce"):
            for steps in a.steps:
                rec = dict(model=name, attack=attack, steps=steps)
                flags = {}
                for s in SETTINGS:  # compiles, untimed
                    _, flags[s] = call(s, name, attack, steps)
                times = {s: [] for s in SETTINGS}
                for _ in range(a.repeats):
                    for s in SETTINGS:
                        t, f = call(s, name, attack, steps)
                        times[s].append(t)
                        if not np.array_equal(f, flags["before"]):
                            raise SystemExit(f"flags differ: {name} {attack}-{steps} {s}")
                for s in SETTINGS:
                    rec[f"{s}_s"] = min(times[s])
                rec["robust"] = int(flags["before"].sum())
                rec["speedup"] = rec["before_s"] / rec["shared+compact_s"]
                rows.append(rec)
                print(
                    f"{name:12s} {attack:7s}-{steps:<4d} robust {rec['robust']:3d}/{a.n}: "
                    + " | ".join(f"{s} {rec[f'{s}_s']:.1f} s" for s in SETTINGS)
                    + f" | {rec['speedup']:.2f}x",
                    flush=True,
                )
    tot = {s: sum(r[f"{s}_s"] for r in rows) for s in SETTINGS}
    print(
        "all: "
        + ", ".join(f"{s} {tot[s]:.1f} s" for s in SETTINGS)
        + f"; shared {tot['before'] / tot['shared']:.2f}x, shared+compact "
        f"{tot['before'] / tot['shared+compact']:.2f}x"
    )
    if a.json:
        meta = dict(
            args=vars(a),
            machine=platform.processor() or platform.machine(),
            jax=jax.__version__,
            date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        )
        Path(a.json).write_text(json.dumps(dict(meta=meta, rows=rows, total_s=tot), indent=1))


if __name__ == "__main__":
    main()
