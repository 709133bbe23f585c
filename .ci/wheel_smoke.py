"""Smoke test of an installed gbjax wheel, run by .ci/wheel_check.sh.

Run from a folder outside the source tree, with the wheel installed in a fresh
virtual environment: everything here must come from the installed package.
Prints one line per check; any failure raises (exit status 1).
"""

import importlib.metadata
import importlib.resources
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = pathlib.Path.cwd()


def check(name, ok, detail=""):
    if not ok:
        raise SystemExit(f"FAIL {name} {detail}")
    print(f"ok   {name} {detail}".rstrip(), flush=True)


import gbjax  # noqa: E402

where = pathlib.Path(gbjax.__file__).resolve()
check("import from the installed wheel", "site-packages" in where.parts, str(where))
version = importlib.metadata.version("gbjax")
check("one version", version == gbjax.__version__, f"{version} == gbjax.__version__")

# package data: the configurations ship as modules, loadable by name
configs = sorted(
    p.name for p in importlib.resources.files("gbjax.configs").iterdir() if p.name.endswith(".py")
)
shipped = {"airbench_cifar10.py", "pe_mnist.py", "raw_mnist.py", "resnet18_cifar10.py"}
check("configs in the wheel", shipped <= set(configs), str(configs))
from gbjax.config import Config, load_config  # noqa: E402

for name in sorted(shipped):
    cfg = load_config(f"gbjax.configs.{name[:-3]}:smoke")
    check(f"load_config('gbjax.configs.{name[:-3]}:smoke')", isinstance(cfg, Config))

# the JPEG tables (libjpeg's, in code): quality 50 is the standard table itself
from gbjax.defences import JPEG, Median, jpeg_quant_table  # noqa: E402

check(
    "JPEG tables", int(jpeg_quant_table(50)[0, 0]) == 16 and int(jpeg_quant_table(50)[7, 7]) == 99
)

# GB on a small image
rng = np.random.default_rng(0)
img = np.repeat(np.repeat(rng.integers(0, 256, (2, 2, 3)), 6, 0), 6, 1).astype(np.uint8)
res = gbjax.gb_cluster(img, threshold=20.0, purity=0.9, capacity=16)
check(
    "gb_cluster",
    res.image.shape == img.shape and int(res.n_balls) == 4,
    f"{int(res.n_balls)} balls",
)

# defences
x01 = np.stack([img, img[::-1]]).astype(np.float32) / 255.0
for defence in (Median(3), JPEG(75), gbjax.GB(threshold=20.0, capacity=16)):
    out = np.asarray(defence(x01))
    check(f"defence {type(defence).__name__}", out.shape == x01.shape and np.isfinite(out).all())

# an attack on a tiny model
from flax import nnx  # noqa: E402

from gbjax import attacks, models  # noqa: E402

model = models.PaperConvNet(
    "raw", num_classes=3, in_channels=3, image_size=12, features=4, rngs=nnx.Rngs(0)
)
model.eval()
y = np.array([0, 1])
adv = np.asarray(attacks.fgsm(model, x01, y, eps=8 / 255))
check(
    "fgsm on a PaperConvNet", np.abs(adv - x01).max() <= 8 / 255 + 1e-6 and adv.shape == x01.shape
)
defended = gbjax.Defended(model, gbjax.GB(threshold=20.0, capacity=16))
acc = attacks.accuracy_under_attack(
    defended, x01, y, eps_list=[0.0, 4 / 255], attack="fgsm", batch_size=2, progress=False
)
check("accuracy_under_attack, GB-defended", len(acc) == 2)

# the command line: python -m gbjax and the gbjax console script, on two PNGs
from PIL import Image  # noqa: E402

work = pathlib.Path(tempfile.mkdtemp(dir=HERE))
(work / "imgs").mkdir()
Image.fromarray(img).save(work / "imgs" / "a.png")
Image.fromarray(img[::-1]).save(work / "imgs" / "b.png")
bindir = pathlib.Path(sys.executable).parent
for cmd in ([sys.executable, "-m", "gbjax"], [str(bindir / "gbjax")]):
    out = work / f"out_{len(cmd)}"
    args = ["denoise", str(work / "imgs"), "-o", str(out), "--capacity", "16", "--quiet"]
    r = subprocess.run([*cmd, *args], capture_output=True, text=True)
    written = sorted(p.name for p in out.rglob("*.png"))
    label = " ".join(pathlib.Path(c).name for c in cmd)
    ok = r.returncode == 0 and written == ["a_gb.png", "b_gb.png"]
    check(f"{label} denoise", ok, "" if ok else r.stderr[-500:])
r = subprocess.run([str(bindir / "gbjax"), "--version"], capture_output=True, text=True)
check("gbjax --version", r.stdout.strip() == f"gbjax {version}", r.stdout.strip())
for sub in ("train", "cluster"):
    r = subprocess.run([str(bindir / "gbjax"), sub, "--help"], capture_output=True, text=True)
    check(f"gbjax {sub} --help", r.returncode == 0 and "examples:" in r.stdout)

from gbjax import distributed  # noqa: E402

check("gbjax.distributed", distributed.process_shard(11, 0, 2) == slice(0, 6))
print("wheel smoke test passed")
