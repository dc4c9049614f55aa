"""Gradient-sum pass: per block and channel ``sum(dy)`` and ``sum(dy * (x - mean))``
(float64), and their sum over blocks in block order: what backward needs of ``dy``.

With ``relu`` (batch norm fused with a ReLU), ``dy`` is first masked where the forward
pre-activation ``(x - rm) * rp + rq`` (storage dtype, the forward's coefficients: rows
of ``fwork``, see ``affine``) is not positive, ``dy * (pre > 0)``; the sums are then
those of the masked ``dy``, in the same order as for an unmasked one. The ``*_relu``
loops are the plain ones with ``dy`` masked first (``masked_dy_at``): separate loops, so
that the plain ones stay as they are."""

import numba
import numpy as np

from .jit import borrowing, drivers, inline, jit, planes_only, relu_pair
from .layout import CHANNELS, INNER, NTASKS, W_MEAN, W_OFFSET, W_SCALE
from .partition import one_row_sweeps, task
from .stream import add_in_order, fmuladd, masked

_U = np.uint64
RELU = False  # a constant per compiled copy of gradsums_task (see jit.relu_pair)
ROWS = True  # False in the planes-only copies (see jit.planes_only)


@inline
def masked_dy_at(dy, x, i, rmc, rpc, rqc):
    """``dy[i]`` masked by its forward pre-activation."""
    return masked(fmuladd(x[i] - rmc, rpc, rqc), dy[i])


@jit
def _gradsums_rows(dy, x, C, r0, r1, c0, c1, mean, s1, s2):
    w = c1 - c0
    m = mean[c0:c1]
    acc1 = np.zeros(w)
    acc2 = np.zeros(w)
    r = r0
    four = not one_row_sweeps(w, x.itemsize, _U(x.size), _U(0))  # else the loop below
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
            acc1[j] += add_in_order(add_in_order(g0, g1), add_in_order(g2, g3))
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
def _gradsums_rows_relu(dy, x, C, r0, r1, c0, c1, mean, s1, s2, rm, rp, rq):
    """``_gradsums_rows`` of the masked ``dy``, the same sums in the same order: the rows
    of a sweep (four, or one) are masked into a buffer ``gm`` first, which the plain
    loops' sums then read as they read ``dy``. (Masked inside the sums' loop, with three
    more arrays than the plain loop, LLVM kept it scalar or, with the coefficients
    interleaved in one array, gathered them: 1.9-2.3x the plain loop's time.)"""
    w = c1 - c0
    m = mean[c0:c1]
    fm, fp, fq = rm[c0:c1], rp[c0:c1], rq[c0:c1]
    gm = np.empty(4 * w, dy.dtype)
    acc1 = np.zeros(w)
    acc2 = np.zeros(w)
    r = r0
    four = not one_row_sweeps(w, x.itemsize, _U(x.size), _U(0))  # else the loop below
    while four and r + _U(4) <= r1:
        i0 = r * C + c0
        i1 = i0 + C
        i2 = i1 + C
        i3 = i2 + C
        for k in range(4):
            ik = i0 + _U(k) * C
            g = gm[_U(k) * w :]
            for j in range(w):
                g[j] = masked_dy_at(dy, x, ik + j, fm[j], fp[j], fq[j])
        for j in range(w):  # as in _gradsums_rows
            g0 = np.float64(gm[j])
            g1 = np.float64(gm[w + j])
            g2 = np.float64(gm[2 * w + j])
            g3 = np.float64(gm[3 * w + j])
            # in the order that the plain loop's sum compiles to (which fastmath could
            # reassociate differently here): the sums of the composition, bit for bit
            acc1[j] += add_in_order(add_in_order(g0, g1), add_in_order(g2, g3))
            acc2[j] += (g0 * (x[i0 + j] - m[j]) + g1 * (x[i1 + j] - m[j])) + (
                g2 * (x[i2 + j] - m[j]) + g3 * (x[i3 + j] - m[j])
            )
        r += _U(4)
    # one row at a time (from memory): the rows are masked four at a time, each row in
    # turn (one stream per input, as the plain loop reads them), then summed row after row
    # in the plain loop's order, the accumulators loaded and stored once per four rows
    while not four and r + _U(4) <= r1:
        i0 = r * C + c0
        for k in range(4):
            ik = i0 + _U(k) * C
            g = gm[_U(k) * w :]
            for j in range(w):
                g[j] = masked_dy_at(dy, x, ik + j, fm[j], fp[j], fq[j])
        for j in range(w):
            a1 = acc1[j]
            a2 = acc2[j]
            for k in range(4):
                gk = np.float64(gm[_U(k) * w + j])
                a1 = add_in_order(a1, gk)
                a2 = fmuladd(gk, x[i0 + _U(k) * C + j] - m[j], a2)
            acc1[j] = a1
            acc2[j] = a2
        r += _U(4)
    while r < r1:
        i0 = r * C + c0
        for j in range(w):
            gm[j] = masked_dy_at(dy, x, i0 + j, fm[j], fp[j], fq[j])
        for j in range(w):
            g0 = np.float64(gm[j])
            acc1[j] += g0
            acc2[j] += g0 * (x[i0 + j] - m[j])
        r += _U(1)
    for j in range(w):
        s1[c0 + j] = acc1[j]
        s2[c0 + j] = acc2[j]


@borrowing
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


@borrowing
def _gradsums_planes_relu(dy, x, C, inner, o0, o1, c, mean, s1, s2, rm, rp, rq):
    """``_gradsums_planes`` of the masked ``dy``."""
    m = mean[c]
    rmc, rpc, rqc = rm[c], rp[c], rq[c]
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
            g = np.float64(masked_dy_at(dy, x, base + i, rmc, rpc, rqc))
            p1 += g
            p2 += g * (x[base + i] - m)
            h = np.float64(masked_dy_at(dy, x, other + i, rmc, rpc, rqc))
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


def _gradsums_task(plan, t, dy, x, mean, s1, s2, fwork, relu):
    """Task ``t``'s sums; ``fwork`` (the forward's ``work``) is read only when ``relu``, in
    the ``gradsums_task_relu`` copy."""
    b, lo, hi, c0, c1 = task(plan, t)
    C = _U(plan[CHANNELS])
    inner = _U(plan[INNER])
    if RELU and relu:
        rm, rp, rq = fwork[W_MEAN], fwork[W_SCALE], fwork[W_OFFSET]
        if ROWS and inner == 1:
            _gradsums_rows_relu(dy, x, C, lo, hi, c0, c1, mean, s1[b], s2[b], rm, rp, rq)
        else:
            _gradsums_planes_relu(dy, x, C, inner, lo, hi, c0, mean, s1[b], s2[b], rm, rp, rq)
    elif ROWS and inner == 1:
        _gradsums_rows(dy, x, C, lo, hi, c0, c1, mean, s1[b], s2[b])
    else:
        _gradsums_planes(dy, x, C, inner, lo, hi, c0, mean, s1[b], s2[b])


gradsums_task, gradsums_task_relu = relu_pair(borrowing, _gradsums_task)
gradsums_task_planes = planes_only(borrowing, gradsums_task)
gradsums_task_relu_planes = planes_only(borrowing, gradsums_task_relu)


def _gradsums(plan, dy, x, mean, s1, s2, fwork, relu):
    for t in numba.prange(plan[NTASKS]):
        gradsums_task(plan, np.int64(t), dy, x, mean, s1, s2, fwork, relu)


GRADSUMS = drivers(_gradsums, gradsums_task=gradsums_task_relu)


@borrowing
def merge_sums(s1, s2, sum1, sum2):
    """Per-channel sums of block partials, in block order (channels innermost, so the
    loop vectorizes)."""
    nblocks, C = s1.shape
    for c in range(_U(C)):
        sum1[c] = s1[0, c]
        sum2[c] = s2[0, c]
    for blk in range(1, nblocks):
        for c in range(_U(C)):
            sum1[c] += s1[blk, c]
            sum2[c] += s2[blk, c]


@borrowing
def fold_sums(col1, col2, fold, sum1, sum2):
    """Channel ``c``'s sums from those of its ``fold`` columns ``c * fold`` to ``c * fold +
    fold - 1`` of a folded plan (see ``fastbn._plan.TINY_PLANE_BYTES``), in column order."""
    f = _U(fold)
    for c in range(_U(sum1.shape[0])):
        j = c * f
        a = col1[j]
        b = col2[j]
        for e in range(_U(1), f):
            a += col1[j + e]
            b += col2[j + e]
        sum1[c] = a
        sum2[c] = b
