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

import os
from typing import Any

import numpy as np
from jax.typing import ArrayLike

from gbjax import gb
from gbjax._files import cache_root
from gbjax.data._entries import gb_key, read_gb_entry, write_gb_entry

__all__ = ["gb_processed"]


def gb_processed(
    images: ArrayLike,
    params: gb.GBParams | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
    **gb_kwargs: Any,
) -> np.ndarray:
    """``gb_denoise(images, params, **gb_kwargs)`` as a uint8 numpy array, cached on disk.

    Entries are written to a temporary file and moved into place, so an
    interrupted run leaves no partial entry, and carry a SHA-256 checked on every
    read: a corrupt or unreadable entry is recomputed (with a warning) and
    replaced, never served.

    The cache key is derived from the :class:`gbjax.GBParams` (so equal
    parameters share an entry however they are given, and ``chunk_size``,
    ``memory_budget`` or ``engine``, which do not change the result, leave it
    alone), the engine's output version and the images. Entries written before
    :class:`gbjax.GBParams` keep their key where ``threshold`` and ``purity`` were
    given and other parameters only when not at their defaults.

    Args:
      images: uint8 ``(N, H, W, C)``.
      params: the GB parameters, a :class:`gbjax.GBParams`; or None for the GB
        keywords of :func:`gbjax.gb_cluster` in ``gb_kwargs``, not both.
      cache_dir: the cache folder; else ``$GBJAX_CACHE_DIR``, else ``~/.cache/gbjax``.
      use_cache: read and write the cache.
      progress: show a progress bar over chunks.
      **gb_kwargs: keyword arguments of :func:`gbjax.gb_cluster` (not ``scale``).

    Returns:
      The painted images, uint8 numpy ``(N, H, W, C)``.

    Raises:
      ValueError: for images that are not uint8 ``(N, H, W, C)`` or invalid parameters.

    Example:
      >>> import numpy as np, tempfile
      >>> from gbjax import GBParams, data
      >>> x = np.zeros((2, 4, 4, 3), np.uint8)
      >>> x[:, :, 2:] = 200  # two flat halves
      >>> with tempfile.TemporaryDirectory() as d:
      ...     out = data.gb_processed(x, GBParams(threshold=20.0), cache_dir=d, progress=False)
      ...     again = data.gb_processed(x, threshold=20.0, cache_dir=d, progress=False)  # cached
      >>> out.dtype, out.shape, bool((out == x).all() and (again == out).all())
      (dtype('uint8'), (2, 4, 4, 3), True)
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"images must be uint8 (N, H, W, C), got {images.dtype} of shape {images.shape}"
        )
    for k in ("scale", "progress"):
        if k in gb_kwargs:
            raise ValueError(f"{k}: not a parameter of gb_processed (uint8 images in, uint8 out)")
    params, run_kwargs = gb.as_params(params, gb_kwargs)
    path = cache_root(cache_dir) / f"gb_{gb_key(images, params)}.npz"
    if use_cache and path.exists():
        out = read_gb_entry(path, images.shape)
        if out is not None:
            return out
    out = np.asarray(gb.gb_denoise(images, params=params, progress=progress, **run_kwargs))
    if use_cache:
        write_gb_entry(path, out)
    return out
