"""Work partition and kernel launch: serial or parallel, scratch for partial sums.

The partition depends only on the canonical shape ``(outer, C, inner)``, never on
the thread count, so the reduction order (and hence every bit of the result) is
the same on 1 thread or 16 and from run to run.
"""

import numpy as np

from . import _kernels as K
from ._threading import parallel_call

# Elements per task: big enough to amortize a task, small enough for 2+ threads.
_TASK_ELEMENTS = 1 << 16
# Row chunks wider than this are split into column chunks (rows family).
_MAX_SPLIT_WIDTH = 4096
_SPLIT_WIDTH = 1024
# Below this many elements a parallel region costs more than it saves.
SERIAL_BELOW = 1 << 15

_EMPTY = np.empty(0)


class Plan:
    """How one canonical shape is cut into tasks (see ``fastbn._kernels``)."""

    __slots__ = (
        "outer",
        "C",
        "inner",
        "block_len",
        "nblocks",
        "nsplit",
        "split_width",
        "ntasks",
        "counts",
        "parallel",
    )

    def __init__(self, outer, C, inner):
        self.outer, self.C, self.inner = outer, C, inner
        if inner == 1:
            width = C if C <= _MAX_SPLIT_WIDTH else _SPLIT_WIDTH
            self.split_width = width
            self.nsplit = -(-C // width)
            self.block_len = max(4, _TASK_ELEMENTS // width)
        else:
            self.split_width = 1
            self.nsplit = C
            self.block_len = max(1, _TASK_ELEMENTS // inner)
        self.nblocks = max(1, -(-outer // self.block_len))
        self.ntasks = self.nblocks * self.nsplit
        per_block = np.full(self.nblocks, float(self.block_len * inner))
        per_block[-1] = float((outer - (self.nblocks - 1) * self.block_len) * inner)
        self.counts = per_block
        self.parallel = self.ntasks > 1 and outer * C * inner >= SERIAL_BELOW


_plans = {}


def plan_for(outer, C, inner):
    key = (outer, C, inner)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) > 256:
            _plans.clear()
        plan = _plans[key] = Plan(outer, C, inner)
    return plan


def _reduce(plan, a, b, sa, sb, from_block):
    shape = (plan.nblocks, plan.C)
    s1 = np.empty(shape)
    s2 = np.empty(shape)
    shift = np.empty(shape)
    args = (
        plan.ntasks,
        a,
        b,
        plan.outer,
        plan.C,
        plan.inner,
        plan.block_len,
        plan.nsplit,
        plan.split_width,
        sa,
        sb,
        from_block,
        s1,
        s2,
        shift,
    )
    if plan.parallel:
        parallel_call(K.reduce_parallel, *args)
    else:
        K.reduce_serial(*args)
    return s1, s2, shift


def moments(plan, x):
    """Per-channel mean and biased variance (float64) of flat ``x``."""
    s1, s2, shift = _reduce(plan, x, x, _EMPTY, _EMPTY, True)
    mean = np.empty(plan.C)
    var = np.empty(plan.C)
    K.merge_moments(s1, s2, shift, plan.counts, mean, var)
    return mean, var


def grad_sums(plan, dy, x, mean):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` (float64)."""
    s1, s2, _ = _reduce(plan, dy, x, np.zeros(plan.C), mean, False)
    sum_dy = np.empty(plan.C)
    sum_dy_xc = np.empty(plan.C)
    K.merge_sums(s1, s2, sum_dy, sum_dy_xc)
    return sum_dy, sum_dy_xc


def affine(plan, x, out, m, p, q, dy=None, g=None):
    """``out = (x - m) * p + q``, or ``dy * g + (x - m) * p + q`` when ``dy`` is given."""
    with_dy = dy is not None
    if not with_dy:
        dy, g = x, p  # never read; any C-length float64 array
    args = (
        plan.ntasks,
        x,
        dy,
        out,
        plan.outer,
        plan.C,
        plan.inner,
        plan.block_len,
        plan.nsplit,
        plan.split_width,
        m,
        p,
        q,
        g,
        with_dy,
    )
    if plan.parallel:
        parallel_call(K.affine_parallel, *args)
    else:
        K.affine_serial(*args)
