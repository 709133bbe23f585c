"""Cache entries: the keyed ``(images, labels)`` entries of decoded data sets
(:func:`cached`, used by :mod:`gbjax.data.sources`) and the entries of GB-processed
data sets (:func:`gb_key`, :func:`read_gb_entry`, :func:`write_gb_entry`, used by
:func:`gbjax.data.gb_processed` and the command lines). Both are ``.npz`` files
written by :func:`gbjax.data.cache.save_arrays` and verified on every read; both
live in the one cache folder (``gbjax._files.cache_root``).

Keys of decoded data sets: an entry's file name is
``<name>-<split>-<src>-<key>.npz``. ``<src>`` hashes the source's absolute paths
(and a free-form ``extra`` string naming the decoder), so all entries of one source
share a stem; ``<key>`` also covers :data:`CACHE_VERSION` and :func:`signature`:
each source file's size and modification time, or for a folder every file's
relative path, size and mtime. A changed source therefore gets a new key and is
re-decoded, never served stale; the superseded entry of that source is deleted once
the new one is written.

Failure handling: an unreadable or corrupt entry is discarded (or recomputed) with
a warning; an unwritable cache only warns and the data is returned uncached; an
unreadable *source* (its signature cannot be taken) is a :class:`CorruptDataError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from gbjax import gb
from gbjax.data._decode import Arrays, CorruptDataError, walk_tree
from gbjax.data.cache import load_arrays, save_arrays

# Bump when the decoded representation changes, to invalidate old cache entries.
# 2: entries carry a SHA-256; labels are range-checked; symlinked folders are followed.
CACHE_VERSION = 2


# --------------------------------------------------------------------------- #
# Keys
# --------------------------------------------------------------------------- #


def signature(paths: Sequence[str]) -> str:
    """Path, size and mtime of each source file (of every file below a folder).

    For a folder this is a digest over all files' relative paths, sizes and
    mtimes (about 0.2 s for 50k files), so an edited, added or removed image
    changes the key. Folders are walked as the decoders walk them (symlinks
    followed, loops not); one that cannot be read is a :class:`CorruptDataError`.
    """
    parts = []
    for p in paths:
        p = os.path.abspath(p)
        if os.path.isdir(p):
            h = hashlib.sha256()
            for dirpath, _, filenames in walk_tree(p, skip_hidden=False):
                for name in filenames:
                    full = os.path.join(dirpath, name)
                    try:
                        st = os.stat(full)
                    except FileNotFoundError:  # a dangling symlink
                        st = os.lstat(full)
                    h.update(f"{full[len(p) :]}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            parts.append(f"dir:{p}:{h.hexdigest()}")
        else:
            st = os.stat(p)
            parts.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


def cache_file(
    cache_root: str, name: str, split: str, paths: Sequence[str], extra: str
) -> tuple[str, str]:
    """Return (entry path, glob-style stem shared by entries of the same source)."""
    src = hashlib.sha256(
        "\n".join([extra] + [os.path.abspath(p) for p in paths]).encode()
    ).hexdigest()[:8]
    key = hashlib.sha256(
        f"v{CACHE_VERSION}\n{name}\n{split}\n{extra}\n{signature(paths)}".encode()
    ).hexdigest()[:16]
    stem = f"{name}-{split}-{src}-"
    return os.path.join(cache_root, f"{stem}{key}.npz"), stem


# --------------------------------------------------------------------------- #
# (images, labels) entries
# --------------------------------------------------------------------------- #


def read_cache(path: str) -> Arrays | None:
    try:
        z = load_arrays(path)
        x, y = z["images"], z["labels"]
        if x.dtype != np.uint8 or x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
            raise ValueError("unexpected arrays")
        return x, y.astype(np.int32, copy=False)
    except Exception as e:
        warnings.warn(
            f"gbjax: discarding corrupt or unreadable cache entry {path} ({e}); rebuilding it",
            stacklevel=3,
        )
        try:
            os.unlink(path)
        except OSError:
            pass
        return None


def write_cache(path: str, stem: str, arrays: Arrays) -> None:
    """Write atomically (see :func:`save_arrays`), then drop older entries of this source."""
    try:
        save_arrays(path, {"images": arrays[0], "labels": arrays[1]})
    except OSError as e:
        warnings.warn(
            f"gbjax: could not write cache entry {path} ({e}); continuing without cache",
            stacklevel=3,
        )
        return
    root = os.path.dirname(path) or "."
    for entry in os.listdir(root):
        if (
            entry.startswith(os.path.basename(stem))
            and entry.endswith(".npz")
            and entry != os.path.basename(path)
        ):
            try:
                os.unlink(os.path.join(root, entry))
            except OSError:
                pass


def cached(
    cache_root: str,
    name: str,
    split: str,
    paths: Sequence[str],
    extra: str,
    decode: Callable[[], Arrays | None],
) -> Arrays | None:
    """Serve ``decode()``'s result from the cache, decoding and storing it on a miss.

    ``decode`` returning None (the source holds no data for this split) is
    passed through and nothing is stored.
    """
    try:
        path, stem = cache_file(cache_root, name, split, paths, extra)
    except OSError as e:
        raise CorruptDataError(f"cannot read {paths}: {e}") from e
    if os.path.isfile(path):
        out = read_cache(path)
        if out is not None:
            return out
    out = decode()
    if out is None:
        return None
    write_cache(path, stem, out)
    return out


# --------------------------------------------------------------------------- #
# GB-processed data sets (gbjax.data.gb_processed)
# --------------------------------------------------------------------------- #


def key_params(params: gb.GBParams) -> dict:
    """The parameters as the cache key spells them: ``threshold`` and ``purity``
    always, every other field only where it differs from its default (``features``
    as a dict of its fields that do), numbers as :class:`gbjax.GBParams` holds them.

    This is the spelling of the keyword arguments that every entry written before
    :class:`gbjax.GBParams` existed was keyed on when written by the experiments,
    the shipped configurations (``gb={'threshold': 20.0, 'purity': 0.9}``) or
    ``gbjax cluster --threshold T --purity P [--capacity K ...]``, so those
    entries stay valid; now equal parameters have one key however they are spelt.
    """
    default, default_features = gb.GBParams(), gb.Features()
    out: dict = {"threshold": params.threshold, "purity": params.purity}
    for name in gb.PARAM_NAMES:
        value = getattr(params, name)
        if name in out or value == getattr(default, name):
            continue
        if name == "features":
            value = {
                f.name: getattr(value, f.name)
                for f in dataclasses.fields(value)
                if getattr(value, f.name) != getattr(default_features, f.name)
            }
        out[name] = value
    return out


def gb_key(images: np.ndarray, params: gb.GBParams) -> str:
    """The cache key of ``images`` GB-processed with ``params``: SHA-256 (32 hex
    digits) over the engine's output version, :func:`key_params` and the images'
    shape, dtype and bytes."""
    h = hashlib.sha256()
    h.update(f"gb-output-v{gb.OUTPUT_VERSION}".encode())
    h.update(json.dumps(key_params(params), sort_keys=True, default=str).encode())
    h.update(f"{images.shape}{images.dtype}".encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()[:32]


def read_gb_entry(path: pathlib.Path, shape: tuple[int, ...]) -> np.ndarray | None:
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


def write_gb_entry(path: pathlib.Path, images: np.ndarray) -> None:
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
