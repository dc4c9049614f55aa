"""``fastbn.warmup()`` and ``python -m fastbn warmup``: compile (and cache) ahead of time
every kernel target a training loop uses.

Numba compiles an operation the first time it meets a new signature, then keeps it in its
on-disk cache (see ``fastbn._compile_notice``). A training loop uses, per dtype, the
forward pass in training and eval mode and the backward pass, each as a serial target
(small inputs) and a parallel one (``fastbn._plan``: ``parallel`` when the work splits into
several tasks and has ``SERIAL_BELOW`` elements or more). Warmup runs ``fastbn.BatchNorm``
through train forward, backward, eval forward and eval backward on small inputs shaped to
reach each target in each loop family: rows (``(N, C)``), planes (``(N, C, L)`` of more
than ``FUSE_BYTES`` per channel) and fused planes (up to ``FUSE_BYTES`` per channel). The
targets are the same compiled functions for every family, so the families after the
first only load or run; they are there to be sure. The cases' plans are checked in
``tests/test_warmup.py``, so a change of the thresholds in ``_plan`` shows there.

For images and shared machines: run it once where the cache will live (the same
``NUMBA_CACHE_DIR`` or install location, Python and Numba version) and later processes
compile nothing. ``kernel_cache_stats()`` counts what this process compiled and loaded.
"""

import sys
import time

import numpy as np

from . import _choice, _compile_notice

__all__ = ["warmup", "kernel_cache_stats"]

# (family, target, shape): canonical views (outer, C, inner) and their plans, float32
# and float64 alike (itemsize 4 or 8), checked in tests/test_warmup.py:
#   rows (N, C, 1); planes (N, C, L) with N*L*itemsize > FUSE_BYTES, or below SERIAL_BELOW
#   elements with planes of SHORT_PLANE_BYTES to LONG_PLANE_BYTES; fused planes otherwise.
CASES = (
    ("rows", "serial", (64, 16)),
    ("rows", "parallel", (16384, 8)),
    ("planes", "serial", (1, 1, 262144)),
    ("planes", "parallel", (4, 2, 65536)),
    ("fused planes", "serial", (4, 2, 256)),
    ("fused planes", "parallel", (4, 4, 4096)),
)
_DTYPES = {"float32": (np.float32,), "float64": (np.float64,), "both": (np.float32, np.float64)}


def _dispatchers():
    """Every Numba dispatcher defined in a loaded ``fastbn`` module (deduplicated)."""
    from numba.core.dispatcher import Dispatcher

    found = {}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "fastbn" or name.startswith("fastbn.")):
            continue
        stack, seen = list(vars(module).values()), set()
        while stack:  # dispatchers, and those in dicts (the drivers, ops.TARGETS)
            value = stack.pop()
            if isinstance(value, Dispatcher):
                found[id(value)] = value
            elif isinstance(value, dict) and id(value) not in seen:
                seen.add(id(value))
                stack.extend(value.values())
    return list(found.values())


def kernel_cache_stats():
    """``{"compiled": n, "loaded": m}``: signatures of fastbn's kernels this process has
    compiled (Numba's ``cache_misses``) and loaded from the disk cache (``cache_hits``)."""
    compiled = loaded = 0
    for dispatcher in _dispatchers():
        stats = dispatcher.stats
        compiled += sum(stats.cache_misses.values())
        loaded += sum(stats.cache_hits.values())
    return {"compiled": compiled, "loaded": loaded}


def _training_step(shape, dtype, activation=None):
    """Train forward, backward, eval forward and eval backward of a ``BatchNorm`` (with
    ``activation``) on ``x`` of ``shape`` and ``dtype``; returns the outputs' sum as a
    sanity value."""
    from .layer import BatchNorm

    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    bn = BatchNorm(shape[1], dtype=dtype, activation=activation)
    y = bn(x)
    dx = bn.backward(np.ones_like(y))
    bn.eval()
    y_eval = bn(x)
    dx_eval = bn.backward(np.ones_like(y_eval))
    total = float(y.sum()) + float(dx.sum()) + float(y_eval.sum()) + float(dx_eval.sum())
    if not np.isfinite(total):
        raise RuntimeError(f"fastbn warmup: non-finite output for shape {shape} {dtype}")
    return total


def _check_arguments(dtype, serial_only, relu, quiet):
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ValueError(f"warmup: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    for name, value in (("serial_only", serial_only), ("relu", relu), ("quiet", quiet)):
        if not isinstance(value, bool):
            raise TypeError(f"warmup: {name} must be a bool, got {type(value).__name__}")


def _run_jobs(jobs, steps, quiet):
    for i, (name, family, target, shape, activation) in enumerate(jobs, 1):
        t0, c0 = time.perf_counter(), kernel_cache_stats()["compiled"]
        _training_step(shape, np.dtype(name), activation)
        seconds = time.perf_counter() - t0
        compiled = kernel_cache_stats()["compiled"] - c0
        steps.append((name, family, target, seconds, compiled, activation))
        if not quiet:
            what = f"{name} {target} {family} {shape}" + (" ReLU" if activation else "")
            done = f"compiled {compiled} functions" if compiled else "from cache"
            _say(f"[{i:2d}/{len(jobs)}] {what}: {seconds:.1f} s ({done})")


def warmup(dtype="both", *, serial_only=False, relu=False, quiet=False):
    """Compile and cache every kernel target a training loop uses.

    ``dtype``: ``"float32"``, ``"float64"`` or ``"both"`` (float16 runs on the float32
    kernels). ``serial_only``: skip the parallel targets (only inputs below
    ``fastbn._plan.SERIAL_BELOW`` elements, or single-task ones, will then be fast on
    first use). ``relu``: also the targets of ``activation="relu"`` (batch norm fused
    with a ReLU), which the others do not contain. ``quiet``: no progress lines on stderr.

    Returns a dict: ``seconds`` (float), ``compiled`` and ``loaded`` (numbers of kernel
    signatures this call compiled, and loaded from Numba's disk cache), ``steps`` (a list
    of ``(dtype, family, target, seconds, compiled, activation)``, activation None or
    ``"relu"``). A second call, or one in a later
    process with the same cache, compiles nothing.
    """
    _check_arguments(dtype, serial_only, relu, quiet)
    cases = [c for c in CASES if not (serial_only and c[1] == "parallel")]
    # serial targets first: what a small first call needs is ready soonest
    cases.sort(key=lambda c: c[1] != "serial")
    activations = (None, "relu") if relu else (None,)
    jobs = [
        (np.dtype(d).name, *case, activation)
        for activation in activations
        for d in _DTYPES[dtype]
        for case in cases
    ]
    notice = _compile_notice.compile_notice_enabled()
    _compile_notice.set_compile_notice(False)  # warmup says what it does itself
    start, before = time.perf_counter(), kernel_cache_stats()
    steps = []
    try:
        with _choice.delay(0):  # the parallel targets from the first call
            _run_jobs(jobs, steps, quiet)
    finally:
        _compile_notice.set_compile_notice(notice)
    after = kernel_cache_stats()
    result = {
        "seconds": time.perf_counter() - start,
        "compiled": after["compiled"] - before["compiled"],
        "loaded": after["loaded"] - before["loaded"],
        "steps": steps,
    }
    if not quiet:
        _say(
            f"done in {result['seconds']:.1f} s: compiled {result['compiled']} kernel "
            f"signatures, loaded {result['loaded']} from Numba's cache ({_cache_location()})"
        )
    return result


def _say(text):
    print(f"fastbn warmup: {text}", file=sys.stderr, flush=True)


def _cache_location():
    from ._kernels import ops

    cache = getattr(ops.TARGETS["forward_train"][False, False, False], "_cache", None)
    return getattr(cache, "cache_path", None) or "unknown location"


def add_arguments(parser):
    """The options of ``python -m fastbn warmup``."""
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="both")
    parser.add_argument(
        "--serial-only", action="store_true", help="skip the parallel (multi-threaded) targets"
    )
    parser.add_argument("--relu", action="store_true", help='also the targets of activation="relu"')
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args):
    """``python -m fastbn warmup``: exit status 0 when every target ran."""
    warmup(args.dtype, serial_only=args.serial_only, relu=args.relu, quiet=args.quiet)
    return 0
