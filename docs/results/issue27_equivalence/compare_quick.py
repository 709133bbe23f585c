"""The quick main job's flags before (fgsm_quick_1205) and after (fgsm_quick_recheck)."""

import json

OLD, NEW = "/work/runs/fgsm_quick_1205", "/work/runs/fgsm_quick_recheck"


def load(path):
    with open(path) as f:
        return json.load(f)


for m in ("unprocessed", "gb"):
    a, b = load(f"{OLD}/state/{m}_seed0.json"), load(f"{NEW}/state/{m}_seed0.json")
    removed = [s["removed"] for s in a["stages"]] == [s["removed"] for s in b["stages"]]
    n = sum(len(r) for r in a["robust"])
    print(
        m,
        "robust flags equal:",
        a["robust"] == b["robust"],
        f"({n} flags)",
        "| every stage's removed images equal:",
        removed,
        "| plans equal:",
        a["plan"] == b["plan"],
    )
ra, rb = load(f"{OLD}/results.json")["runs"]["0"], load(f"{NEW}/results.json")["runs"]["0"]
for m in ("unprocessed", "gb"):
    for k in ("clean", "fgsm", "worst_case"):
        if k in ra[m]:
            print(m, k, "equal:", ra[m][k] == rb[m][k])
