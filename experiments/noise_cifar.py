"""CIFAR-10-C style noise and attacks: where does GB help, beside the classical defences?

    python experiments/noise_cifar.py --data-dir ../shared/data           # default, 99 min, 2 cores
    python experiments/noise_cifar.py --quick --data-dir ../shared/data   # 17 min, 2 cores
    python experiments/noise_cifar.py --smoke --synthetic --out /tmp/s    # about a minute

Protocol (also written into results.md):

* Classifiers, one architecture and recipe (the airbench network,
  ``gbjax/configs/airbench_cifar10.py``, its ``fast`` variant): *clean* (trained on
  clean images); one per image-changing defence, trained on images that
  defence processed (GB, bit depth, JPEG); and *Gaussian augmentation* (the
  clean training images plus one noisy copy of each, Gaussian noise of a random
  CIFAR-10-C severity drawn once: the common practical fix; twice the images,
  so twice the training steps of the others).
* Test-time defences: none, GB (threshold 20, purity 0.9), median 3x3, bit depth
  4, JPEG 75, k-means 8 colours, TV 0.1, Gaussian blur 1.0. A defence with its
  own classifier uses it; the others sit in front of the clean classifier.
* Noise: ``gbjax.noise.corrupt`` gaussian, shot, impulse and speckle noise at
  severities 1-5 (CIFAR-10-C parameters), and the GB paper's Gaussian noise of
  std 1, 5, 10 pixel units, on ``n_test`` test images, one draw per case.
* Anchor for the undefended numbers: RobustBench's standard WideResNet-28-10 on
  CIFAR-10-C Gaussian noise scores 77.8 / 57.9 / 39.2 / 32.6 / 27.7 % at
  severities 1-5 (on the original, lossless CIFAR-10).
* Attacks: each defended model's worst case over FGSM, PGD, APGD-CE, APGD-DLR
  and Square at 2/255 and 8/255 on ``n_attack`` images, each gradient attack
  under BPDA and, where the defence is differentiable, also end to end (no
  defence here is randomised, so no EOT).
"""

from __future__ import annotations

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import numpy as np  # noqa: E402

EXPERIMENT = "noise_cifar"
KINDS = ("gaussian", "shot", "impulse", "speckle")
SEVERITIES = (1, 2, 3, 4, 5)
PAPER_STDS = (1, 5, 10)
ATTACK_EPS = (2 / 255, 8 / 255)
ATTACK_LABELS = ("2/255", "8/255")
ROBUSTBENCH_GAUSSIAN = (77.8, 57.9, 39.2, 32.6, 27.7)

MODES = {
    "smoke": dict(
        n_train=256,
        n_test=64,
        n_attack=16,
        variant="smoke",
        epochs=1,
        batch_size=64,
        pgd_steps=2,
        apgd_steps=3,
        queries=6,
        attack_batch=16,
        # no defence, and one attacked both end to end and with BPDA, with one
        # gradient attack (then Square), keep the compile time of the smoke test down
        attack_defences=("none", "JPEG 75"),
        attacks=("fgsm",),
    ),
    "quick": dict(
        # 1,000 test images and 100 attacked took 23.7 min (2026-12-02); noise evaluation
        # and attacks scale with the image counts, so half of each to fit 20 min
        n_train=20000,
        n_test=500,
        n_attack=50,
        variant="fast",
        epochs=2,
        batch_size=None,
        pgd_steps=10,
        apgd_steps=25,
        queries=300,
        attack_batch=50,
    ),
    "full": dict(
        seeds=(0,),  # one seed by default (99 min on 2 cores); --seeds 0,1,2 for three
        n_train=None,
        n_test=5000,
        n_attack=200,
        variant="fast",
        epochs=4,
        batch_size=None,
        pgd_steps=20,
        apgd_steps=50,
        queries=1000,
        attack_batch=100,
    ),
}


def defences():
    """{name: (defence or None, trained on it?)}."""
    from gbjax import defences as D

    return {
        "none": (None, False),
        "GB": (D.GB(threshold=20.0, purity=0.9), True),
        "median 3": (D.Median(size=3), False),
        "bit depth 4": (D.BitDepth(bits=4), True),
        "JPEG 75": (D.JPEG(quality=75), True),
        "k-means 8": (D.KMeans(k=8), False),
        "TV 0.1": (D.TV(weight=0.1), False),
        "blur 1.0": (D.GaussianBlur(sigma=1.0), False),
    }


def parse_args(argv=None):
    p = C.base_parser(__doc__)
    p.add_argument("--n-attack", type=int, default=None, help="override: images attacked")
    return p.parse_args(argv)


def process(defence, x_uint8, batch_size=256):
    """A defence applied to uint8 images, back to uint8 (the training inputs)."""
    import jax
    import jax.numpy as jnp

    from gbjax.data import map_batches

    f = jax.jit(lambda v: jnp.round(defence(v.astype(jnp.float32) / 255.0) * 255.0))
    out = map_batches(lambda b: f(jnp.asarray(b)), x_uint8, batch_size=batch_size)
    return np.asarray(np.clip(out, 0, 255), np.uint8)


def noisy_sets(x, seed):
    import jax

    from gbjax import noise

    sets = {}
    key = jax.random.key(10_000 + seed)
    for i, kind in enumerate(KINDS):
        for sev in SEVERITIES:
            k = jax.random.fold_in(jax.random.fold_in(key, i), sev)
            sets[f"{kind}:{sev}"] = np.asarray(
                noise.corrupt(x, k, kind=f"{kind}_noise", severity=sev)
            )
    for s in PAPER_STDS:
        k = jax.random.fold_in(key, 100 + s)
        sets[f"paper gaussian:{s}"] = np.asarray(noise.gaussian(x, k, std=float(s), mode="clip"))
    return sets


def train_all(r, seed, defs):
    """{classifier name: eval-mode model}: clean, one per trained defence, Gaussian aug."""
    import jax

    from gbjax import noise

    mode = r.mode
    jobs = {"clean": (r.xtr, r.xte)}
    for name, (d, trained) in defs.items():
        if trained:
            jobs[name] = (process(d, r.xtr), process(d, r.xte))
    # Gaussian augmentation: each training image gets noise of a random severity (fixed draw)
    sev = np.random.default_rng(seed).integers(1, 6, len(r.xtr))
    parts = [
        np.asarray(
            noise.corrupt(
                r.xtr[sev == s], jax.random.key(20_000 + s), kind="gaussian_noise", severity=int(s)
            )
        )
        for s in range(1, 6)
    ]
    aug = np.empty_like(r.xtr)
    for s, part in zip(range(1, 6), parts):
        aug[sev == s] = part
    jobs["Gaussian augmentation"] = (np.concatenate([r.xtr, aug]), r.xte)
    out, metrics = {}, {}
    for name, (tr, te) in jobs.items():
        t0 = time.perf_counter()
        ytr = np.concatenate([r.ytr, r.ytr]) if len(tr) == 2 * len(r.xtr) else r.ytr
        cfg = C.airbench_config(mode, seed, r.progress, eval_tta="none")
        out[name], metrics[name] = C.train_model(
            cfg,
            r.out / "checkpoints" / f"{name.replace(' ', '_')}_seed{seed}",
            (tr, ytr),
            (te, r.yte),
        )
        r.timer.mark(f"train {name}", t0)
    return out, metrics


def evaluate_noise(models, defs, sets, y, batch):
    from gbjax import defences as D
    from gbjax import evaluate

    acc = {}
    rows = {
        "none": "clean",
        **{n: (n if t else "clean") for n, (_, t) in defs.items() if n != "none"},
    }
    for name, (d, _) in defs.items():
        model = D.Defended(models[rows[name]], d)
        acc[name] = {
            case: evaluate.accuracy(model, xs.astype(np.float32) / 255.0, y, batch_size=batch)
            for case, xs in sets.items()
        }
    acc["Gaussian augmentation"] = {
        case: evaluate.accuracy(models["Gaussian augmentation"], xs, y, batch_size=batch)
        for case, xs in sets.items()
    }
    return acc


def attack_stages(name, protocols, defended, scored, mode):
    """One defence's cascade, in cost order: each gradient attack under each protocol
    (``protocols``: {protocol: attacked function}), then Square on ``defended``."""
    from gbjax.attacks import Stage

    chunk = 1 if name == "GB" else None
    steps_of = {
        "fgsm": 1,
        "pgd": mode["pgd_steps"],
        "apgd-ce": mode["apgd_steps"],
        "apgd-dlr": mode["apgd_steps"],
    }
    stages = [
        Stage(
            f"{attack} {prot}",
            attack,
            fn,
            eval_logits_fn=scored,
            fold=10 * i + j,
            steps=steps_of[attack],
            chunk=chunk,
        )
        for i, attack in enumerate(mode.get("attacks", tuple(steps_of)))
        for j, (prot, fn) in enumerate(protocols.items())
    ]
    square = Stage("square", "square", defended, fold=9, queries=mode["queries"], chunk=chunk)
    return stages + [square]


def evaluate_attacks(models, defs, x, y, mode, seed, progress):
    import jax

    from gbjax import attacks

    x01 = x.astype(np.float32) / 255.0
    out = {}
    rows = {n: (n if t else "clean") for n, (_, t) in defs.items()}
    rows["none"] = "clean"
    only = mode.get("attack_defences")
    for name, (d, _) in defs.items():
        if only is not None and name not in only:
            continue
        clf = models[rows[name]]
        if d is None:
            protocols, scored = {"none": clf}, None
        else:
            # BPDA always; end to end as well where the defence's own gradient is useful,
            # so that a gradient that masks cannot make a defence look robust
            names = ("end_to_end", "bpda") if getattr(d, "differentiable", False) else ("bpda",)
            pairs = {p: attacks.make_attack_logits(clf, d, p) for p in names}
            protocols = {p: a for p, (a, _) in pairs.items()}
            scored = pairs["bpda"][1]
        t0 = time.perf_counter()
        res = attacks.cascade(
            attack_stages(name, protocols, scored or clf, scored, mode),
            x01,
            y,
            eps_list=ATTACK_EPS,
            key=jax.random.key(30_000 + seed),
            batch_size=mode["attack_batch"],
            progress=progress,
            desc=name,
        )
        out[name] = {
            "worst_case": res.accuracy.tolist(),
            "stages": res.records(),  # the cascade: robust to every attack so far
            "protocol": "+".join(protocols),
            "seconds": time.perf_counter() - t0,  # this defence's whole cascade, compiles included
        }
    return out


def run(argv=None) -> dict:
    args = parse_args(argv)
    if args.merge:
        r, runs = C.start_merge(EXPERIMENT, args, args.merge)
        return assemble(r, runs)
    r = C.start(EXPERIMENT, args, MODES, "cifar10", ("n_train", "n_test", "n_attack", "epochs"))
    defs = defences()
    runs = {}
    for seed in r.seeds:
        models, metrics = train_all(r, seed, defs)
        t0 = time.perf_counter()
        sets = {"clean": r.xte, **noisy_sets(r.xte, seed)}
        acc = evaluate_noise(models, defs, sets, r.yte, r.mode["attack_batch"])
        r.timer.mark("noise", t0)
        t0 = time.perf_counter()
        idx = C.eval_indices(len(r.xte), r.mode["n_attack"])  # the test set is class-sorted
        att = evaluate_attacks(models, defs, r.xte[idx], r.yte[idx], r.mode, seed, r.progress)
        r.timer.mark("attacks", t0)
        runs[seed] = dict(acc=acc, attacks=att, train_metrics=metrics)
    _grid(r, defs)
    return assemble(r, runs)


def _grid(r, defs):
    """One noisy test image through every defence (a figure)."""
    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gbjax import noise

    x = r.xte[:1]
    noisy = np.asarray(noise.corrupt(x, jax.random.key(0), kind="gaussian_noise", severity=3))
    fig, axes = plt.subplots(1, len(defs) + 1, figsize=(1.8 * (len(defs) + 1), 2.2))
    axes[0].imshow(x[0].squeeze(), cmap="gray" if x.shape[-1] == 1 else None)
    axes[0].set_title("clean", fontsize=8)
    for ax, (name, (d, _)) in zip(axes[1:], defs.items()):
        img = noisy if d is None else process(d, noisy, batch_size=1)
        ax.imshow(img[0].squeeze(), cmap="gray" if x.shape[-1] == 1 else None)
        ax.set_title(f"{'noisy' if d is None else name}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle("Gaussian noise, severity 3, through each defence", fontsize=9)
    fig.tight_layout()
    fig.savefig(r.out / "defences_grid.png", dpi=120)
    plt.close(fig)


def assemble(r, runs):
    seeds, first = r.seeds, runs[r.seeds[0]]
    names = list(first["acc"])
    sev_cases = [f"{k}:{s}" for k in KINDS for s in SEVERITIES]
    headers = (
        ["defence (classifier)", "clean"] + [f"{k}" for k in KINDS] + ["mean over corruptions"]
    )
    headers += [f"paper std {s}" for s in PAPER_STDS]
    rows = []
    for n in names:

        def cell(case, n=n):
            return C.pct(runs[s]["acc"][n][case] for s in seeds)

        per_kind = [
            C.pct(np.mean([runs[s]["acc"][n][f"{k}:{v}"] for v in SEVERITIES]) for s in seeds)
            for k in KINDS
        ]
        mean_all = C.pct(np.mean([runs[s]["acc"][n][c] for c in sev_cases]) for s in seeds)
        rows.append(
            [n, cell("clean")]
            + per_kind
            + [mean_all]
            + [cell(f"paper gaussian:{v}") for v in PAPER_STDS]
        )
    sev_h = ["defence"] + [f"{k} s{v}" for k in KINDS for v in SEVERITIES]
    sev_rows = [
        [n] + [C.pct(runs[s]["acc"][n][c] for s in seeds) for c in sev_cases] for n in names
    ]
    att_h = ["defence", "protocol"] + [f"worst case {lab}" for lab in ATTACK_LABELS]
    att_h.append("attack time s")

    def att_secs(n):
        secs = [runs[s]["attacks"][n].get("seconds") for s in seeds]  # absent in older runs
        return "-" if None in secs else f"{np.mean(secs):.0f}"

    att_rows = [
        [n, first["attacks"][n]["protocol"]]
        + [
            C.pct(runs[s]["attacks"][n]["worst_case"][i] for s in seeds)
            for i in range(len(ATTACK_EPS))
        ]
        + [att_secs(n)]
        for n in first["attacks"]
    ]
    md = [
        f"# CIFAR-10 noise and attacks: GB beside classical defences ({r.label})",
        "",
        "## Protocol",
        "",
        __doc__.split("Protocol (also written into results.md):")[1].strip(),
        "",
        f"Sizes: {r.mode['n_train_eff']} training, {r.mode['n_test_eff']} test images; "
        f"{r.mode['n_attack']} attacked; seeds {seeds}.",
        "",
        "## Accuracy % under noise (severities averaged per corruption)",
        "",
        C.md_table(headers, rows),
        "",
        "RobustBench's WideResNet-28-10 (lossless CIFAR-10), Gaussian severities 1-5: "
        + " / ".join(f"{v}" for v in ROBUSTBENCH_GAUSSIAN)
        + " %.",
        "",
        "## Per severity",
        "",
        C.md_table(sev_h, sev_rows),
        "",
        "## Worst-case robust accuracy % ("
        + ", ".join(
            a.upper() for a in r.mode.get("attacks", ("fgsm", "pgd", "apgd-ce", "apgd-dlr"))
        )
        + ", SQUARE)",
        "",
        C.md_table(att_h, att_rows),
        "",
        "![accuracy vs severity](acc_vs_severity.png)",
        "",
        "![defences](defences_grid.png)",
        "",
    ]
    panels = []
    for k in KINDS:
        curves = {}
        for n in names:
            vals = (
                np.asarray([[runs[s]["acc"][n][f"{k}:{v}"] for v in SEVERITIES] for s in seeds])
                * 100
            )
            curves[n] = (
                vals.mean(0).tolist(),
                (vals.std(0) if len(seeds) > 1 else 0 * vals[0]).tolist(),
            )
        pan = dict(
            title=f"{k} noise", xlabel="severity", x=list(SEVERITIES), curves=curves, chance=10.0
        )
        if k == "gaussian":
            pan["paper"] = {"RobustBench WRN-28-10": (list(SEVERITIES), list(ROBUSTBENCH_GAUSSIAN))}
        panels.append(pan)
    C.plot_curves(r.out / "acc_vs_severity.png", panels, title=f"CIFAR-10-C style noise, {r.label}")
    csv_rows = [
        dict(seed=s, defence=n, case=c, n=r.mode["n_test_eff"], accuracy=a)
        for s in seeds
        for n in names
        for c, a in runs[s]["acc"][n].items()
    ]
    results = dict(
        config=dict(
            r.mode,
            kinds=list(KINDS),
            severities=list(SEVERITIES),
            paper_stds=list(PAPER_STDS),
            attack_eps=list(ATTACK_EPS),
        ),
        robustbench_gaussian=list(ROBUSTBENCH_GAUSSIAN),
        summary={
            n: {
                "clean": float(np.mean([runs[s]["acc"][n]["clean"] for s in seeds])),
                "mean_corruption": float(
                    np.mean([[runs[s]["acc"][n][c] for c in sev_cases] for s in seeds])
                ),
            }
            for n in names
        },
        runs={str(s): run for s, run in runs.items()},
    )
    text = f"[{EXPERIMENT}] {r.label}\n" + C.text_table(headers, rows)
    return r.finish(results=results, markdown="\n".join(md), csv_rows=csv_rows, summary=text)


if __name__ == "__main__":
    C.use_fast_allocator()
    run()
