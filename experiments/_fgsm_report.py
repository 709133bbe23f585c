"""Tables, figures and results.json of ``fgsm_cifar.py`` (the main job)."""

from __future__ import annotations

import _common as C
import numpy as np

NAMES = {"unprocessed": "unprocessed", "gb": "GB"}


def _pct(v):
    return f"{100 * v:.2f}"


def _mean(runs, seeds, model, get):
    return C.pct(get(runs[s][model]) for s in seeds)


def _ci(runs, seeds, model, i):
    if len(seeds) > 1:
        return ""
    lo, hi = runs[seeds[0]][model]["worst_case_ci"][i]
    return f" [{100 * lo:.1f}, {100 * hi:.1f}]"


def headline(runs, seeds, eps_labels, protocols, paper):
    """Rows: eps; clean/FGSM per protocol/worst case per model; paper beside."""
    headers = ["eps", "unprocessed FGSM"] + [f"GB FGSM {p}" for p in protocols]
    headers += ["unprocessed worst case", "GB worst case", "paper unprocessed", "paper GB"]
    has_gb = "gb" in runs[seeds[0]]
    rows = [
        ["0 (clean)", _mean(runs, seeds, "unprocessed", lambda r: r["clean"])]
        + [_mean(runs, seeds, "gb", lambda r: r["clean"]) if has_gb else "-"] * len(protocols)
        + [
            _mean(runs, seeds, "unprocessed", lambda r: r["clean_eval"]),
            _mean(runs, seeds, "gb", lambda r: r["clean_eval"]) if has_gb else "-",
            f"{paper[0.0][1]:.2f}",
            f"{paper[0.0][0]:.2f}",
        ]
    ]
    for i, lab in enumerate(eps_labels):
        row = [lab, _mean(runs, seeds, "unprocessed", lambda r, i=i: r["fgsm"]["none"][i])]
        for p in protocols:
            row.append(
                _mean(runs, seeds, "gb", lambda r, i=i, p=p: r["fgsm"][p][i]) if has_gb else "-"
            )
        for m in ("unprocessed", "gb"):
            if m == "gb" and not has_gb:
                row.append("-")
                continue
            row.append(
                _mean(runs, seeds, m, lambda r, i=i: r["worst_case"][i]) + _ci(runs, seeds, m, i)
            )
        pv = paper.get(float(lab)) if lab.replace(".", "").isdigit() else None
        row += [f"{pv[1]:.2f}", f"{pv[0]:.2f}"] if pv else ["-", "-"]
        rows.append(row)
    return headers, rows


def stage_table(rec, eps_labels):
    headers = ["after stage"] + list(eps_labels)
    rows = [[s["stage"]] + [_pct(a) for a in s["accuracy"]] for s in rec["stages"]]
    return headers, rows


def assemble(
    r, args, runs, gb_time, eps, eps_labels, protocols, paper, large_eps, conv_label, model_text
):
    mode, seeds, out = r.mode, r.seeds, r.out
    first = runs[seeds[0]]
    h, rows = headline(runs, seeds, eps_labels, protocols, paper)
    n_eval = first["unprocessed"]["n_eval"]
    md = [
        f"# CIFAR-10 under attack: granular-ball preprocessing vs none ({r.label})",
        "",
        "## Protocol",
        "",
        f"- Data: CIFAR-10 (our JPEG copy), {mode['n_train_eff']} training images, "
        f"{mode['n_test_eff']} test images (fixed random subsets, seed 0); seeds {seeds}.",
        f"- Classifiers: {model_text}; one unprocessed, one trained on GB-painted images "
        f"(threshold {args.threshold}, purity {args.purity}; painting "
        f"{mode['n_train_eff'] + mode['n_test_eff']} images took {gb_time:.0f} s). "
        "Evaluated in float32, TTA off.",
        "- Scored function: `Defended(classifier, GB)` (GB model) or the classifier, on [0, 1] "
        "images; clean and attacked rows use it alike.",
        (
            "- FGSM (the paper's attack): every test image; GB model under each protocol."
            if first["unprocessed"].get("n_fgsm", mode["n_test_eff"]) >= mode["n_test_eff"]
            else f"- Clean: every test image. FGSM (the paper's attack): a fixed random "
            f"{first['unprocessed']['n_fgsm']} of them; GB model under each protocol."
        ),
        f"- Worst case: a fixed random {n_eval} test images (all classes, in random order); "
        "robust = right clean and at every "
        f"iterate of FGSM, PGD-{mode['pgd_steps']} (random start, step 2.5 eps/steps), "
        f"APGD-CE and APGD-DLR ({mode['apgd_steps']} steps) under every protocol, transfer "
        f"from the unprocessed model (PGD, APGD-CE), and Square ({mode['queries']} queries, "
        f"first {mode['n_square']} images); [95% Wilson interval] with one seed.",
        "- The paper gives only eps 0 and 0.2, without eps scale or attack protocol; we read "
        "0.2 on [0, 1] images. Cells: accuracy % (mean ± std over seeds when several).",
        "",
        "## Headline (paper Table 2 beside ours)",
        "",
        C.md_table(h, rows),
        "",
        "Clean row: FGSM columns on all test images; worst-case columns on the worst-case subset.",
        "",
    ]
    for m in first:
        sh, sr = stage_table(first[m], eps_labels)
        md += [
            f"## Cascade, {NAMES[m]} model (seed {seeds[0]}): robust accuracy % after each stage",
            "",
            C.md_table(sh, sr),
            "",
        ]
    md += [
        f"## Controls (seed {seeds[0]})",
        "",
        "Random-sign noise `clip(x + eps s)` (accuracy %), and every protocol at eps "
        f"{large_eps} (should be about 0):",
        "",
    ]
    ch = ["model"] + list(eps_labels) + [f"eps {large_eps}: protocol, accuracy %"]
    crow, flags = [], []
    for m, rec in first.items():
        c = rec["controls"]
        large = ", ".join(f"{p} {_pct(a)}" for p, a in c["large_eps"].items())
        crow.append([NAMES[m]] + [_pct(a) for a in c["noise"]] + [large])
        flags += [f"{NAMES[m]}/{p}" for p, a in c["large_eps"].items() if a > 0.05]
    md += [
        C.md_table(ch, crow),
        "",
        (
            "**Flag: accuracy above 5% at eps {} for {}.**".format(large_eps, ", ".join(flags))
            if flags
            else f"Every protocol is at or below 5% at eps {large_eps}."
        ),
        "",
    ]
    if "gb" in first:
        s = first["gb"]["saturation"]
        md += [
            "## GB capacity saturation (fraction of worst-case images that fill 256 balls)",
            "",
            C.md_table(
                ["images"] + list(eps_labels),
                [
                    ["FGSM (BPDA) adversarial"] + [f"{v:.3f}" for v in s["fgsm_bpda"]],
                    ["random-sign noise"] + [f"{v:.3f}" for v in s["noise"]],
                ],
            ),
            f"\nClean images: {s['clean']:.3f}.",
            "",
        ]
    md += [f"## Convergence at eps {conv_label} (seed {seeds[0]})", ""]
    for m, rec in first.items():
        cv = rec["convergence"]
        md += [
            f"{NAMES[m]} model, protocol {cv['protocol']}, {cv['n']} images: robust accuracy % "
            "against steps (PGD, APGD-CE) and PGD restarts.",
            "",
            C.md_table(
                ["steps"] + [str(s) for s in cv["steps"]],
                [
                    ["PGD"] + [_pct(a) for a in cv["pgd"]],
                    ["APGD-CE"] + [_pct(a) for a in cv["apgd-ce"]],
                ],
            ),
            "",
            C.md_table(
                ["PGD restarts"] + [str(v) for v in cv["restarts"]],
                [["accuracy"] + [_pct(a) for a in cv["pgd_restarts"]]],
            ),
            "",
        ]
    md += [
        "![accuracy vs eps](acc_vs_eps.png)",
        "",
        "![convergence](convergence.png)",
        "",
        f"Runtime: {r.timer.total():.0f} s on {C.environment()['device_kind']} "
        f"({C.environment()['cpu_count']} cores).",
        "",
    ]
    parts = max(rec.get("n_parts", 1) for run in runs.values() for rec in run.values())
    if parts > 1:
        md += [
            f"Evaluated in {parts} parts at once (the images of each set dealt out in turn, "
            "one process per core), joined image by image; the attacks' random draws differ "
            "from those of a run in one process (docs/methods.md 6.7).",
            "",
        ]

    x = [0.0] + list(eps)
    curves = {
        "unprocessed FGSM": _series(
            runs, seeds, "unprocessed", lambda q: [q["clean"]] + q["fgsm"]["none"]
        )
    }
    wc = {
        "unprocessed worst case": _series(
            runs, seeds, "unprocessed", lambda q: [q["clean_eval"]] + q["worst_case"]
        )
    }
    if "gb" in first:
        for p in protocols:
            curves[f"GB FGSM {p}"] = _series(
                runs, seeds, "gb", lambda q, p=p: [q["clean"]] + q["fgsm"][p]
            )
        wc["GB worst case"] = _series(
            runs, seeds, "gb", lambda q: [q["clean_eval"]] + q["worst_case"]
        )
    pp = {
        "paper unprocessed": ([0, 0.2], [paper[0.0][1], paper[0.2][1]]),
        "paper GB": ([0, 0.2], [paper[0.0][0], paper[0.2][0]]),
    }
    panel = dict(
        xlabel="eps ([0,1] pixel space)", x=x, xscale="symlog", linthresh=1 / 255, chance=10.0
    )
    C.plot_curves(
        out / "acc_vs_eps.png",
        [
            dict(panel, title="FGSM (every test image)", curves=curves, paper=pp),
            dict(panel, title=f"worst case over all attacks (n={n_eval})", curves=wc),
        ],
        title=f"CIFAR-10, {r.label}",
    )
    conv_panels = []
    for m, rec in first.items():
        cv = rec["convergence"]
        conv_panels.append(
            dict(
                title=f"{NAMES[m]}, {cv['protocol']}, eps {conv_label}",
                xlabel="steps",
                x=cv["steps"],
                xscale="log",
                curves={
                    a: ([100 * v for v in cv[a]], [0.0] * len(cv[a])) for a in ("pgd", "apgd-ce")
                },
            )
        )
    C.plot_curves(out / "convergence.png", conv_panels, title=f"Convergence, {r.label}")

    csv_rows = []
    for s in seeds:
        for m, rec in runs[s].items():
            csv_rows.append(
                dict(
                    seed=s,
                    model=m,
                    kind="clean",
                    protocol="-",
                    eps=0.0,
                    eps_label="0",
                    n=mode["n_test_eff"],
                    accuracy=rec["clean"],
                )
            )
            for p, accs in rec["fgsm"].items():
                for e, lab, a in zip(eps, eps_labels, accs):
                    csv_rows.append(
                        dict(
                            seed=s,
                            model=m,
                            kind="fgsm",
                            protocol=p,
                            eps=e,
                            eps_label=lab,
                            n=rec.get("n_fgsm", mode["n_test_eff"]),
                            accuracy=a,
                        )
                    )
            for e, lab, a in zip(eps, eps_labels, rec["worst_case"]):
                csv_rows.append(
                    dict(
                        seed=s,
                        model=m,
                        kind="worst_case",
                        protocol="all",
                        eps=e,
                        eps_label=lab,
                        n=rec["n_eval"],
                        accuracy=a,
                    )
                )
    summary = dict(
        clean_accuracy={m: float(np.mean([runs[s][m]["clean"] for s in seeds])) for m in first},
        worst_case={
            m: {
                lab: float(np.mean([runs[s][m]["worst_case"][i] for s in seeds]))
                for i, lab in enumerate(eps_labels)
            }
            for m in first
        },
        fgsm={
            m: {
                p: {
                    lab: float(np.mean([runs[s][m]["fgsm"][p][i] for s in seeds]))
                    for i, lab in enumerate(eps_labels)
                }
                for p in first[m]["fgsm"]
            }
            for m in first
        },
        large_eps_flags=flags,
    )
    results = dict(
        config=dict(
            mode,
            threshold=args.threshold,
            purity=args.purity,
            eps=list(eps),
            eps_labels=list(eps_labels),
            protocols=list(protocols),
            large_eps=large_eps,
            data_dir=args.data_dir,
        ),
        paper_table2={str(k): dict(gb=v[0], unprocessed=v[1]) for k, v in paper.items()},
        summary=summary,
        runs={str(s): run for s, run in runs.items()},
        gb_preprocess_seconds=gb_time,
    )
    text = f"[fgsm_cifar] {r.label}: accuracy %\n" + C.text_table(h, rows)
    return r.finish(results=results, markdown="\n".join(md), csv_rows=csv_rows, summary=text)


def _series(runs, seeds, model, get):
    vals = np.asarray([get(runs[s][model]) for s in seeds], np.float64) * 100
    return vals.mean(0).tolist(), (vals.std(0, ddof=1) if len(seeds) > 1 else 0 * vals[0]).tolist()
