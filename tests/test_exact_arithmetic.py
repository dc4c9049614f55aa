"""The per-channel arithmetic is IEEE as written, whoever compiled it first.

Numba compiles a called function with its caller's value of each option the callee
leaves unset (``fastmath`` and ``_nrt`` among them). fastbn's ``exact`` functions (the
statistics' merge, coefficients, running statistics) therefore say ``fastmath=False``:
before they did, one first compiled inside a fastmath kernel got contraction and
reassociation, one first called from Python did not, and the overload compiled first
served every later call, in the process and from the on-disk cache.
"""

import os
import subprocess
import sys
import types

import numba
import numpy as np

from fastbn import _kernels
from fastbn._kernels import jit

_KERNEL_MODULES = [
    getattr(_kernels, name)
    for name in dir(_kernels)
    if isinstance(getattr(_kernels, name), types.ModuleType)
]


def _dispatchers(value, seen):
    """Numba dispatchers in ``value`` (a dispatcher, or dicts of them)."""
    if isinstance(value, numba.core.registry.CPUDispatcher):
        if id(value) not in seen:
            seen.add(id(value))
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _dispatchers(item, seen)


def test_every_kernel_sets_fastmath_and_nrt():
    seen = set()
    found = [
        d
        for module in _KERNEL_MODULES
        for value in vars(module).values()
        for d in _dispatchers(value, seen)
    ]
    assert len(found) > 40  # the walk reaches the kernels (tasks, passes, operations)
    unset = [
        d.py_func.__qualname__ for d in found if not {"fastmath", "_nrt"} <= set(d.targetoptions)
    ]
    assert not unset, unset


def test_exact_callee_of_a_fastmath_caller_is_not_contracted():
    """``a * b + c`` with a product that rounds to 1: contracted (fused) it would give the
    product's lost low bits, -2**-60, instead of 0."""
    exact = numba.njit(**dict(jit._EXACT, cache=False))
    fast = numba.njit(**dict(jit._OPTIONS, cache=False))

    @exact
    def product_plus(a, b, c):
        return a * b + c

    @fast
    def caller(v):
        return product_plus(v[0], v[1], v[2])

    v = np.array([1.0 + 2.0**-30, 1.0 - 2.0**-30, -1.0])
    assert caller(v) == 0.0  # compiled first inside the fastmath caller
    assert product_plus(v[0], v[1], v[2]) == 0.0


_SCRIPT = """
import numpy as np, fastbn
rng = np.random.default_rng(7)
x = rng.standard_normal((1000, 100))
m = fastbn.moments(x)
rm, rv = np.zeros(100), np.ones(100)
y, cache = fastbn.batch_norm(x, None, None, running_mean=rm, running_var=rv)
print((m.mean.tobytes() + m.m2.tobytes() + cache.stats.tobytes() + rv.tobytes()).hex())
"""


def test_a_process_that_compiles_and_one_that_loads_agree(tmp_path):
    """Statistics of a float64 (1000, 100) batch (two blocks, Chan's merge): the process
    that compiles the kernels into an empty cache and the next one, which loads them, give
    the same bits (before, 55 of the 100 m2 differed by 1-2 ulp)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), FASTBN_QUIET_COMPILE="1")
    env.pop("NUMBA_CACHE_LOCATOR_CLASSES", None)

    def run():
        done = subprocess.run(
            [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    compiled = run()
    assert any(tmp_path.rglob("*.nbi"))  # it did compile into the new cache
    assert run() == compiled
