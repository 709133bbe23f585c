"""Executes notebooks/quickstart.ipynb and notebooks/defences.ipynb on tiny data
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


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env_root = str(ROOT)
    monkeypatch.setenv("GBJAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", env_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        km=_kernel_manager(),
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    )
    client.execute()
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    text = "".join(
        o.get("text", "")
        for c in nb.cells
        for o in c.get("outputs", [])
        if o.get("output_type") == "stream"
    )
    assert "clean test accuracy" in text and "eps=0.20" in text


@pytest.mark.slow
def test_defences_notebook_executes(tmp_path, monkeypatch):
    """notebooks/defences.ipynb in smoke mode (CIFAR-10 from GBJAX_DATA_DIR, else synthetic)."""
    nb = nbformat.read(ROOT / "notebooks" / "defences.ipynb", as_version=4)
    env_root = str(ROOT)
    monkeypatch.setenv("GBJAX_NOTEBOOK_SMOKE", "1")
    # the inline backend, so that the figure comes back as display data
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYTHONPATH", env_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        km=_kernel_manager(),
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    )
    client.execute()
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    text = "".join(
        o.get("text", "")
        for c in nb.cells
        for o in c.get("outputs", [])
        if o.get("output_type") == "stream"
    )
    assert "mean PSNR" in text and "clean test accuracy" in text and "FGSM eps=" in text
    figures = [
        o
        for c in nb.cells
        for o in c.get("outputs", [])
        if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
    ]
    assert figures  # the image grid
