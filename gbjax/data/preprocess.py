"""Granular-ball processing of whole data sets, cached on disk.

The one way gbjax GB-processes a data set: training with
``Config.preprocess="gb"`` and every experiment call :func:`gb_processed`. The
cache key covers the engine's output version (``gbjax.gb.OUTPUT_VERSION``), the
parameters and the images' bytes, so an entry is never served for other
inputs or for output of an older engine. Entries are ``.npz`` files written by
:func:`gbjax.data.cache.save_arrays` with a SHA-256 of their contents, which is
verified on every read: a corrupt or unreadable entry is never served; it is
recomputed, with a warning, and replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import warnings

import numpy as np

# ``gb`` as a module, its functions looked up at call time: gb still imports
# gbjax.data.batching (so this package) while it loads (TODO(issue 27): gb.py ->
# gbjax._batching once the CPU-kernel work lands).
from gbjax import gb
from gbjax.data.cache import load_arrays, save_arrays

__all__ = ["gb_processed"]


def _cache_root(cache_dir) -> pathlib.Path:
    if cache_dir is not None:
        return pathlib.Path(cache_dir)
    env = os.environ.get("GBJAX_CACHE_DIR")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "gbjax"


def _key(images: np.ndarray, params: dict) -> str:
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
    into place, so an interrupted run leaves no partial entry, and carry a
    SHA-256 checked on every read: a corrupt or unreadable entry is recomputed
    (with a warning) and replaced, never served.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"images must be uint8 (N, H, W, C), got {images.dtype} of shape {images.shape}"
        )
    for k in ("scale", "progress"):
        if k in gb_kwargs:
            raise ValueError(f"{k}: not a parameter of gb_processed (uint8 images in, uint8 out)")
    path = _cache_root(cache_dir) / f"gb_{_key(images, gb_kwargs)}.npz"
    if use_cache and path.exists():
        out = _read_entry(path, images.shape)
        if out is not None:
            return out
    out = np.asarray(gb.gb_denoise(images, progress=progress, **gb_kwargs))
    if use_cache:
        _write_entry(path, out)
    return out


def _read_entry(path: pathlib.Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The verified cached images, or None (with a warning) when the entry is unusable."""
    try:
        out = load_arrays(path)["images"]
        if out.shape != shape or out.dtype != np.uint8:
            raise ValueError(f"holds {out.dtype} {out.shape}, expected uint8 {shape}")
        return out
    except Exception as e:  # corrupt, truncated, no checksum, wrong contents
        warnings.warn(
            f"gbjax: GB cache entry {path} is corrupt or unreadable ({e}); recomputing it",
            stacklevel=3,
        )
        return None


def _write_entry(path: pathlib.Path, images: np.ndarray) -> None:
    """Store atomically with a checksum; a cache that cannot be written only warns."""
    try:
        save_arrays(path, {"images": images})
    except OSError as e:
        warnings.warn(
            f"gbjax: could not write GB cache entry {path} ({e}); continuing without cache",
            stacklevel=3,
        )
        return
    legacy = path.with_suffix(".npy")  # the unverified format of earlier versions
    if legacy.exists():
        try:
            legacy.unlink()
        except OSError:
            pass
