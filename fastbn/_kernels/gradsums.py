"""Gradient-sum pass: per block and channel ``sum(dy)`` and ``sum(dy * (x - mean))``
(float64), and their sum over blocks in block order: what backward needs of ``dy``."""

import numba
import numpy as np

from .jit import drivers, jit
from .layout import CHANNELS, INNER, NTASKS
from .partition import four_row_sweeps, task

_U = np.uint64


@jit
def _gradsums_rows(dy, x, C, r0, r1, c0, c1, mean, s1, s2):
    w = c1 - c0
    m = mean[c0:c1]
    acc1 = np.zeros(w)
    acc2 = np.zeros(w)
    r = r0
    four = four_row_sweeps(C, x.itemsize, False, _U(x.size))
    while four and r + _U(4) <= r1:
        i0 = r * C + c0
        i1 = i0 + C
        i2 = i1 + C
        i3 = i2 + C
        for j in range(w):  # float64 before the pairs are added (float32 dy loses digits)
            g0 = np.float64(dy[i0 + j])
            g1 = np.float64(dy[i1 + j])
            g2 = np.float64(dy[i2 + j])
            g3 = np.float64(dy[i3 + j])
            acc1[j] += (g0 + g1) + (g2 + g3)
            acc2[j] += (g0 * (x[i0 + j] - m[j]) + g1 * (x[i1 + j] - m[j])) + (
                g2 * (x[i2 + j] - m[j]) + g3 * (x[i3 + j] - m[j])
            )
        r += _U(4)
    while r < r1:
        i0 = r * C + c0
        for j in range(w):
            g0 = np.float64(dy[i0 + j])
            acc1[j] += g0
            acc2[j] += g0 * (x[i0 + j] - m[j])
        r += _U(1)
    for j in range(w):
        s1[c0 + j] = acc1[j]
        s2[c0 + j] = acc2[j]


@jit
def _gradsums_planes(dy, x, C, inner, o0, o1, c, mean, s1, s2):
    """Two planes at a time, as ``moments._moments_planes``."""
    m = mean[c]
    acc1 = 0.0
    acc2 = 0.0
    o = o0
    while o < o1:
        base = (o * C + c) * inner
        pair = o + _U(1) < o1
        other = base + C * inner if pair else base
        p1 = 0.0
        p2 = 0.0
        q1 = 0.0
        q2 = 0.0
        for i in range(inner):
            g = np.float64(dy[base + i])
            p1 += g
            p2 += g * (x[base + i] - m)
            h = np.float64(dy[other + i])
            q1 += h
            q2 += h * (x[other + i] - m)
        acc1 += p1
        acc2 += p2
        if pair:
            acc1 += q1
            acc2 += q2
        o += _U(2)
    s1[c] = acc1
    s2[c] = acc2


@jit
def gradsums_task(plan, t, dy, x, mean, s1, s2):
    b, lo, hi, c0, c1 = task(plan, t)
    C = _U(plan[CHANNELS])
    if plan[INNER] == 1:
        _gradsums_rows(dy, x, C, lo, hi, c0, c1, mean, s1[b], s2[b])
    else:
        _gradsums_planes(dy, x, C, _U(plan[INNER]), lo, hi, c0, mean, s1[b], s2[b])


def _gradsums(plan, *args):
    for t in numba.prange(plan[NTASKS]):
        gradsums_task(plan, t, *args)


gradsums_serial, gradsums_parallel = drivers(_gradsums)


@jit
def merge_sums(s1, s2, sum1, sum2):
    """Per-channel sums of block partials, in block order (channels innermost, so the
    loop vectorizes)."""
    nblocks, C = s1.shape
    for c in range(C):
        sum1[c] = s1[0, c]
        sum2[c] = s2[0, c]
    for blk in range(1, nblocks):
        for c in range(C):
            sum1[c] += s1[blk, c]
            sum2[c] += s2[blk, c]
