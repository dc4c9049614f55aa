"""Interleaved timing in one process, and the same-process bandwidth probe.

This machine's memory bandwidth swings from minute to minute, so each case also times a
*probe*, interleaved with the implementations: a plain parallel kernel that reads ``x``
once and writes an array of the same size once. ``units`` is a time divided by the
probe's. The probe's stores are write-allocate (three streams); with them the floors
would be 1.0 unit for forward_eval, 1.33 for forward_train (statistics pass + normalize
pass), 2.0 for backward and 3.33 for forward_backward. fastbn writes outputs of half the
last-level cache or more with streaming stores (two streams), whose floors are 0.67, 1.0,
1.67 and 2.67.
"""

import time

import numba
import numpy as np


@numba.njit(parallel=True, cache=True, nogil=True)
def _probe_kernel(x, y):
    n = x.size
    block = 1 << 16
    for b in numba.prange((n + block - 1) // block):
        lo = b * block
        xs = x[lo : min(n, lo + block)]
        ys = y[lo : min(n, lo + block)]
        for i in range(xs.size):
            ys[i] = xs[i] * 1.5 + 0.5


def make_probe(data):
    """A callable streaming ``x``'s bytes once in and once out (flat, contiguous)."""
    x = np.ascontiguousarray(data["x"]).reshape(-1)
    y = np.empty_like(x)
    return lambda: _probe_kernel(x, y)


def _burst_sizes(fns, sample_s):
    """Calls per sample for each callable, after two untimed calls (JIT, caches, page
    faults); the second call's time sets the burst length."""
    number = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()  # a warm call: the first one may be far slower and would make bursts too short
        once = time.perf_counter() - t0
        number[name] = max(1, min(1000, int(sample_s / max(once, 1e-7))))
    return number


def interleaved_samples(
    fns, *, rounds, budget_s=None, settle_s=0.002, sample_s=0.002, short=(), wrap=None
):
    """Seconds per call of each callable, one sample per round, sampled round-robin so
    that bandwidth swings hit all alike: ``{name: [seconds, ...]}``.

    A sample times ``number`` back-to-back calls, ``number`` chosen so that a sample lasts
    about ``sample_s`` (tiny shapes are timed in bursts). ``settle_s`` of sleep precede
    each sample: an OpenMP runtime's threads spin for a while after a parallel region, and
    numba's and torch's would otherwise steal the cores from whoever runs next. The
    callables named in ``short`` (the slow reference) take part in the first three rounds
    only. With ``budget_s``, rounds stop after that many seconds (three at least).
    ``wrap`` maps a name to a context manager entered around its warm-up and samples
    (e.g. a thread count), outside the timed region.
    """
    wrap = wrap or {}
    with_ctx = {name: _wrapped(fn, wrap.get(name)) for name, fn in fns.items()}
    number = _burst_sizes(with_ctx, sample_s)
    times = {name: [] for name in fns}
    start = time.perf_counter()
    for r in range(rounds):
        for name, fn in fns.items():
            if name in short and r >= 3:
                continue
            time.sleep(settle_s)
            times[name].append(_sample(fn, number[name], wrap.get(name)))
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
    return times


def _wrapped(fn, ctx):
    if ctx is None:
        return fn

    def call():
        with ctx():
            fn()

    return call


def _sample(fn, n, ctx):
    if ctx is None:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n
    with ctx():
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n


def medians(samples):
    """``{name: median seconds}`` of ``interleaved_samples``' result."""
    return {name: float(np.median(ts)) for name, ts in samples.items()}


def interleaved_medians(fns, **kw):
    """Median seconds per call of each callable: ``interleaved_samples``' medians."""
    return medians(interleaved_samples(fns, **kw))
