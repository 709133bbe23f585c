"""Files: the one atomic write and the one cache folder of gbjax (issue 27)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
from collections.abc import Iterator

__all__ = ["atomic_path", "write_atomic", "cache_root"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside ``path`` for the caller to write.

    On a clean exit the file is flushed to disk and moved onto ``path`` with
    :func:`os.replace`: a reader sees either the previous file or the complete new
    one. On any error (``KeyboardInterrupt`` included) the temporary file is removed
    and the error propagates, leaving ``path`` as it was. The folder must exist.
    """
    folder, name = os.path.split(os.fspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text or bytes) to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """gbjax's cache folder: ``cache_dir`` if given, else ``$GBJAX_CACHE_DIR``, else
    ``~/.cache/gbjax``."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir)
    env = os.environ.get("GBJAX_CACHE_DIR")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "gbjax"
