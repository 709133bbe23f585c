set -e
. /work/main/.venv/bin/activate
cd /tmp/wt_old && PYTHONPATH=/tmp/wt_old nice -n 5 python experiments/fgsm_cifar.py --smoke --synthetic --out /tmp/smoke_old --no-progress > /tmp/smoke_old.log 2>&1
cd /work/main && nice -n 5 python experiments/fgsm_cifar.py --smoke --synthetic --out /tmp/smoke_new --no-progress > /tmp/smoke_new.log 2>&1
python - <<'PY'
import json
for m in ("unprocessed", "gb"):
    a = json.load(open(f"/tmp/smoke_old/state/{m}_seed0.json")); b = json.load(open(f"/tmp/smoke_new/state/{m}_seed0.json"))
    print(m, "robust equal:", a["robust"] == b["robust"], "stages equal:", [s["removed"] for s in a["stages"]] == [s["removed"] for s in b["stages"]], "plan equal:", a.get("plan") == b.get("plan"), "n flags:", sum(len(r) for r in a["robust"]))
ra = json.load(open("/tmp/smoke_old/results.json")); rb = json.load(open("/tmp/smoke_new/results.json"))
print("results runs equal:", json.dumps(ra["runs"], sort_keys=True) == json.dumps(rb["runs"], sort_keys=True))
PY
