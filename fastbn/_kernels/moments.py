"""Statistics pass: per block and channel, shifted sums, and their merge.

For block ``b`` and channel ``c``: ``s1 = sum(x - s)``, ``s2 = sum((x - s)**2)`` with
``s`` the block's first value of the channel (no cancellation at large offsets),
accumulated in float64 whatever the storage dtype; ``merge_moments`` combines the
blocks with Chan's formula in block order into each channel's mean and ``m2`` (the sum
of squared deviations).
"""

import numba
import numpy as np

from .jit import borrowing, drivers, exact, exact_borrowing, jit, planes_only
from .layout import CHANNELS, INNER, NTASKS
from .partition import (
    MOMENTS_ONE_ROW_FROM,
    PREFETCH_ROWS,
    one_row_sweeps,
    prefetch_four_rows,
    prefetching,
    task,
)
from .stream import fmuladd

_U = np.uint64


@jit
def _moments_rows(x, C, r0, r1, c0, c1, s1, s2, shift):
    w = c1 - c0
    first = r0 * C + c0
    # the task's columns of the outputs are its shift and accumulators (no allocation)
    s, acc1, acc2 = shift[c0:c1], s1[c0:c1], s2[c0:c1]
    for j in range(w):
        s[j] = x[first + j]
        acc1[j] = 0.0
        acc2[j] = 0.0
    r = r0
    ahead = prefetching(w, x.itemsize, _U(x.size))
    # else one row at a time (the loop below)
    four = not one_row_sweeps(w, x.itemsize, _U(x.size), _U(MOMENTS_ONE_ROW_FROM))
    while four and r + _U(4) <= r1:
        i0 = r * C + c0
        i1 = i0 + C
        i2 = i1 + C
        i3 = i2 + C
        if ahead and r + _U(PREFETCH_ROWS + 4) <= r1:
            prefetch_four_rows(x, x, i0 + _U(PREFETCH_ROWS) * C, C, w)
        for j in range(w):
            d0 = x[i0 + j] - s[j]
            d1 = x[i1 + j] - s[j]
            d2 = x[i2 + j] - s[j]
            d3 = x[i3 + j] - s[j]
            acc1[j] += (d0 + d1) + (d2 + d3)
            acc2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        r += _U(4)
    while r < r1:
        i0 = r * C + c0
        for j in range(w):
            d0 = x[i0 + j] - s[j]
            acc1[j] += d0
            acc2[j] += d0 * d0
        r += _U(1)


@borrowing
def _moments_planes(x, C, inner, o0, o1, c, s1, s2, shift):
    """Two planes at a time: two streams from memory at once keep more reads in flight
    than one (each plane is short, and the prefetcher starts over at every plane)."""
    s = np.float64(x[(o0 * C + c) * inner])
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
            d = x[base + i] - s
            p1 += d
            p2 += d * d
            e = x[other + i] - s
            q1 += e
            q2 += e * e
        acc1 += p1
        acc2 += p2
        if pair:
            acc1 += q1
            acc2 += q2
        o += _U(2)
    s1[c] = acc1
    s2[c] = acc2
    shift[c] = s


ROWS = True  # False in the planes-only copy (see jit.planes_only)


@borrowing
def moments_task(plan, t, x, s1, s2, shift):
    b, lo, hi, c0, c1 = task(plan, t)
    C = _U(plan[CHANNELS])
    if ROWS and plan[INNER] == 1:
        _moments_rows(x, C, lo, hi, c0, c1, s1[b], s2[b], shift[b])
    else:
        _moments_planes(x, C, _U(plan[INNER]), lo, hi, c0, s1[b], s2[b], shift[b])


moments_task_planes = planes_only(borrowing, moments_task)


def _moments(plan, x, s1, s2, shift):
    for t in numba.prange(plan[NTASKS]):
        moments_task(plan, np.int64(t), x, s1, s2, shift)


MOMENTS = drivers(_moments)


@exact_borrowing
def _m2_of_block(s1, s2, d):
    """A block's sum of squared deviations from its mean, ``s2 - s1 * d`` with ``d = s1 /
    n``, as one fused multiply-add: the product is not rounded first, so squared
    deviations beyond float64's range (an inf ``s2``) give inf, not ``inf - inf``."""
    return fmuladd(-s1, d, s2)


@exact_borrowing
def merge_channel(s1, s2, shift, counts, c):
    """Chan's merge of channel ``c``'s per-block shifted sums, in block order ->
    ``(mean, m2)``. Block ``b`` holds ``counts[b]`` values with ``s1 = sum(x - shift)``
    and ``s2 = sum((x - shift)**2)``."""
    n = 0.0
    mu = 0.0
    m2 = 0.0
    for blk in range(s1.shape[0]):
        nb = counts[blk]
        d = s1[blk, c] / nb
        mu_b = shift[blk, c] + d
        m2_b = _m2_of_block(s1[blk, c], s2[blk, c], d)
        if blk == 0:
            mu = mu_b
            m2 = m2_b
            n = nb
        else:
            tot = n + nb
            delta = mu_b - mu
            mu += delta * (nb / tot)
            m2 += m2_b + delta * delta * (n * nb / tot)
            n = tot
    # m2 may round to a tiny negative for a (nearly) constant channel; keep NaN.
    return mu, (m2 if m2 > 0.0 or m2 != m2 else 0.0)


@exact_borrowing
def merge_moments(s1, s2, shift, counts, mean, m2):
    """Chan's merge of every channel's per-block shifted sums, in block order (the formula
    of ``merge_channel``), with the blocks outermost so that the loop over channels
    vectorizes: per-block weights are shared by all channels."""
    nblocks, C = s1.shape
    n = counts[0]
    for c in range(_U(C)):
        d = s1[0, c] / n
        mean[c] = shift[0, c] + d
        m2[c] = _m2_of_block(s1[0, c], s2[0, c], d)
    for blk in range(1, nblocks):
        nb = counts[blk]
        tot = n + nb
        w_mean = nb / tot
        w_m2 = n * nb / tot
        for c in range(_U(C)):
            d = s1[blk, c] / nb
            delta = (shift[blk, c] + d) - mean[c]
            mean[c] += delta * w_mean
            m2[c] += _m2_of_block(s1[blk, c], s2[blk, c], d) + delta * delta * w_m2
        n = tot
    for c in range(_U(C)):
        # m2 may round to a tiny negative for a (nearly) constant channel; keep NaN.
        m2[c] = m2[c] if m2[c] > 0.0 or m2[c] != m2[c] else 0.0


@exact_borrowing
def fold_moments(col_mean, col_m2, n_col, fold, mean, m2):
    """Channel ``c``'s ``mean`` and ``m2`` from those of its ``fold`` columns ``c * fold``
    to ``c * fold + fold - 1`` of a folded plan (tiny planes seen as rows, see
    ``fastbn._plan.TINY_PLANE_BYTES``), each of ``n_col`` values: Chan's merge in column
    order (the formula of ``merge_channel``), the columns outermost so that the loop over
    channels vectorizes (the weights are the same for every channel)."""
    f = _U(fold)
    C = _U(mean.shape[0])
    for c in range(C):
        mean[c] = col_mean[c * f]
        m2[c] = col_m2[c * f]
    n = n_col
    for e in range(_U(1), f):
        tot = n + n_col
        w_mean = n_col / tot
        w_m2 = n * n_col / tot
        for c in range(C):
            delta = col_mean[c * f + e] - mean[c]
            mean[c] += delta * w_mean
            m2[c] += col_m2[c * f + e] + delta * delta * w_m2
        n = tot
    for c in range(C):
        m2[c] = m2[c] if m2[c] > 0.0 or m2[c] != m2[c] else 0.0


@exact
def any_negative(values):
    """True when some value of the 1-D array is below zero (NaN is not): the quick paths'
    check of a running variance in eval mode, one compiled loop where NumPy's reduction
    cost ~1.1 us at 100 channels (most of it the reduction's fixed cost)."""
    for i in range(_U(values.shape[0])):
        if values[i] < 0.0:
            return True
    return False


@exact_borrowing
def normalizer(var, gamma, eps, invstd, scale, c):
    """Channel ``c``'s ``invstd = 1 / sqrt(var + eps)`` and ``scale = invstd * gamma``."""
    invstd[c] = 1.0 / np.sqrt(var[c] + eps)
    scale[c] = invstd[c] * gamma[c]


@exact_borrowing
def normalizers(var, gamma, eps, invstd, scale):
    """``normalizer`` of every channel, in one loop that vectorizes (square roots and
    divisions are correctly rounded in vector code too: the same bits)."""
    for c in range(_U(var.shape[0])):
        invstd[c] = 1.0 / np.sqrt(var[c] + eps)
        scale[c] = invstd[c] * gamma[c]
