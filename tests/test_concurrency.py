"""Concurrency and determinism: many Python threads at once give the serial results,
and the bits never depend on the number of Numba threads.

The shapes (``_cases.DRIVER_SHAPES``) are chosen so that both kernel families run their
parallel drivers (several tasks, above the serial threshold), plus one small serial shape.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading

import numba
import numpy as np
import pytest

import fastbn

from _cases import DRIVER_SHAPES, relayout

THREADS = 8
ITERATIONS = 200
MAX_THREADS = numba.config.NUMBA_NUM_THREADS


def _inputs(i, dtype=np.float32):
    shape, axis, how = DRIVER_SHAPES[i % len(DRIVER_SHAPES)]
    rng = np.random.default_rng(100 + i)
    C = shape[axis]
    x = (rng.standard_normal(shape) * (1 + i) + i).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    x = relayout(x, how)
    gamma = (1 + 0.1 * rng.standard_normal(C)).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    return x, dy, gamma, beta, axis


def _run(x, dy, gamma, beta, axis, training=True):
    """Forward and backward; returns every output as bytes."""
    C = gamma.shape[0]
    rm, rv = np.zeros(C, gamma.dtype), np.ones(C, gamma.dtype)
    y, cache = fastbn.batch_norm(
        x, gamma, beta, axis=axis, training=training, running_mean=rm, running_var=rv
    )
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, cache)
    return [a.tobytes() for a in (y, dx, dgamma, dbeta, rm, rv)]


def test_eight_threads_match_serial_results():
    inputs = [_inputs(i) for i in range(THREADS)]
    expected = [(_run(*a), _run(*a, training=False)) for a in inputs]
    barrier = threading.Barrier(THREADS)
    errors = []

    def worker(i):
        try:
            fastbn.set_num_threads(1 + i % min(2, MAX_THREADS))  # per Python thread
            barrier.wait()
            for it in range(ITERATIONS):
                training = it % 4 != 3
                got = _run(*inputs[i], training=training)
                if got != expected[i][0 if training else 1]:
                    errors.append(f"thread {i} iteration {it}: results differ from serial")
                    return
        except Exception as e:  # pragma: no cover - reported below
            errors.append(f"thread {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.skipif(MAX_THREADS < 2, reason="needs NUMBA_NUM_THREADS >= 2")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("i", range(len(DRIVER_SHAPES)))
def test_bits_do_not_depend_on_thread_count(i, dtype):
    args = _inputs(i, dtype)
    results = {}
    for n in (1, 2, MAX_THREADS, 1):
        with fastbn.num_threads(n):
            assert fastbn.get_num_threads() == n
            for training in (True, False):
                got = _run(*args, training=training)
                key = (n, training)
                results.setdefault(key, got)
                assert got == results[key]  # run to run
    for training in (True, False):
        assert results[(1, training)] == results[(2, training)]
        assert results[(1, training)] == results[(MAX_THREADS, training)]


def test_num_threads_is_per_python_thread_and_restored():
    before = fastbn.get_num_threads()
    seen = {}

    def other():
        seen["other"] = fastbn.get_num_threads()

    with fastbn.num_threads(1):
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert fastbn.get_num_threads() == 1
    assert fastbn.get_num_threads() == before
    assert seen["other"] == MAX_THREADS  # a new thread starts with Numba's default


def test_threading_layer_is_thread_safe_or_serialized():
    from fastbn import _threading

    layer = fastbn.threading_layer_name()
    assert layer in {"omp", "tbb", "workqueue", "threadsafe", "safe", "forksafe"}
    assert _threading.serialized() == (layer not in {"omp", "tbb", "threadsafe", "safe"})
    _run(*_inputs(0))  # a parallel kernel has run: Numba reports the layer in use
    assert numba.threading_layer() == layer or layer in {"threadsafe", "safe", "forksafe"}


_CHILD = textwrap.dedent(
    """
    import hashlib, json, sys, threading
    sys.path.insert(0, {tests!r})
    import fastbn
    from test_concurrency import DRIVER_SHAPES, _inputs, _run

    def digest(i):
        return hashlib.sha256(b"".join(_run(*_inputs(i)))).hexdigest()

    want = [digest(i) for i in range(len(DRIVER_SHAPES))]
    bad = []

    def worker(i):
        for _ in range(10):
            if digest(i % len(DRIVER_SHAPES)) != want[i % len(DRIVER_SHAPES)]:
                bad.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    from fastbn import _threading
    print(json.dumps({{"layer": fastbn.threading_layer_name(), "serialized":
        _threading.serialized(), "digests": want, "bad": bad}}))
    """
)


@pytest.mark.parametrize(
    "env",
    [{}, {"NUMBA_THREADING_LAYER": "workqueue", "NUMBA_NUM_THREADS": "3"}],
    ids=["second_process", "workqueue_3_threads"],
)
def test_another_process_gives_the_same_bits(env):
    """A fresh process loads the kernels from Numba's on-disk cache (written by this one)
    and runs 4 Python threads at once: no crash, and this process's bits. With
    NUMBA_THREADING_LAYER=workqueue (not thread-safe: it aborts when two threads enter
    parallel code) fastbn serializes, and 3 Numba threads give the same bits as 2."""
    from fastbn import _threading

    mine = [
        hashlib.sha256(b"".join(_run(*_inputs(i)))).hexdigest() for i in range(len(DRIVER_SHAPES))
    ]
    code = _CHILD.format(tests=os.path.dirname(__file__))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if env:
        assert report["layer"] == "workqueue" and report["serialized"] is True
    else:
        assert report["layer"] == fastbn.threading_layer_name()
        assert report["serialized"] == _threading.serialized()
    assert report["bad"] == []
    assert report["digests"] == mine
