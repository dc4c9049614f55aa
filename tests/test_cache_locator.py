"""fastbn._cache_locator: kernels cached by content and versions, not install path, so
CI's envs of one Python, Numba and NumPy can share them (issue 12, item 3)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest
from numba.core import config

from fastbn import _cache_locator
from fastbn._kernels import ops

LOCATORS = "fastbn._cache_locator.PortableCacheLocator,UserProvidedCacheLocator,InTreeCacheLocator"
PACKAGE = os.path.dirname(_cache_locator.__file__)


def test_tree_hash_follows_every_source_file(tmp_path):
    tree = tmp_path / "pkg"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.py").write_text("A = 1\n")
    (tree / "sub" / "b.py").write_text("B = 2\n")
    first = _cache_locator.tree_hash(str(tree))
    (tree / "notes.txt").write_text("not source")  # only .py files count
    assert _cache_locator.tree_hash.__wrapped__(str(tree)) == first
    (tree / "sub" / "b.py").write_text("B = 3\n")  # a constant in another module
    assert _cache_locator.tree_hash.__wrapped__(str(tree)) != first
    assert len(first) == 16 and int(first, 16) >= 0


def test_shared_dir_names_the_versions():
    name = _cache_locator.shared_dir_name()
    py = f"py{sys.version_info[0]}{sys.version_info[1]}"
    assert name == (
        f"fastbn-{_cache_locator.tree_hash()}-{py}-numba{numba.__version__}-numpy{np.__version__}"
    )


def test_locates_fastbn_files_only_and_only_with_a_cache_dir(tmp_path, monkeypatch):
    fn = ops.TARGETS["backward"][False, False, False].py_func
    monkeypatch.setattr(config, "CACHE_DIR", "")
    assert _cache_locator.PortableCacheLocator.from_function(fn, fn.__code__.co_filename) is None
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path))
    locator = _cache_locator.PortableCacheLocator.from_function(fn, fn.__code__.co_filename)
    expected = tmp_path / _cache_locator.shared_dir_name() / "_kernels"
    assert locator.get_cache_path() == str(expected) and expected.is_dir()
    with open(fn.__code__.co_filename, "rb") as f:
        assert locator.get_source_stamp() == __import__("hashlib").sha256(f.read()).hexdigest()
    assert locator.get_disambiguator() == str(fn.__code__.co_firstlineno)
    other = json.dumps  # a function outside fastbn: the next locator's business
    assert _cache_locator.PortableCacheLocator.from_function(other, json.__file__) is None


_CALL = textwrap.dedent(
    """
    import json, sys
    import numpy as np, fastbn
    from fastbn import _warmup
    assert fastbn.__file__.startswith(sys.argv[1]), fastbn.__file__
    x = np.arange(24.0).reshape(6, 4)
    fastbn.batch_norm(x, training=False, running_mean=np.zeros(4), running_var=np.ones(4))
    print(json.dumps(_warmup.kernel_cache_stats()))
    """
)


@pytest.mark.skipif(
    not hasattr(config, "CACHE_LOCATOR_CLASSES"), reason="this Numba has no locator setting"
)
def test_a_copy_at_another_path_loads_what_the_first_compiled(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    env["NUMBA_CACHE_LOCATOR_CLASSES"] = LOCATORS
    env["FASTBN_QUIET_COMPILE"] = "1"
    runs = []
    for where in ("one", "two"):  # two installs of the same files
        shutil.copytree(
            PACKAGE, tmp_path / where / "fastbn", ignore=shutil.ignore_patterns("__py*")
        )
        env["PYTHONPATH"] = str(tmp_path / where)
        proc = subprocess.run(
            [sys.executable, "-c", _CALL, str(tmp_path / where)],
            env=env,
            cwd=tmp_path,  # not the source tree: fastbn comes from the copy
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr
        runs.append(json.loads(proc.stdout.splitlines()[-1]))
    assert runs[0]["compiled"] > 0
    # the eval call's two signatures: the forward_eval kernel and running_var's check
    assert runs[1] == {"compiled": 0, "loaded": 2}
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [_cache_locator.shared_dir_name()]
