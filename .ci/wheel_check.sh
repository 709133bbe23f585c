#!/usr/bin/env bash
# Build gbjax's sdist and wheel, install the wheel into a fresh virtual
# environment outside the source tree, and smoke-test it there
# (.ci/wheel_smoke.py, run from a folder outside the tree).
#
#   bash .ci/wheel_check.sh      (needs `build`: pip install -e ".[build]")
#
# The fresh environment downloads gbjax's dependencies (jax, flax, ...) from
# PyPI through pip's cache; PIP_CACHE_DIR keeps them between CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
t0=$SECONDS

python -m build --sdist --wheel --outdir "$work/dist" . >"$work/build.log" 2>&1 || {
  tail -n 40 "$work/build.log"; exit 1; }
wheel=("$work"/dist/gbjax-*.whl)
sdist=("$work"/dist/gbjax-*.tar.gz)
echo "built $(basename "${sdist[0]}") and $(basename "${wheel[0]}") ($((SECONDS - t0)) s)"

# What the wheel and the sdist must (and must not) hold.
python - "${wheel[0]}" "${sdist[0]}" <<'PY'
import sys, tarfile, zipfile

wheel, sdist = sys.argv[1], sys.argv[2]
names = set(zipfile.ZipFile(wheel).namelist())
need = [
    "gbjax/__init__.py", "gbjax/__main__.py", "gbjax/distributed.py", "gbjax/_jpeg.py",
    "gbjax/configs/__init__.py", "gbjax/configs/airbench_cifar10.py",
    "gbjax/configs/pe_mnist.py", "gbjax/configs/raw_mnist.py",
    "gbjax/configs/resnet18_cifar10.py", "gbjax/data/__init__.py",
    "gbjax/models/__init__.py", "gbjax/attacks/__init__.py", "gbjax/py.typed",
]
missing = [n for n in need if n not in names]
stray = sorted(n for n in names if n.split("/")[0] in ("tests", "docs", "experiments", "notebooks"))
meta = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
scripts = zipfile.ZipFile(wheel).read(meta[0]).decode() if meta else ""
if missing or stray or "gbjax = gbjax.__main__:main" not in scripts:
    sys.exit(f"wheel contents wrong: missing {missing}, stray {stray[:5]}, entry points {scripts!r}")
members = tarfile.open(sdist).getnames()
if not any(m.endswith("/pyproject.toml") for m in members) or not any(
    m.endswith("/gbjax/configs/pe_mnist.py") for m in members
):
    sys.exit("sdist lacks pyproject.toml or the configs")
print(f"wheel holds {len(names)} files, the configs and the gbjax entry point; sdist complete")
PY

t1=$SECONDS
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
"$work/venv/bin/python" -m pip install -q "${wheel[0]}"
echo "installed the wheel into a fresh environment ($((SECONDS - t1)) s)"

# Smoke test from a folder outside the tree, with nothing of the tree on the path.
mkdir "$work/run"
cp .ci/wheel_smoke.py "$work/run/"
(cd "$work/run" && env -u PYTHONPATH JAX_PLATFORMS=cpu MPLBACKEND=Agg \
  "$work/venv/bin/python" wheel_smoke.py)
case "$(cd "$work/run" && "$work/venv/bin/python" -c 'import gbjax; print(gbjax.__file__)')" in
  "$root"/*) echo "gbjax was imported from the source tree"; exit 1 ;;
esac
echo "wheel check passed in $((SECONDS - t0)) s"
