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

import numpy as np

from gbjax import gb
from gbjax._files import cache_root
from gbjax.data._entries import gb_key, read_gb_entry, write_gb_entry

__all__ = ["gb_processed"]


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
    path = cache_root(cache_dir) / f"gb_{gb_key(images, gb_kwargs)}.npz"
    if use_cache and path.exists():
        out = read_gb_entry(path, images.shape)
        if out is not None:
            return out
    out = np.asarray(gb.gb_denoise(images, progress=progress, **gb_kwargs))
    if use_cache:
        write_gb_entry(path, out)
    return out
