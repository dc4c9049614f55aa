"""A writable directory for Numba's on-disk cache of fastbn's kernels (``cache=True``).

Numba looks for one in this order: ``NUMBA_CACHE_DIR``, ``__pycache__`` next to the source,
then the user-wide cache (``$XDG_CACHE_HOME/numba`` or ``~/.cache/numba``). A read-only
install (system site-packages, a read-only container layer) silently uses the user-wide
cache. Only when none of them is writable (an account without a writable home: service
users, ``nobody``, a read-only container) does Numba raise ``RuntimeError`` while
``fastbn._kernels`` is imported. This module, imported before any kernel, catches that one
case and points ``numba.config.CACHE_DIR`` to a private directory under the system temp
directory. In every other case it changes nothing.
"""

import os
import stat
import tempfile

import numba


def _writable(path):
    """Whether ``path`` exists or can be made, and a file can be created in it (Numba's test)."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def _numba_user_cache_dir():
    try:
        from numba.misc.appdirs import AppDirs

        return AppDirs(appname="numba", appauthor=False).user_cache_dir
    except Exception:  # a private module: fall back to what it computes on Linux
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        return os.path.join(base, "numba")


def _private_temp_dir():
    """``$TMPDIR/fastbn-numba-cache-<uid>``, created 0700; a fresh one if that is not ours."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    path = os.path.join(tempfile.gettempdir(), f"fastbn-numba-cache-{uid}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return tempfile.mkdtemp(prefix="fastbn-numba-cache-")
    st = os.lstat(path)
    # Cached kernels are loaded with pickle: never use a directory someone else can write.
    if not stat.S_ISDIR(st.st_mode) or (uid is not None and st.st_uid != uid) or st.st_mode & 0o022:
        return tempfile.mkdtemp(prefix="fastbn-numba-cache-")
    return path


def _choose():
    if numba.config.CACHE_DIR:  # NUMBA_CACHE_DIR (or a caller's choice) wins
        return None
    package_dir = os.path.dirname(os.path.abspath(__file__))
    if _writable(os.path.join(package_dir, "__pycache__")):
        return None
    if _writable(_numba_user_cache_dir()):
        return None
    try:
        return _private_temp_dir()
    except OSError:  # no writable temp dir either: let Numba report it
        return None


CACHE_DIR = _choose()
if CACHE_DIR is not None:
    numba.config.CACHE_DIR = CACHE_DIR
