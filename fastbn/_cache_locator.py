"""A Numba cache locator that lets installs of the same fastbn at different paths share
compiled kernels (CI: the README's test venv, tox's ``py311`` env and the ``wheel`` env).

Numba files a cached function under ``NUMBA_CACHE_DIR/<dir>_<sha1 of the source file's
absolute directory>``, so two envs that install fastbn into different site-packages never
see each other's entries, even with one ``NUMBA_CACHE_DIR``. This locator, used only when
named in ``NUMBA_CACHE_LOCATOR_CLASSES`` (Numba 0.63, fastbn's floor, reads it too) and
only for fastbn's own files with ``NUMBA_CACHE_DIR`` set, files
them instead under::

    NUMBA_CACHE_DIR/fastbn-<tree>-py<XY>-numba<version>-numpy<version>/<subpackage>

where ``<tree>`` hashes the contents of every ``.py`` file of the installed package. What
may be shared is then exactly what one install would reuse itself, and less: the same
source tree byte for byte (so a constant changed in another module, which Numba's
per-file stamp does not see, starts a new directory), the same Python minor version,
Numba and NumPy. The stamp of each file is the hash of its contents, not its mtime (which
differs between installs). Entries within the directory are Numba's own (index keyed by
signature, target machine and bytecode).

Numba's index is not safe against two processes adding entries to the same function at
once (both may pick the same data file), so ``.ci/run`` gives each tox env its own copy
(hard links: Numba replaces files, it never writes into them) of the directory the first
test run filled.

Usage (``.ci/run`` sets both)::

    NUMBA_CACHE_DIR=/some/dir NUMBA_CACHE_LOCATOR_CLASSES=fastbn._cache_locator.\\
PortableCacheLocator,UserProvidedCacheLocator,InTreeCacheLocator,UserWideCacheLocator
"""

import functools
import hashlib
import os
import sys

import numba
import numpy as np
from numba.core import caching, config

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@functools.cache
def tree_hash(package_dir=_PACKAGE_DIR):
    """sha256 (16 hex digits) of the relative paths and contents of every ``.py`` file
    under ``package_dir``."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(package_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, package_dir).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read() + b"\0")
    return digest.hexdigest()[:16]


def shared_dir_name():
    """The directory under ``NUMBA_CACHE_DIR`` that this install's kernels go to."""
    py = f"py{sys.version_info[0]}{sys.version_info[1]}"
    return f"fastbn-{tree_hash()}-{py}-numba{numba.__version__}-numpy{np.__version__}"


@functools.cache
def _file_hash(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class PortableCacheLocator(caching._CacheLocator):
    """Numba cache locator for fastbn's source files, independent of the install path."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        relative = os.path.relpath(os.path.dirname(os.path.abspath(py_file)), _PACKAGE_DIR)
        self._cache_path = os.path.join(config.CACHE_DIR, shared_dir_name(), relative)

    def get_cache_path(self):
        return self._cache_path

    def get_source_stamp(self):
        return _file_hash(os.path.abspath(self._py_file))

    def get_disambiguator(self):
        return str(self._lineno)

    @classmethod
    def from_function(cls, py_func, py_file):
        if not config.CACHE_DIR or not os.path.isfile(py_file):
            return None
        path = os.path.abspath(py_file)
        if os.path.commonpath([path, _PACKAGE_DIR]) != _PACKAGE_DIR:
            return None  # not fastbn's: the next locator in the list
        self = cls(py_func, py_file)
        try:
            self.ensure_cache_path()
        except OSError:
            return None
        return self
