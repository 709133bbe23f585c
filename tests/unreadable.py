"""A folder that cannot be listed, for tests that also run as root.

``chmod 000`` does not stop root (the test machines run as root), so where the
folder can still be listed after the chmod, :func:`unreadable` also makes
``os.scandir`` and ``os.listdir`` raise the ``PermissionError`` another user
would get. Both paths end in the same exception, so the code under test cannot
tell them apart.
"""

import contextlib
import errno
import os


@contextlib.contextmanager
def unreadable(path, monkeypatch):
    """Within the block, listing ``path`` raises ``PermissionError`` (EACCES)."""
    path = os.fspath(path)
    target = os.path.realpath(path)
    real_scandir, real_listdir = os.scandir, os.listdir

    def refuse(p):
        if not isinstance(p, int) and os.path.realpath(os.fspath(p)) == target:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(p))

    def scandir(p="."):
        refuse(p)
        return real_scandir(p)

    def listdir(p="."):
        refuse(p)
        return real_listdir(p)

    os.chmod(path, 0)
    try:
        with monkeypatch.context() as m:
            try:
                real_listdir(path)
            except PermissionError:
                pass  # not root: the chmod is enough
            else:
                m.setattr(os, "scandir", scandir)
                m.setattr(os, "listdir", listdir)
            yield
    finally:
        os.chmod(path, 0o755)
