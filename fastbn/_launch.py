"""Work partition and the entry points that run one whole operation per call.

The partition depends only on the canonical shape ``(outer, C, inner)``, never on
the thread count, so the reduction order (and hence every bit of the result) is
the same on 1 thread or 16 and from run to run.
"""

import glob

import numpy as np

from . import _kernels as K
from ._threading import parallel_call

# Elements per task: big enough to amortize a task, small enough for 2+ threads.
_TASK_ELEMENTS = 1 << 16
# Row chunks wider than this are split into column chunks (rows family).
_MAX_SPLIT_WIDTH = 4096
_SPLIT_WIDTH = 1024
# Row blocks: each has a row of partial sums per channel, in (nblocks, C) float64 buffers
# allocated per call, and fresh multi-MiB buffers cost a page fault per 4 KiB: measured
# as a quarter to half a pass over the data on (16384, 1024) and (1024, 16384) float32
# with 256 and 16 blocks. So (rows family) blocks grow until there are at most _MAX_BLOCKS
# of them and a buffer holds at most _MAX_PARTIALS values; wide rows still give many
# tasks through their column splits.
_MAX_BLOCKS = 64
_MAX_PARTIALS = 1 << 15
# Below this many elements a parallel region costs more than it saves.
SERIAL_BELOW = 1 << 15


def _last_level_cache_bytes(default=32 << 20):
    """The size of the largest CPU cache Linux reports (sysfs), else ``default``."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            continue
    return max(sizes) if sizes else default


# Outputs of at least this many bytes are written with streaming (non-temporal) stores,
# which skip the read of each destination line (see ``fastbn._stream``). An output that
# big cannot stay in the last-level cache next to its input anyway, so nothing is lost
# by sending it straight to memory. Measured on the 2-core EPYC VM (32 MiB L3), float32,
# same process: the elementwise pass of (65536, 256) 1.02 -> 0.71 probe units, the dx
# pass 1.32 -> 1.12; but at 8 MiB outputs, which ordinary stores leave in L3 for the next
# call, streaming lost (0.97 -> 1.13).
STREAM_BYTES = _last_level_cache_bytes() // 2


# Planes of one channel up to this many bytes are processed by one task that reads them
# from memory once per pass and again from its core's L2 cache (1 MiB here).
FUSE_BYTES = 512 << 10


class Plan:
    """How one canonical shape of ``itemsize``-byte elements is cut into tasks (see
    ``fastbn._kernels``).

    ``ints`` is what the kernels read: (outer, C, inner, block_len, nblocks, nsplit,
    split_width, ntasks, parallel, fused, affine_block, affine_tasks); ``counts`` the
    number of values per block. The elementwise pass of the rows family keeps no
    per-column state, so its tasks are ``affine_block`` whole rows: a wide row is
    streamed from start to end instead of in ``split_width`` pieces a page apart.
    """

    __slots__ = ("outer", "C", "inner", "ints", "counts", "parallel", "fused", "ones", "zeros")

    def __init__(self, outer, C, inner, itemsize):
        self.outer, self.C, self.inner = outer, C, inner
        self.fused = inner > 1 and outer * inner * itemsize <= FUSE_BYTES
        if inner == 1:
            split_width = C if C <= _MAX_SPLIT_WIDTH else _SPLIT_WIDTH
            nsplit = -(-C // split_width) if C else 0
            max_blocks = max(1, min(_MAX_BLOCKS, _MAX_PARTIALS // max(C, 1)))
            block_len = max(4, _TASK_ELEMENTS // max(split_width, 1), -(-outer // max_blocks))
        else:
            split_width = 1
            nsplit = C
            block_len = max(1, outer) if self.fused else max(1, _TASK_ELEMENTS // inner)
        nblocks = max(1, -(-outer // block_len))
        ntasks = nblocks * nsplit
        if inner == 1:
            affine_block = max(1, _TASK_ELEMENTS // max(C, 1))
            affine_tasks = max(1, -(-outer // affine_block))
        else:
            affine_block, affine_tasks = block_len, ntasks
        self.parallel = ntasks > 1 and outer * C * inner >= SERIAL_BELOW
        self.ints = np.array(
            [
                outer,
                C,
                inner,
                block_len,
                nblocks,
                nsplit,
                split_width,
                ntasks,
                int(self.parallel),
                int(self.fused),
                affine_block,
                affine_tasks,
            ],
            dtype=np.int64,
        )
        counts = np.full(nblocks, float(block_len * inner))
        counts[-1] = float((outer - (nblocks - 1) * block_len) * inner)
        self.counts = counts
        self.ones = np.ones(C)  # gamma when there is none
        self.zeros = np.zeros(C)  # beta when there is none


_plans = {}
# stand-ins for absent running statistics, by the dtype char of x
_STAND_IN = {"f": np.zeros(1, np.float32), "d": np.zeros(1, np.float64)}


def plan_for(outer, C, inner, itemsize):
    key = (outer, C, inner, itemsize)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) > 256:
            _plans.clear()
        plan = _plans[key] = Plan(outer, C, inner, itemsize)
    return plan


def _ro(a):
    """A read-only view: inputs always reach the kernels typed read-only, so a caller's
    read-only array does not trigger another compilation."""
    v = a.view()
    v.flags.writeable = False
    return v


def _f64(a):
    """A private, writable, contiguous float64 copy of a per-channel array."""
    return np.array(a, dtype=np.float64, order="C")


def _call(plan, fn, *args):
    if plan.parallel:
        return parallel_call(fn, *args)
    return fn(*args)


def _gamma_beta(plan, gamma, beta):
    return (plan.ones if gamma is None else gamma), (plan.zeros if beta is None else beta)


def forward_train(
    plan,
    x,
    y,
    gamma,
    beta,
    eps,
    running_mean=None,
    running_var=None,
    momentum=0.0,
    running_var_ddof=1,
):
    """Normalize flat ``x`` into flat ``y`` with batch statistics; update the running
    statistics in place (see ``_kernels.forward_train``; ``running_var_ddof``: 1 unbiased,
    0 biased running variance).

    ``gamma``/``beta``: float64 ``(C,)`` or None. Returns float64 ``(mean, var, invstd)``
    (``var`` biased) and whether every variance is finite.
    """
    mean, var, invstd = np.empty((3, plan.C))
    gamma, beta = _gamma_beta(plan, gamma, beta)
    rm, rv = _kernel_running(running_mean), _kernel_running(running_var)
    # an absent running array is replaced by a same-dtype stand-in that is not written,
    # so that the common cases share one compiled signature
    stand_in = rv if rm is None else rm
    if stand_in is None:
        stand_in = _STAND_IN[x.dtype.char]
    momentum = 0.0 if momentum is None else float(momentum)
    args = (plan.ints, plan.counts, _ro(x), y, gamma, beta, eps, mean, var, invstd)
    args += (STREAM_BYTES, stand_in if rm is None else rm, stand_in if rv is None else rv)
    args += (momentum, rm is not None, rv is not None, float(running_var_ddof))
    finite, fits = _call(plan, K.forward_train, *args)
    if not fits:
        _affine_float64(plan, y, x, mean, invstd * gamma, beta)
    for given, used in ((running_mean, rm), (running_var, rv)):
        if used is not given:
            given[...] = used
    return mean, var, invstd, finite


def _kernel_running(a):
    """``a`` itself when kernels can update it (native float32/float64), else a float64
    copy to be written back (float16, byte-swapped)."""
    if a is None or (a.dtype.char in "fd" and a.dtype.isnative):
        return a
    return a.astype(np.float64)


def forward_eval(plan, x, y, gamma, beta, eps, mean, var):
    """Normalize flat ``x`` into flat ``y`` with given ``mean``/``var``; returns ``invstd``."""
    invstd = np.empty(plan.C)
    gamma, beta = _gamma_beta(plan, gamma, beta)
    mean = _f64(mean)
    args = (plan.ints, _ro(x), y, gamma, beta, eps, mean, _f64(var), invstd)
    if not _call(plan, K.forward_eval, *args, STREAM_BYTES):
        _affine_float64(plan, y, x, mean, invstd * gamma, beta)
    return invstd


def backward(plan, dy, x, dx, mean, invstd, gamma, training):
    """Write flat ``dx``; return float64 ``(dgamma, dbeta)`` (before any dtype cast)."""
    C = plan.C
    dgamma, dbeta = np.empty(C), np.empty(C)
    gamma = plan.ones if gamma is None else gamma
    args = (plan.ints, _ro(dy), _ro(x), dx, mean, invstd, gamma, bool(training), dgamma, dbeta)
    if not _call(plan, K.backward, *args, STREAM_BYTES):
        g = gamma * invstd
        if training:  # the coefficients of K._grad_params
            n = float(plan.outer * plan.inner)
            p, q = -g * invstd * (dgamma / n), -g * (dbeta / n)
            _affine_float64(plan, dx, x, mean, p, q, dy, g)
        else:
            zeros = np.zeros(C)
            _affine_float64(plan, dx, dy, zeros, g, zeros)
    return dgamma, dbeta


def _affine_float64(plan, out, x, m, p, q, dy=None, g=None):
    """``out = (x - m) * p + q`` (``+ dy * g``) in NumPy float64, per channel of the flat
    canonical buffers: the elementwise pass for the rare float32 case whose coefficients
    exceed float32's range (``gamma * invstd`` above 3.4e38), which the kernels report."""
    shape = (plan.outer, plan.C, plan.inner)

    def per_channel(a):
        return np.asarray(a, np.float64).reshape(1, plan.C, 1)

    result = (x.reshape(shape).astype(np.float64) - per_channel(m)) * per_channel(p)
    result += per_channel(q)
    if dy is not None:
        result += dy.reshape(shape) * per_channel(g)
    out.reshape(shape)[...] = result
