"""Threads in a real process: forked children, the spin policy, serial or parallel by timing."""

import hashlib
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest

import fastbn
from fastbn import _choice, _threading


def _parallel_input():
    x = np.random.default_rng(3).standard_normal((4096, 256)).astype(np.float32)
    y, cache = fastbn.batch_norm(x)
    assert cache.plan.parallel  # big enough for the parallel kernels
    return x, y


def _child(x, queue):
    y, _ = fastbn.batch_norm(x)
    queue.put(hashlib.sha256(y.tobytes()).hexdigest())


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="no fork start method"
)
def test_forked_child_computes_after_the_parent_ran_parallel_kernels():
    """GNU OpenMP terminates a forked child that enters a parallel region its parent's
    runtime started; the child must run the serial kernels instead, with the same bits."""
    x, y = _parallel_input()
    with fastbn.num_threads(fastbn.get_num_threads()), _choice.delay(0):
        fastbn.batch_norm(x)  # the parallel target first: the parent's pool is running now
    assert _threading._started
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(x, queue))
    child.start()
    digest = queue.get(timeout=120)
    child.join(60)
    assert child.exitcode == 0, f"child exit code {child.exitcode}"
    assert digest == hashlib.sha256(y.tobytes()).hexdigest()


def _run(code, **env):
    environ = {
        k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
    }
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=300
    )


def test_spin_count_is_set_only_while_libgomp_loads():
    code = (
        "import os, fastbn; from fastbn import _threading as t; "
        "print(t._set, 'GOMP_SPINCOUNT' in os.environ)"
    )
    done = _run(code)
    assert done.returncode == 0, done.stderr
    if _threading.threading_layer_name() == "omp":
        assert done.stdout.split() == [
            "{'GOMP_SPINCOUNT':",
            f"'{_threading.SPIN_COUNT}'}}",
            "False",
        ]
    done = _run(code, OMP_WAIT_POLICY="active")  # the user's choice wins
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["{}", "False"]


def test_one_thread_runs_the_serial_kernels_with_the_same_bits():
    x, y = _parallel_input()
    with fastbn.num_threads(1):
        assert not _threading.parallel_usable()
        y1, _ = fastbn.batch_norm(x)
    assert y1.tobytes() == y.tobytes()


@pytest.fixture(autouse=False)
def no_delay():
    with _choice.delay(0):
        yield


def _feed(choice, times):
    """Run ``choice`` over calls that take ``times[mode]`` ns; the modes it picked."""
    picked = []
    for _ in range(200):
        mode = choice.mode()
        picked.append(mode)
        choice.record(mode, times[mode])
    return picked


def test_choice_keeps_the_faster_mode_and_tries_the_other_now_and_then(no_delay):
    choice = _choice.Choice()
    picked = _feed(choice, {0: 100.0, 1: 40.0})  # parallel faster
    # each mode timed first (its first call, which may compile, is not counted)
    assert picked[:3] == [1, 1, 1] and picked[3:6] == [0, 0, 0]
    assert sum(picked[6:]) >= len(picked[6:]) - 8  # parallel nearly always, a few tries
    assert 0 in picked[20:]  # serial is tried again later
    choice = _choice.Choice()
    picked = _feed(choice, {0: 40.0, 1: 100.0})  # serial faster (a busy machine)
    assert picked[6:].count(1) <= 8 and choice.interval > _choice.PROBE_EVERY  # backs off


def test_choice_follows_a_change_of_load(no_delay):
    choice = _choice.Choice()
    _feed(choice, {0: 100.0, 1: 40.0})
    picked = _feed(choice, {0: 100.0, 1: 400.0})  # parallel becomes slow: switch
    assert picked[-100:].count(0) >= 90
    picked = _feed(choice, {0: 100.0, 1: 40.0})  # and back once the tries see it fast
    assert picked[-100:].count(1) >= 90


def test_choice_ignores_a_single_slow_call(no_delay):
    choice = _choice.Choice()
    _feed(choice, {0: 100.0, 1: 40.0})
    choice.record(1, 1e6)  # one parallel call delayed by the scheduler
    assert choice.mode() == 1 or choice.countdown <= 0


def test_choice_does_not_count_the_call_that_wakes_a_mode_up(no_delay):
    """After serial calls the OpenMP threads sleep: the first parallel call of a try is
    slow, the next ones are not. The try's first call is not kept, so once the parallel
    mode is faster again (awake) the choice goes back to it; kept, the slow first call
    made every try lose and serial stayed chosen."""
    choice = _choice.Choice()
    _feed(choice, {0: 100.0, 1: 400.0})  # a busy phase: serial chosen
    picked, last = [], 0
    for _ in range(400):  # the load is gone: parallel wakes up slowly, then is fast
        mode = choice.mode()
        choice.record(mode, (40.0 if last == 1 else 1000.0) if mode == 1 else 100.0)
        picked.append(mode)
        last = mode
    assert picked[-100:].count(1) >= 90
    # a mode that stays slow once awake still loses its tries
    choice = _choice.Choice()
    picked = _feed(choice, {0: 40.0, 1: 100.0})
    assert picked[-100:].count(0) >= 90


def test_choice_runs_serial_until_the_delay_is_spent():
    """Parallel targets are compiled only once the serial mode has run PARALLEL_AFTER_NS
    of an operation (a short session never compiles them): here 1000 ns of 100 ns calls."""
    with _choice.delay(1000):
        choice = _choice.Choice()
        picked = _feed(choice, {0: 100.0, 1: 40.0})
    # the first serial call is not kept (it may compile); ten kept calls reach 1000 ns
    assert picked[:11] == [0] * 11 and picked[11] == 1
    assert picked[-100:].count(1) >= 90  # then the faster mode, as without a delay
