"""Executes the notebooks (quickstart, defences, robustness_cifar) on tiny data
(GBJAX_NOTEBOOK_SMOKE=1) so they never rot."""

import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def _kernel_manager():
    """A kernel that runs this interpreter (sys.executable), whatever kernelspecs exist."""
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km._kernel_spec = KernelSpec(
        argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        display_name="gbjax test kernel",
        language="python",
    )
    return km


def _execute(path, monkeypatch, backend="Agg"):
    """Runs a notebook in smoke mode; returns (notebook, its stream text). No cell may fail."""
    nb = nbformat.read(path, as_version=4)
    monkeypatch.setenv("GBJAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", backend)
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if os.environ.get("GBJAX_DATA_DIR"):
        # the kernel runs in notebooks/: a data folder given relative to here must still resolve
        monkeypatch.setenv("GBJAX_DATA_DIR", os.path.abspath(os.environ["GBJAX_DATA_DIR"]))
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        km=_kernel_manager(),
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    return nb, text


@pytest.mark.slow
def test_quickstart_notebook_executes(monkeypatch):
    _, text = _execute(NOTEBOOK, monkeypatch)
    assert "clean test accuracy" in text and "eps=0.20" in text


@pytest.mark.slow
def test_defences_notebook_executes(monkeypatch):
    """notebooks/defences.ipynb in smoke mode (CIFAR-10 from GBJAX_DATA_DIR, else synthetic)."""
    # the inline backend, so that the figure comes back as display data
    nb, text = _execute(
        ROOT / "notebooks" / "defences.ipynb",
        monkeypatch,
        backend="module://matplotlib_inline.backend_inline",
    )
    assert "mean PSNR" in text and "clean test accuracy" in text and "FGSM eps=" in text
    figures = [
        o
        for c in nb.cells
        for o in c.get("outputs", [])
        if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
    ]
    assert figures  # the image grid


@pytest.mark.slow
def test_robustness_notebook_runs_the_fgsm_cifar_smoke_protocol(monkeypatch, tmp_path):
    """notebooks/robustness_cifar.ipynb in smoke mode: it runs ``fgsm_cifar.py --smoke``
    (this is also that experiment's end-to-end smoke test: every output is checked by
    tests/test_experiments.py's ``check_fgsm_cifar_smoke``) and shows its tables and
    both figures."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_experiments import _load, check_fgsm_cifar_smoke

    out = tmp_path / "out"
    monkeypatch.setenv("GBJAX_ROBUSTNESS_OUT", str(out))
    nb, text = _execute(
        ROOT / "notebooks" / "robustness_cifar.ipynb",
        monkeypatch,
        backend="module://matplotlib_inline.backend_inline",
    )
    assert "mode smoke" in text and "clean accuracy, gb:" in text and "worst case, gb:" in text
    assert "after stage" in text and "Square" in text
    check_fgsm_cifar_smoke(out, _load("fgsm_cifar").EPS_LABELS)
    shown = [
        o
        for c in nb.cells
        for o in c.get("outputs", [])
        if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
    ]
    assert len(shown) == 2  # acc_vs_eps.png and convergence.png
