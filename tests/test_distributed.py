"""gbjax.distributed: two processes on this machine against one (CPU devices, local coordinator)."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from gbjax import distributed

WORKER = pathlib.Path(__file__).with_name("distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, str(WORKER), *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(procs, timeout=150):
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]


def test_two_processes_match_one(tmp_path):
    """GB preprocessing gives identical painted images, and 3 data-parallel training
    steps the same parameters (to float reduction order), on 2 processes as on 1."""
    port = _free_port()
    outs = [tmp_path / f"p{i}.npz" for i in range(2)]
    procs = [_start("dist", outs[i], i, 2, port) for i in range(2)]
    procs.append(_start("single", tmp_path / "ref.npz"))
    _finish(procs)
    ref = np.load(tmp_path / "ref.npz")
    params = sorted(k for k in ref.files if k.startswith("param/"))
    assert params
    for out in outs:
        got = np.load(out)
        np.testing.assert_array_equal(got["painted"], ref["painted"])
        assert sorted(k for k in got.files if k.startswith("param/")) == params
        for k in params:
            np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=2e-6, err_msg=k)
        np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
    # the painting is not the identity: the test would pass vacuously otherwise
    from distributed_worker import images

    assert not np.array_equal(ref["painted"], images())


@pytest.mark.parametrize("n", [0, 1, 5, 11])
@pytest.mark.parametrize("procs", [1, 2, 3])
def test_process_shard_covers_rows_in_order(n, procs):
    rows = [range(n)[distributed.process_shard(n, i, procs)] for i in range(procs)]
    assert [r for part in rows for r in part] == list(range(n))
    sizes = [len(r) for r in rows]
    assert max(sizes) - min(sizes) <= 1


def test_single_process_equals_gb_processed(tmp_path):
    """In one process, the distributed path is gb_processed, and shares its cache entry."""
    from distributed_worker import GB_KW, images

    from gbjax.data import gb_processed

    x = images(n=3)
    out = distributed.gb_processed_distributed(x, cache_dir=tmp_path, progress=False, **GB_KW)
    np.testing.assert_array_equal(out, gb_processed(x, use_cache=False, progress=False, **GB_KW))
    (entry,) = tmp_path.glob("gb_*.npz")
    assert entry.exists()
    np.testing.assert_array_equal(gb_processed(x, cache_dir=tmp_path, progress=False, **GB_KW), out)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(capacity="auto"), "capacity='auto'"),
        (dict(scale=255.0), "scale"),
    ],
)
def test_refused_options(kw, match):
    with pytest.raises(ValueError, match=match):
        distributed.gb_denoise_local(np.zeros((2, 4, 4, 3), np.uint8), **kw)
    with pytest.raises(ValueError, match="uint8"):
        distributed.gb_denoise_local(np.zeros((2, 4, 4, 3), np.float32))


def test_initialize_checks_arguments():
    with pytest.raises(ValueError, match="process_id"):
        distributed.initialize("127.0.0.1:1", num_processes=2, process_id=2, cpu_collectives=None)
    distributed.initialize(num_processes=1, cpu_collectives=None)  # one process: nothing to do
