"""Is GB's small-budget robustness real? Attacks built against GB itself, and adversarial
training beside it (issue 25; docs/methods.md, section 9).

    python experiments/adaptive_cifar.py --quick --data-dir ../shared/data \\
        --models results/fgsm_cifar/<quick run>          # quick: 15.0 min measured
    python experiments/adaptive_cifar.py --data-dir ../shared/data \\
        --models results/fgsm_cifar/<run>                # default: reuse the main job's models
    python experiments/adaptive_cifar.py --smoke --synthetic --out /tmp/s      # about a minute

(Times on 2 CPU cores: the measured ones are in results.json's ``timings`` and
docs/results/adaptive_cifar/.)

What it does, per seed:

1. **Models.** The main job's two classifiers, *unprocessed* and *GB* (trained
   on granular-ball-painted images, threshold 20, purity 0.9), restored from
   ``--models DIR`` (the main job's output folder, ``DIR/checkpoints/<name>_seed<k>``)
   when there, else trained here with the main job's recipe. Beside them, the
   same network and recipe trained *adversarially* (N-FGSM, de Jorge et al.
   2022: one gradient step from uniform noise in [-2 eps, 2 eps]) at a small
   budget and at 8/255 (``--at``, default ``2,8:pgd3``; quick mode ``2``): an
   entry ``8:pgd3`` trains with PGD-3 (Madry et al. 2018) instead, named
   ``at_8_pgd3``, as the default does at 8/255, where N-FGSM collapses on this
   network (docs/methods.md 9.5). Each is trained for the plain models' number
   of gradient computations: their epochs over the forward-backward passes of a
   step (N-FGSM 2, PGD-3 4): quick mode 2 and 1 epochs, default mode 4.95 and
   2.475 (``--at-epochs`` sets the epochs instead and names the models
   ``at_<eps>_<epochs>ep``).
   An entry ending in ``:gb`` (``2:gb``: ``at_2_gb``) puts GB in the loop: each
   step attacks the raw image through GB by BPDA and trains on the painted
   adversarial image; the model is then scored and attacked behind GB, with
   GB's protocols and stages.
   PGD-10 accuracy on 200 held-out test images is logged at every epoch's end,
   so catastrophic overfitting would show in the models' metrics.jsonl.
2. **The main job's worst-case cascade, unchanged** (FGSM, PGD, APGD-CE,
   APGD-DLR under every protocol, transfer, Square at the main job's budget),
   on the same first ``n_eval`` test images of the same fixed random subset.
   When ``--models`` is the main job's output folder and its ``state/`` holds
   that model's cascade on the same images, its flags at these budgets are
   taken (``gbjax.attacks.reuse_group``), not recomputed.
3. **New stages, aimed at GB** (each only attacks the images still robust):

   * APGD-CE through BPDA with a *soft-assignment surrogate* of GB's painting
     (each pixel painted with a softmax(-d^2 / tau) mix of the current balls'
     centres), one stage per ``tau``;
   * APGD-CE through BPDA with the *partition surrogate*: soft assignment plus
     a soft purity test per ball, whose gradient pushes pixels across the
     threshold when splitting a ball (painting its members with their own
     colours) raises the loss: an attack on the partition itself;
   * SPSA (Uesato et al. 2018) on the defended function, gradient-free;
   * Square at its published budget (5,000 queries) on every image.

   The unprocessed and adversarially trained models get SPSA and Square-5000
   after the cascade too, so every row faces the same attacks that apply.
4. **Convergence** of the strongest GB stage against APGD steps, on
   ``conv_n`` images at 2/255.

The two plain models are attacked (steps 2-4) before the adversarial trainings
start, so their rows are in the log and ``OUT/state/`` an hour earlier.
State is saved after every stage (``OUT/state/<model>_seed<k>.json``): a run
that is stopped continues at the next stage when started again with the same
``--out``. Robust = right clean and at every iterate of every stage; 95%
Wilson intervals. Nothing is tuned toward any paper's number.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
import zlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import fgsm_cifar as F  # noqa: E402
import numpy as np  # noqa: E402

EXPERIMENT = "adaptive_cifar"
EPS = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
EPS_LABELS = ("1/255", "2/255", "4/255", "8/255")
CONV_EPS, CONV_LABEL = 2 / 255, "2/255"

_SMOKE = dict(
    F.MODES["smoke"],
    taus=(100.0,),
    spsa_steps=3,
    spsa_samples=8,
    square_queries=8,
    at="2,8",
    conv_steps=(2, 3),
)
MODES = {
    "smoke": _SMOKE,
    # Quick: sized for 20 min with --models the quick main job's folder (its two models
    # and its cascade reused): one adversarial training, at the small budget where GB
    # helps, SPSA 10 steps x 32 samples and Square 1,000 queries (in adaptive_quick3
    # SPSA-20x64 removed no image after the gradient stages and Square-5000 six).
    # Measured: 1,358 s (quick_seed0_20261206), of which the N-FGSM training 637 s; after
    # the unrolled N-FGSM step, the batched attacks and tcmalloc 900 s (..._20261206b).
    "quick": dict(
        F.MODES["quick"],
        taus=(100.0,),
        spsa_steps=10,
        spsa_samples=32,
        square_queries=1000,
        at="2",
        conv_steps=(10, 20, 50),
    ),
    # Default: with --models the default main job's folder. Measured 2026-12-06 on a slow
    # day (docs/results/adaptive_cifar/full*_seed0_20261206, two runs): the plain models'
    # stages 36 min, the AT trainings 34 + 30 min, at_2's stages 41 min, at_8_pgd3's
    # 38 min: about 3 h 0 min as one run (estimated from the two). The plain models'
    # rows come first, then the AT trainings and their rows (--skip-at: the plain rows
    # only). The main job's cascade
    # on the two AT models (500 images); SPSA (20 x 32) and Square-5000 on the first 50
    # of the 500 (on all 500: an estimated 6 h for Square).
    "full": dict(
        F.MODES["full"],
        taus=(25.0, 100.0, 400.0),
        spsa_steps=20,
        spsa_samples=32,
        spsa_first=50,
        square_queries=5000,
        square_first=50,
        at="2,8:pgd3",  # N-FGSM at 8/255 collapses on airbench (docs/methods.md 9.5)
        conv_steps=(10, 20, 50, 100, 200),
    ),
}
AT_EVAL_N, AT_EVAL_STEPS = 200, 10


def parse_args(argv=None):
    p = C.base_parser(__doc__)
    p.add_argument("--threshold", type=float, default=20.0, help="GB threshold (pixel units)")
    p.add_argument("--purity", type=float, default=0.9, help="GB purity")
    p.add_argument(
        "--models",
        default=None,
        help="the main job's output folder: reuse its trained models (checkpoints/<name>_seed<k>)",
    )
    p.add_argument(
        "--at",
        type=_at_list,
        default=None,
        help="adversarially trained models: comma-separated eps in x/255, each optionally "
        "':fgsm-rs' or ':pgd<steps>' (default N-FGSM) and ':gb' (GB in the loop), e.g. "
        "'2,8:pgd3,2:gb' (default: '2,8:pgd3'; --quick: '2')",
    )
    p.add_argument(
        "--at-epochs",
        type=float,
        default=None,
        help="override: epochs of the adversarial trainings (the models are then named "
        "at_<eps>_<epochs>ep, so they never mix with the mode's own)",
    )
    p.add_argument("--n-eval", type=int, default=None, help="override: worst-case subset size")
    p.add_argument("--train-only", action="store_true", help="train (or restore) and stop")
    p.add_argument("--skip-at", action="store_true", help="no adversarially trained models")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------
# models


def _finished(workdir: pathlib.Path) -> dict | None:
    """The summary of a finished run in ``workdir``, else None."""
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in reversed(path.read_text().splitlines()):
        rec = json.loads(line)
        if rec.get("event") == "summary":
            return rec
    return None


def _at_list(text: str) -> tuple[dict, ...]:
    """``'2,8:pgd3,2:gb'`` -> ``({'eps': 2/255, 'method': 'n-fgsm'}, {'eps': 8/255,
    'method': 'pgd', 'steps': 3}, {'eps': 2/255, 'method': 'n-fgsm', 'gb': True})``
    (``gb``: GB in the loop); argparse reports a ValueError as a bad value."""
    out = []
    for entry in text.split(","):
        eps_text, *flags = entry.strip().split(":")
        gb = "gb" in flags
        flags = [f for f in flags if f != "gb"]
        if len(flags) > 1:
            raise ValueError(f"{entry!r}: at most one method and 'gb'")
        method = flags[0] if flags else ""
        eps = float(eps_text) / 255
        if not 0 < eps <= 1:
            raise ValueError(f"eps {eps_text!r} must be in (0, 255] (x/255)")
        spec = dict(eps=eps, method=method or "n-fgsm")
        if gb:
            spec["gb"] = True
        if method.startswith("pgd"):
            spec.update(method="pgd", steps=int(method[3:] or 3))
        elif spec["method"] not in ("n-fgsm", "fgsm-rs"):
            raise ValueError(f"unknown method {method!r}: use fgsm-rs or pgd<steps>")
        out.append(spec)
    return tuple(out)


def model_specs(mode, args) -> dict:
    """{name: (adversarial settings, preprocessed)} of the models of this run."""
    specs = {"unprocessed": ({}, False), "gb": ({}, True)}
    if not args.skip_at:
        for spec in args.at if args.at is not None else _at_list(mode["at"]):
            adv = dict(spec, eval_n=AT_EVAL_N, eval_steps=AT_EVAL_STEPS)
            if spec.get("gb"):  # GB in the loop: raw images in, the trainer paints
                adv["gb"] = dict(threshold=args.threshold, purity=args.purity)
            specs[at_name(spec, args.at_epochs)] = (adv, False)
    return specs


def at_name(spec: dict, epochs: float | None = None) -> str:
    """``at_<eps x 255>[_<epochs>ep][_<method>][_gb]``, the method left out for N-FGSM,
    ``_gb`` for GB in the loop."""
    method = spec.get("method", "n-fgsm")
    tag = {"n-fgsm": "", "pgd": f"_pgd{spec.get('steps', 3)}"}.get(method, f"_{method}")
    tag += "_gb" if spec.get("gb") else ""
    return f"at_{spec['eps'] * 255:g}" + ("" if epochs is None else f"_{epochs:g}ep") + tag


def gradient_passes(adv: dict) -> int:
    """Forward-backward passes of one adversarial training step: 2 for N-FGSM and
    FGSM-RS (the attack's and the update's), ``steps`` + 1 for PGD."""
    return adv.get("steps", 3) + 1 if adv.get("method") == "pgd" else 2


def training_config(mode: dict, args, adv: dict, seed: int, progress: bool):
    """The Config a model is trained with. An adversarially trained one (``adv`` not
    empty) gets the plain models' number of gradient computations (their epochs over
    :func:`gradient_passes`), or ``--at-epochs``, and scores the test set (with its PGD
    accuracy) every epoch, so that catastrophic overfitting shows."""
    mode = dict(mode)
    if adv:
        mode["eval_every_epochs"] = 1
        if args.at_epochs is not None:
            mode["epochs"] = args.at_epochs
    cfg = F.classifier_config(mode, seed, progress)
    if adv:
        cfg.adversarial = adv
        if args.at_epochs is None:
            cfg.num_epochs = cfg.num_epochs / gradient_passes(adv)
    return cfg


def get_models(r, args, xtr_gb, xte_gb, seed, names=None):
    """Restores each model (of ``names``; default all) from ``--models`` or this run's
    folder, or trains it."""
    from gbjax import models, train

    out, metrics = {}, {}
    for name, (adv, pre) in model_specs(r.mode, args).items():
        if names is not None and name not in names:
            continue
        t0 = time.perf_counter()
        homes = [r.out / "checkpoints" / f"{name}_seed{seed}"]
        if args.models:
            homes.insert(0, pathlib.Path(args.models) / "checkpoints" / f"{name}_seed{seed}")
        done = next(((h, s) for h in homes if (s := _finished(h)) is not None), None)
        if done is not None:
            print(f"[{EXPERIMENT}] {name}: restored from {done[0]}")
            out[name], metrics[name] = train.restore_model(done[0]), dict(done[1], reused=True)
        else:
            cfg = training_config(r.mode, args, adv, seed, r.progress)
            tr, te = (xtr_gb, xte_gb) if pre else (r.xtr, r.xte)
            out[name], metrics[name] = C.train_model(cfg, homes[-1], (tr, r.ytr), (te, r.yte))
            metrics[name]["train_seconds"] = r.timer.mark(f"train_{name}", t0)
        models.in_float32(out[name])
    return out, metrics


# ----------------------------------------------------------------------------
# stages


def adaptive_stages(name, scored, classifier, gb_defence, mode):
    """The new stages, in cost order (``gbjax.attacks.cascade`` runs each on the survivors
    of the ones before)."""
    from gbjax import attacks, defences
    from gbjax.attacks import Stage

    stages = []
    if gb_defence is not None:
        surrogates = {
            f"APGD-CE soft-BPDA tau={tau:g}": attacks.SoftGB(gb_defence, tau=tau)
            for tau in mode["taus"]
        }
        surrogates["APGD-CE partition surrogate"] = attacks.SoftGB(
            gb_defence, tau=mode["taus"][-1], soft_purity=True
        )
        for label, surrogate in surrogates.items():
            fn = defences.Defended(classifier, attacks.bpda(gb_defence, surrogate))
            steps, chunk = mode["apgd_steps"], F.chunk_for(name)
            stages.append(
                Stage(label, "apgd-ce", fn, eval_logits_fn=scored, steps=steps, chunk=chunk)
            )
    steps, samples, q = mode["spsa_steps"], mode["spsa_samples"], mode["square_queries"]
    n_sp, n_sq = mode.get("spsa_first"), mode.get("square_first")  # None: every image
    sp_label = f"SPSA-{steps}x{samples}" + ("" if n_sp is None else f" (first {n_sp})")
    stages.append(Stage(sp_label, "spsa", scored, steps=steps, samples=samples, first=n_sp))
    sq_label = f"Square-{q} " + ("(all)" if n_sq is None else f"(first {n_sq})")
    stages.append(Stage(sq_label, "square", scored, queries=q, first=n_sq))
    return stages


def convergence(classifier, scored, gb_defence, x, y, mode, key, progress):
    """Robust accuracy at 2/255 of the soft-BPDA APGD-CE against steps (not a cascade)."""
    from gbjax import attacks, defences

    tau = mode["taus"][-1]
    fn = defences.Defended(
        classifier, attacks.bpda(gb_defence, attacks.SoftGB(gb_defence, tau=tau))
    )
    acc = [
        float(
            attacks.accuracy_under_attack(
                fn,
                x,
                y,
                eps_list=[CONV_EPS],
                attack="apgd-ce",
                steps=s,
                eval_logits_fn=scored,
                key=key(f"conv {s}"),
                chunk=1,
                batch_size=mode["attack_batch"],
                progress=progress,
            )[0]
        )
        for s in mode["conv_steps"]
    ]
    return dict(
        attack=f"APGD-CE soft-BPDA tau={tau:g}",
        steps=list(mode["conv_steps"]),
        accuracy=acc,
        eps=CONV_LABEL,
        n=len(x),
    )


def reuse_main_job(models_dir, name, seed, state, group, x, y):
    """The main job's state file whose flags start this cascade (its cascade on the
    same images, at these budgets among its own), or None when there is none to
    reuse: the group is then run here."""
    from gbjax import attacks

    marker = state.with_name(state.stem + ".reused_from.txt")
    if marker.is_file():  # a resumed run that took it earlier
        return marker.read_text().strip()
    if models_dir is None:
        return None
    source = pathlib.Path(models_dir) / "state" / f"{name}_seed{seed}.json"
    try:
        if attacks.reuse_group(source, state, group, x, y, eps_list=EPS):
            marker.write_text(f"{source}\n")
            print(f"[{EXPERIMENT}] {name}: the main job's cascade taken from {source}")
            return str(source)
    except ValueError as e:
        print(f"[{EXPERIMENT}] {name}: the main job's cascade is run here, not reused: {e}")
    return None


def evaluate_models(
    trained, gb_defence, x01, y, mode, seed, out, progress, timer, models_dir=None, only=None
):
    """The cascade of every model in ``trained`` (of ``only``, when given; ``trained``
    must hold ``unprocessed`` and ``gb``, the transfer source and the GB model)."""
    import jax

    from gbjax import attacks, defences, evaluate

    def key(label):
        return jax.random.fold_in(jax.random.key(1000 + seed), zlib.crc32(label.encode()))

    idx = C.eval_indices(len(x01), mode["n_eval"])  # random: the test set is class-sorted
    n_eval = len(idx)
    xe, ye = x01[idx], y[idx]
    fns = F.model_functions({k: trained[k] for k in ("unprocessed", "gb")}, gb_defence)
    for name in trained:
        if name in fns:
            continue
        if F.behind_gb(name):  # GB + adversarial training: attacked as the GB model is
            fns[name] = F.gb_functions(trained[name], gb_defence)
        else:  # adversarially trained: the classifier alone
            fns[name] = (defences.Defended(trained[name]), {"none": trained[name]})
    res = {}
    for name, (scored, attacked) in fns.items():
        if only is not None and name not in only:
            continue
        t0 = time.perf_counter()
        clean = evaluate.accuracy(scored, x01, y, batch_size=mode["attack_batch"])
        # the main job's cascade (fgsm_cifar), recorded as one stage, then the new stages
        main = F.cascade_stages(name, scored, attacked, mode, trained["unprocessed"], n_eval)
        gb = gb_defence if F.behind_gb(name) else None
        stages = [attacks.Group("main job cascade", main)]
        stages += adaptive_stages(name, scored, trained[name], gb, mode)
        state = out / "state" / f"{name}_seed{seed}.json"  # a stopped run resumes here
        reused = reuse_main_job(models_dir, name, seed, state, stages[0], xe, ye)
        worst = attacks.cascade(
            stages,
            xe,
            ye,
            eps_list=EPS,
            key=jax.random.key(1000 + seed),  # stage s gets key(s's name), as below
            batch_size=mode["attack_batch"],
            state=state,
            progress=progress,
            desc=name,
        )
        k = worst.robust.sum(1)
        rec = dict(
            clean=clean,
            n_eval=n_eval,
            eval_indices=idx.tolist(),  # 'removed' lists are positions in this list
            stages=worst.records(),
            worst_case=(k / n_eval).tolist(),
            worst_case_ci=[attacks.wilson_interval(int(v), n_eval) for v in k],
            main_job_worst_case=worst.stages[0].accuracy.tolist(),
            main_job_cascade_from=reused,
        )
        if name == "gb":
            nc = min(mode["conv_n"], n_eval)
            rec["convergence"] = convergence(
                trained["gb"], scored, gb_defence, xe[:nc], ye[:nc], mode, key, progress
            )
        seconds = timer.mark(f"attacks_{name}", t0)
        res[name] = rec
        print(
            f"[{EXPERIMENT}] {name}: worst case "
            + " / ".join(_pct(v) for v in rec["worst_case"])
            + f"% at {' / '.join(EPS_LABELS)} ({seconds:.0f} s)"
        )
    return res


# ----------------------------------------------------------------------------
# report


def _pct(v):
    return f"{100 * v:.1f}"


def report(r, args, runs) -> dict:
    seed = r.seeds[0]
    run = runs[seed]
    names = list(run)
    md = [
        f"# Attacks built against GB, and adversarial training beside it ({r.label})",
        "",
        "## Protocol",
        "",
        f"- Data: CIFAR-10 (our JPEG copy), {r.mode['n_train_eff']} training and "
        f"{r.mode['n_test_eff']} test images (fixed random subsets, seed 0); seed {seed}.",
        f"- Classifiers: {F.model_description(r.mode)}; `gb` trained on GB-painted images "
        f"(threshold {args.threshold}, purity {args.purity}); `at_<eps>*` trained "
        "adversarially at that eps (x/255): N-FGSM, or PGD-k where the name ends in `_pgd<k>`.",
        f"- Worst case on a fixed random {run['gb']['n_eval']} test images (all classes): the "
        "main job's cascade "
        "(fgsm_cifar), then the new stages, each on the survivors. Robust = right clean and "
        "at every iterate of every stage. [95% Wilson interval].",
        "- The papers: the GB paper reports only FGSM at eps 0.2 (GB 73.6%, unprocessed "
        "68.5%, Table 2), with no adaptive attack and no adversarially trained baseline; "
        "there is no paper number to put beside these rows.",
        "",
        "## Worst case (%)",
        "",
        "| model | clean (all test images) | "
        + " | ".join(f"{e} main job / all stages" for e in EPS_LABELS)
        + " |",
        "| --- | --- | " + " | ".join("---" for _ in EPS_LABELS) + " |",
    ]
    for name in names:
        rec = run[name]
        cells = [
            f"{_pct(m)} / **{_pct(w)}** [{_pct(ci[0])}, {_pct(ci[1])}]"
            for m, w, ci in zip(rec["main_job_worst_case"], rec["worst_case"], rec["worst_case_ci"])
        ]
        md.append(f"| {name} | {_pct(rec['clean'])} | " + " | ".join(cells) + " |")
    md += ["", "## Stages: accuracy after each (%), images removed, seconds", ""]
    for name in names:
        md += [f"### {name}", ""]
        if run[name].get("main_job_cascade_from"):
            md += [
                f"'main job cascade': the main job's flags, taken from "
                f"`{run[name]['main_job_cascade_from']}` (not re-run here).",
                "",
            ]
        md += ["| stage | " + " | ".join(EPS_LABELS) + " | s |"]
        md.append("| --- | " + " | ".join("---" for _ in EPS_LABELS) + " | --- |")
        for s in run[name]["stages"]:
            cells = [f"{_pct(a)} (-{len(rm)})" for a, rm in zip(s["accuracy"], s["removed"])]
            md.append(f"| {s['stage']} | " + " | ".join(cells) + f" | {s['seconds']:.0f} |")
        md.append("")
    conv = run["gb"].get("convergence")
    if conv:
        md += [
            f"## Convergence: {conv['attack']} at {conv['eps']} on {conv['n']} images",
            "",
            "| steps | " + " | ".join(str(s) for s in conv["steps"]) + " |",
            "| --- | " + " | ".join("---" for _ in conv["steps"]) + " |",
            "| accuracy % | " + " | ".join(_pct(a) for a in conv["accuracy"]) + " |",
            "",
        ]
    md += ["## Training", "", "| model | test acc (TTA if any) | PGD-10 acc at its eps | s |"]
    md.append("| --- | --- | --- | --- |")
    for name in names:
        m = run[name]["train_metrics"]
        tta = m.get("tta", "none")
        md.append(
            f"| {name} | {_pct(m.get('test_accuracy', float('nan')))}"
            f"{'' if tta == 'none' else f' ({tta})'} | "
            f"{_pct(m['pgd_accuracy']) if 'pgd_accuracy' in m else '-'} | "
            f"{m.get('train_seconds', m.get('wall_time_s', float('nan'))):.0f}"
            f"{' (reused)' if m.get('reused') else ''} |"
        )
    zero = [0.0] * len(EPS)
    C.plot_curves(
        r.out / "worst_case_vs_eps.png",
        [
            dict(
                title=title,
                xlabel="eps (x/255)",
                ylabel="robust accuracy %",
                x=[e * 255 for e in EPS],
                curves={n: ([100 * a for a in run[n][key]], zero) for n in names},
            )
            for title, key in (
                ("main job's cascade", "main_job_worst_case"),
                ("all stages (attacks built against GB)", "worst_case"),
            )
        ],
        title=f"Worst case per model, {run['gb']['n_eval']} random test images ({r.label})",
    )
    summary = "\n".join(md[md.index("## Worst case (%)") :][: 4 + len(names)])
    csv_rows = [
        dict(model=n, eps=e, stage=s["stage"], accuracy=a)
        for n in names
        for s in run[n]["stages"]
        for e, a in zip(EPS_LABELS, s["accuracy"])
    ]
    return r.finish(
        results=dict(
            runs=runs,
            config=dict(r.mode, threshold=args.threshold, purity=args.purity),
            eps=list(EPS),
            eps_labels=list(EPS_LABELS),
        ),
        markdown="\n".join(md) + "\n",
        summary=summary,
        csv_rows=csv_rows,
    )


def run(argv=None) -> dict:
    from gbjax import data, defences

    args = parse_args(argv)
    if args.merge:  # the tables of earlier runs (e.g. one per seed) as one
        r, runs = C.start_merge(EXPERIMENT, args, args.merge)
        args.threshold = r.mode.get("threshold", args.threshold)
        args.purity = r.mode.get("purity", args.purity)
        return report(r, args, runs)
    r = C.start(EXPERIMENT, args, MODES, "cifar10", ("n_train", "n_test", "n_eval", "epochs"))
    gbkw = dict(threshold=args.threshold, purity=args.purity)
    t0 = time.perf_counter()
    xtr_gb = data.gb_processed(r.xtr, progress=r.progress, **gbkw)
    xte_gb = data.gb_processed(r.xte, progress=r.progress, **gbkw)
    r.timer.mark("gb_preprocess", t0)
    x01 = r.xte.astype(np.float32) / 255.0
    runs = {}
    plain = ("unprocessed", "gb")
    at_names = tuple(n for n in model_specs(r.mode, args) if n not in plain)
    gb_defence = defences.GB(**gbkw)
    for seed in r.seeds:
        # the plain models' rows first (their models are usually the main job's), then
        # the adversarial trainings and their rows; a stopped run resumes either way
        trained, metrics, ev = {}, {}, {}
        for group in (plain, at_names):
            if not group:
                continue
            more, more_metrics = get_models(r, args, xtr_gb, xte_gb, seed, names=group)
            trained, metrics = trained | more, metrics | more_metrics
            if not args.train_only:
                ev |= evaluate_models(
                    trained,
                    gb_defence,
                    x01,
                    r.yte,
                    r.mode,
                    seed,
                    r.out,
                    r.progress,
                    r.timer,
                    args.models,
                    only=group,
                )
        if args.train_only:
            continue
        runs[seed] = {m: dict(ev[m], train_metrics=metrics[m]) for m in ev}
    if args.train_only:
        print(f"[{EXPERIMENT}] models trained or restored in {r.out}/checkpoints")
        return {}
    return report(r, args, runs)


if __name__ == "__main__":
    C.use_fast_allocator()
    run()
