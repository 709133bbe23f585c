"""Granular-ball processing of whole data sets, cached on disk.

The one way gbjax GB-processes a data set: training with
``Config.preprocess="gb"`` and every experiment call :func:`gb_processed`. The
cache key covers the engine's output version (``gbjax.gb.OUTPUT_VERSION``), the
parameters and the images' bytes, so an entry is never served for other
inputs or for output of an older engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile

import numpy as np

__all__ = ["gb_processed"]


def _cache_root(cache_dir) -> pathlib.Path:
    if cache_dir is not None:
        return pathlib.Path(cache_dir)
    env = os.environ.get("GBJAX_CACHE_DIR")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "gbjax"


def _key(images: np.ndarray, params: dict) -> str:
    from gbjax import gb

    h = hashlib.sha256()
    h.update(f"gb-output-v{gb.OUTPUT_VERSION}".encode())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    h.update(f"{images.shape}{images.dtype}".encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()[:32]


def gb_processed(
    images, *, cache_dir=None, use_cache: bool = True, progress: bool = True, **gb_kwargs
) -> np.ndarray:
    """``gb_denoise(images, **gb_kwargs)`` as a uint8 numpy array, cached on disk.

    ``images``: uint8 ``(N, H, W, C)``. ``cache_dir``: else ``$GBJAX_CACHE_DIR``,
    else ``~/.cache/gbjax``. Entries are written to a temporary file and moved
    into place, so an interrupted run leaves no partial entry; an unreadable
    entry is recomputed.
    """
    from gbjax import gb

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"images must be uint8 (N, H, W, C), got {images.dtype} of shape {images.shape}"
        )
    for k in ("scale", "progress"):
        if k in gb_kwargs:
            raise ValueError(f"{k}: not a parameter of gb_processed (uint8 images in, uint8 out)")
    path = _cache_root(cache_dir) / f"gb_{_key(images, gb_kwargs)}.npy"
    if use_cache and path.exists():
        try:
            out = np.load(path)
            if out.shape == images.shape and out.dtype == np.uint8:
                return out
        except (OSError, ValueError):
            pass
    out = np.asarray(gb.gb_denoise(images, progress=progress, **gb_kwargs))
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".gb-", suffix=".npy")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, out)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out
