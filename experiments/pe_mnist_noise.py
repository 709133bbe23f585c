"""MNIST + noise: raw, normalisation-only and pixel-embedding networks (PE paper, Tables 3-5).

    python experiments/pe_mnist_noise.py --quick --data-dir ../shared/data   # CPU, minutes
    python experiments/pe_mnist_noise.py --smoke --synthetic --out /tmp/s    # seconds
    # full size, one seed per command (about 16 min either protocol, 2 idle cores), then merged:
    python experiments/pe_mnist_noise.py --seeds 0 --protocol authors --out r/a0 --data-dir ...
    python experiments/pe_mnist_noise.py --seeds 1 --protocol authors --out r/a1 --data-dir ...
    python experiments/pe_mnist_noise.py --merge r/a0 r/a1 --out r/authors

Protocol (also written into results.md):

* Three PaperConvNet variants (PE paper's Table 1 network; Adam 1e-4, batch 64,
  ``gbjax/configs/raw_mnist.py`` / ``pe_mnist.py``): *raw* (0..255 pixels, "without
  PE"), *normalized* (normalisation only, Table 5) and *PE* (pixel embedding, 2001
  x 64 table, scale 1000).
* ``--protocol ours`` (default): normalisation statistics are the fixed
  training-set mean/std (the sound choice); test images are used as they are.
  ``--protocol authors``: the authors' code: one mean/std over the current batch
  (64 in training, the whole test set at test time, so the normalized and PE
  networks are evaluated on the test set as one batch), and every evaluated test
  image, clean ones included, saved as JPEG quality 75 and decoded again.
* Trained on clean images, evaluated on ``n_test`` noisy test images.
* Noise, every case of the paper, in two semantics:
  - *authors'*: Gaussian ``(mu, sigma)`` added with uint8 wrap-around
    (``noise.gaussian(mode="wrap")``), and "(p, v)" = with probability p add v
    modulo 256 (``noise.additive_impulse``);
  - *standard*: Gaussian clipped to 0..255 (``mode="clip"``), and
    salt-and-pepper with amount p (``noise.salt_and_pepper``; v has no meaning
    there, so cases with the same p differ only by the noise draw).
  ``--jpeg-quality Q`` sets the JPEG re-encoding explicitly (0: none).
"""

from __future__ import annotations

import io
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import numpy as np  # noqa: E402

EXPERIMENT = "pe_mnist_noise"
GAUSS = ((1, 1), (5, 1), (10, 2), (25, 5), (50, 10), (75, 15), (100, 10), (150, 10))
IMPULSE = (
    (0.1, 25),
    (0.1, 50),
    (0.1, 100),
    (0.2, 50),
    (0.3, 50),
    (0.4, 50),
    (0.5, 50),
    (0.5, 100),
    (0.6, 50),
    (0.6, 100),
    (0.7, 50),
    (0.7, 100),
    (0.8, 100),
)
NETS = ("raw", "normalized", "pe")
PROTOCOLS = ("ours", "authors")
SEMANTICS = ("authors", "standard")
# Paper: Table 3 (Gaussian; raw, PE), Table 4 (s&p; raw, PE), Table 5 (normalized, Gaussian).
PAPER_T3 = {
    "clean": (98.7, 97.83),
    (1, 1): (85.70, 95.94),
    (5, 1): (88.66, 88.10),
    (10, 2): (78.53, 80.18),
    (25, 5): (53.24, 67.92),
    (50, 10): (28.71, 59.89),
    (75, 15): (18.61, 40.22),
    (100, 10): (17.81, 33.52),
    (150, 10): (12.22, 18.84),
}
PAPER_T4 = {
    "clean": (98.17, 97.83),
    (0.1, 25): (94.72, 96.96),
    (0.1, 50): (90.10, 97.07),
    (0.1, 100): (84.24, 96.03),
    (0.2, 50): (86.93, 95.28),
    (0.3, 50): (82.36, 91.14),
    (0.4, 50): (77.31, 89.59),
    (0.5, 50): (69.53, 78.51),
    (0.5, 100): (49.47, 77.75),
    (0.6, 50): (60.00, 81.55),
    (0.6, 100): (35.38, 64.12),
    (0.7, 50): (48.40, 71.72),
    (0.7, 100): (22.20, 59.09),
    (0.8, 100): (14.93, 47.62),
}
PAPER_T5 = dict(
    zip(["clean"] + list(GAUSS), (97.57, 70.25, 72.26, 54.14, 24.85, 11.56, 10.11, 9.94, 9.93))
)

MODES = {
    "smoke": dict(n_train=256, n_test=64, epochs=1, num_steps=4),
    "quick": dict(n_train=6400, n_test=1000, epochs=1, num_steps=None),
    "full": dict(n_train=None, n_test=None, epochs=5, num_steps=None),
}


def parse_args(argv=None):
    p = C.base_parser(__doc__)
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="ours",
        help="ours: dataset statistics, no JPEG; authors: batch statistics, JPEG q75 test images",
    )
    p.add_argument(
        "--jpeg-quality",
        type=int,
        default=None,
        help="re-encode test images as JPEG at this quality (default: 75 for --protocol "
        "authors, none otherwise; 0: none)",
    )
    args = p.parse_args(argv)
    if args.jpeg_quality is None:
        args.jpeg_quality = 75 if args.protocol == "authors" else 0
    return args


def make_config(net, mode, seed, progress, protocol="ours"):
    from gbjax.configs import pe_mnist, raw_mnist

    cfg = {
        "raw": lambda: raw_mnist.get_config(),
        "normalized": lambda: raw_mnist.get_config("normalized"),
        "pe": lambda: pe_mnist.get_config(),
    }[net]()
    if protocol == "authors" and net != "raw":
        cfg.model_kwargs["stats"] = "batch"
    cfg.num_epochs = mode["epochs"]
    cfg.num_steps = mode["num_steps"]
    cfg.eval_batch_size = min(1000, mode["n_test_eff"])
    cfg.seed = seed
    cfg.progress = progress
    cfg.checkpoint_every_steps = 10**9
    cfg.log_every_steps = 50
    return cfg


def jpeg_roundtrip(x: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    out = np.empty_like(x)
    for i, img in enumerate(x):
        buf = io.BytesIO()
        Image.fromarray(img[..., 0]).save(buf, format="JPEG", quality=quality)
        out[i, ..., 0] = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    return out


def noisy_images(x, key, family, case, semantics):
    from gbjax import noise

    if family == "gaussian":
        mu, sigma = case
        return noise.gaussian(
            x, key, mean=mu, std=sigma, mode="wrap" if semantics == "authors" else "clip"
        )
    p, v = case
    if semantics == "authors":
        return noise.additive_impulse(x, key, p=p, v=v)
    return noise.salt_and_pepper(x, key, amount=p)


def run(argv=None) -> dict:
    import jax
    from tqdm.auto import tqdm

    from gbjax import evaluate

    args = parse_args(argv)
    if args.merge:
        r, runs = C.start_merge(EXPERIMENT, args, args.merge)
        args.protocol = r.mode["protocol"]
        args.jpeg_quality = r.mode["jpeg_quality"]
        return assemble(r, args, runs)
    r = C.start(EXPERIMENT, args, MODES, "mnist", ("n_train", "n_test", "epochs"))
    mode, seeds, progress, out, timer = r.mode, r.seeds, r.progress, r.out, r.timer
    xtr, ytr, xte, yte = r.xtr, r.ytr, r.xte, r.yte
    cases = [("clean", None)] + [("gaussian", c) for c in GAUSS] + [("impulse", c) for c in IMPULSE]

    runs = {}
    for seed in seeds:
        models, metrics = {}, {}
        for net in NETS:
            t0 = time.perf_counter()
            models[net], metrics[net] = C.train_model(
                make_config(net, mode, seed, progress, args.protocol),
                out / "checkpoints" / f"{net}_seed{seed}",
                (xtr, ytr),
                (xte, yte),
            )
            timer.mark(f"train_{net}", t0)
        t0 = time.perf_counter()
        acc = {sem: {net: {} for net in NETS} for sem in SEMANTICS}
        bar = tqdm(
            total=len(cases) * len(SEMANTICS), desc=f"noise cases seed {seed}", disable=not progress
        )
        for si, sem in enumerate(SEMANTICS):
            for ci, (fam, case) in enumerate(cases):
                if fam == "clean":
                    xn = xte
                else:
                    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), si), ci)
                    xn = np.asarray(noisy_images(xte, key, fam, case, sem))
                if args.jpeg_quality:
                    xn = jpeg_roundtrip(xn, args.jpeg_quality)
                for net in NETS:
                    # batch statistics: the whole test set is one batch, as the authors did
                    bs = len(xn) if args.protocol == "authors" and net != "raw" else 1000
                    acc[sem][net][f"{fam}:{case}"] = evaluate.accuracy(
                        models[net], xn, yte, batch_size=bs
                    )
                bar.update(1)
        bar.close()
        timer.mark("noise_eval", t0)
        runs[seed] = dict(acc=acc, train_metrics=metrics)
    return assemble(r, args, runs)


def _cell(runs, seeds, sem, net, key):
    return C.pct(runs[s]["acc"][sem][net][key] for s in seeds)


def _stats(runs, seeds, sem, net, keys):
    ms = [C.mean_std(runs[s]["acc"][sem][net][k] for s in seeds) for k in keys]
    return [100 * a for a, _ in ms], [100 * b for _, b in ms]


def assemble(r, args, runs):
    mode, seeds, synthetic, label, out = r.mode, r.seeds, r.synthetic, r.label, r.out
    gkeys = ["clean:None"] + [f"gaussian:{c}" for c in GAUSS]
    ikeys = ["clean:None"] + [f"impulse:{c}" for c in IMPULSE]
    glabels = ["clean"] + [f"({m}, {s})" for m, s in GAUSS]
    ilabels = ["clean"] + [f"({p}, {v})" for p, v in IMPULSE]
    gpaper = [PAPER_T3["clean"]] + [PAPER_T3[c] for c in GAUSS]
    ipaper = [PAPER_T4["clean"]] + [PAPER_T4[c] for c in IMPULSE]
    h34 = [
        "case",
        "raw (authors')",
        "PE (authors')",
        "raw (standard)",
        "PE (standard)",
        "paper raw",
        "paper PE",
    ]
    t3 = [
        [lab]
        + [_cell(runs, seeds, sem, net, k) for sem in SEMANTICS for net in ("raw", "pe")]
        + [f"{p[0]:.2f}", f"{p[1]:.2f}"]
        for lab, k, p in zip(glabels, gkeys, gpaper)
    ]
    t4 = [
        [lab]
        + [_cell(runs, seeds, sem, net, k) for sem in SEMANTICS for net in ("raw", "pe")]
        + [f"{p[0]:.2f}", f"{p[1]:.2f}"]
        for lab, k, p in zip(ilabels, ikeys, ipaper)
    ]
    h5 = ["case", "normalized (authors')", "normalized (standard)", "paper normalized"]
    t5 = [
        [lab]
        + [_cell(runs, seeds, sem, "normalized", k) for sem in SEMANTICS]
        + [f"{PAPER_T5[c]:.2f}"]
        for lab, k, c in zip(glabels, gkeys, ["clean"] + list(GAUSS))
    ]
    jpeg = f"JPEG quality {args.jpeg_quality}" if args.jpeg_quality else "no JPEG re-encoding"
    md = [
        f"# MNIST + noise: raw, normalisation-only and PE networks, {args.protocol} protocol "
        f"({label})",
        "",
        "## Protocol",
        "",
        f"- Data: MNIST, {mode['n_train_eff']} training and {mode['n_test_eff']} test "
        f"images (fixed random subsets, seed 0){' (synthetic stand-in)' if synthetic else ''}; "
        f"seeds {seeds}.",
        "- Networks: the PE paper's Table 1 network, variants raw / normalized / PE "
        "(2001 x 64 embedding, scale 1000); Adam 1e-4, batch "
        f"64, {mode['num_steps'] or mode['epochs']} {'steps' if mode['num_steps'] else 'epochs'}"
        ", trained on clean images.",
        f"- Protocol **{args.protocol}**: "
        + (
            "normalisation statistics of the current batch (64 in training, the whole test "
            "set at test time), as in the authors' code"
            if args.protocol == "authors"
            else "fixed training-set normalisation statistics"
        )
        + f"; {jpeg} of every evaluated test image.",
        "- Authors' semantics: Gaussian (mu, sigma) added with uint8 wrap-around; (p, v) = with "
        "probability p add v mod 256. Standard semantics: Gaussian clipped to 0..255; "
        "salt-and-pepper with amount p (v unused). One noise draw per (seed, semantics, case); "
        f"{jpeg}.",
        "- Cells: accuracy % (mean ± std over seeds when several). Paper numbers are the "
        "authors' semantics (with JPEG q75).",
        "",
        "## Table 3: Gaussian noise (mu, sigma), raw vs PE",
        "",
        C.md_table(h34, t3),
        "",
        "## Table 4: salt-and-pepper (p, v), raw vs PE",
        "",
        C.md_table(h34, t4),
        "",
        "## Table 5: normalisation only, Gaussian noise",
        "",
        C.md_table(h5, t5),
        "",
        "![Gaussian](fig3_gaussian.png)",
        "",
        "![impulse](fig4_impulse.png)",
        "",
        "![normalized](fig5_normalized.png)",
        "",
        f"Runtime: {r.timer.total():.0f} s on {C.environment()['device_kind']}.",
        "",
    ]

    def panel(sem, keys, labels, nets, paper, title):
        return dict(
            title=f"{title} ({sem})",
            x=list(range(len(keys))),
            xticklabels=labels,
            xlabel="noise case",
            chance=10.0,
            curves={net: _stats(runs, seeds, sem, net, keys) for net in nets},
            paper=paper,
        )

    gp = {
        "paper raw": (list(range(len(gkeys))), [p[0] for p in gpaper]),
        "paper PE": (list(range(len(gkeys))), [p[1] for p in gpaper]),
    }
    ip = {
        "paper raw": (list(range(len(ikeys))), [p[0] for p in ipaper]),
        "paper PE": (list(range(len(ikeys))), [p[1] for p in ipaper]),
    }
    np5 = {
        "paper normalized": (
            list(range(len(gkeys))),
            [PAPER_T5[c] for c in ["clean"] + list(GAUSS)],
        )
    }
    C.plot_curves(
        out / "fig3_gaussian.png",
        [
            panel(s, gkeys, glabels, ("raw", "pe"), gp if s == "authors" else None, "Gaussian")
            for s in SEMANTICS
        ],
    )
    C.plot_curves(
        out / "fig4_impulse.png",
        [
            panel(s, ikeys, ilabels, ("raw", "pe"), ip if s == "authors" else None, "impulse / s&p")
            for s in SEMANTICS
        ],
    )
    C.plot_curves(
        out / "fig5_normalized.png",
        [
            panel(s, gkeys, glabels, NETS, np5 if s == "authors" else None, "Gaussian, all nets")
            for s in SEMANTICS
        ],
    )
    csv_rows = [
        dict(
            seed=s,
            semantics=sem,
            net=net,
            case=k,
            n=mode["n_test_eff"],
            accuracy=runs[s]["acc"][sem][net][k],
        )
        for s in seeds
        for sem in SEMANTICS
        for net in NETS
        for k in runs[s]["acc"][sem][net]
    ]
    results = dict(
        config=dict(
            mode,
            protocol=args.protocol,
            jpeg_quality=args.jpeg_quality,
            gaussian_cases=GAUSS,
            impulse_cases=IMPULSE,
            data_dir=args.data_dir,
        ),
        paper={
            "table3": {str(k): v for k, v in PAPER_T3.items()},
            "table4": {str(k): v for k, v in PAPER_T4.items()},
            "table5": {str(k): v for k, v in PAPER_T5.items()},
        },
        runs={str(s): run for s, run in runs.items()},
    )
    summary = (
        f"[{EXPERIMENT}] {label}\nTable 3 (Gaussian) accuracy %\n"
        + C.text_table(h34, t3)
        + "\n\nTable 4 (impulse) accuracy %\n"
        + C.text_table(h34, t4)
        + "\n\nTable 5 (normalized) accuracy %\n"
        + C.text_table(h5, t5)
    )
    return r.finish(results=results, markdown="\n".join(md), csv_rows=csv_rows, summary=summary)


if __name__ == "__main__":
    C.use_fast_allocator()
    run()
