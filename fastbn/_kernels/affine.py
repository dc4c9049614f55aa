"""Elementwise pass: ``out = (x - m) * p + q``, or ``(dy - d) * g + (x - m) * p + q`` for
``dx``, in the storage dtype, with the per-channel coefficients of ``coefficients``.

``relu`` fuses a ReLU after batch norm (a runtime flag, so no further compilations):

- 0: as above;
- 1: forward ``out = max(0, (x - m) * p + q)`` (``np.maximum``: NaN stays NaN); for
  ``dx``, ``dy`` is first masked, ``dy * ((x - rm) * rp + rq > 0)``;
- 2 (``dx`` in eval mode): ``out = (masked dy - d) * g + q``, ``x`` read only for the mask
  (one plain loop per family, ordinary stores: not a path to tune, so little to compile).

``rm, rp, rq`` are rows ``W_MEAN, W_SCALE, W_OFFSET`` of ``fwork``, the coefficients of
the forward call: the mask is the forward's own arithmetic, so it equals ``y > 0``.

Rows family: a task is ``AFFINE_BLOCK`` whole rows (no per-column state), streamed from
start to end, or, for rows of ``FOUR_ROWS_FROM`` bytes and more, line by line across up
to four rows (two for ``dx``), so that a line's coefficients are read once per group.
Planes family: a task is ``AFFINE_BLOCK`` outer indices times ``AFFINE_CHANNELS``
channels, its planes written in memory order (channel by channel, short planes one every
``C * inner`` elements ran ~1.7x slower); in a fused plan a task is one channel
(``fused``).
With ``stream`` (outputs of at least ``fastbn._plan.STREAM_BYTES``) a task's whole
64-byte lines of ``out`` are written by streaming stores (``stream``), its unaligned head
and tail by ordinary loops; the coefficient arrays extend periodically past ``C`` so
that a line may cross a row's end. The helpers are inlined into the task: a call per
row or plane would increment and decrement the reference count of every array
argument, atomics that the threads contend on.
"""

import numba
import numpy as np

from . import stream as S
from .coefficients import row_group
from .jit import borrowing, drivers, inline, planes_only, relu_pair
from .layout import (
    AFFINE_BLOCK,
    AFFINE_CHANNELS,
    AFFINE_TASKS,
    CHANNELS,
    INNER,
    OUTER,
    W_MEAN,
    W_OFFSET,
    W_SCALE,
)
from .stream import LINE, fmuladd, masked, relu_max, store_fence

_U = np.uint64
RELU = False  # a constant per compiled copy of affine_task (see jit.relu_pair)
ROWS = True  # False in the planes-only copies (see jit.planes_only)


@inline
def _element(x, dy, m, p, q, g, d, rm, rp, rq, i, j, with_dy, mode):
    """Output ``i`` of channel ``j``, ``mode`` (``relu``) 0 or 1. ``fwork``'s rows ``rm,
    rp, rq`` are read only by the ReLU ``dx`` (they may be a stub otherwise)."""
    xv = x[i]
    if with_dy:
        dyv = dy[i]
        if mode:
            dyv = masked(fmuladd(xv - rm[j], rp[j], rq[j]), dyv)
        return fmuladd(dyv - d[j], g[j], fmuladd(xv - m[j], p[j], q[j]))
    value = fmuladd(xv - m[j], p[j], q[j])
    return relu_max(value) if mode else value


@inline
def _rows_plain(x, dy, out, m, p, q, g, d, rm, rp, rq, C, lo, hi, with_dy, mode):
    """Rows ``[lo, hi)`` with ordinary stores, ``coefficients.row_group`` rows at a time
    (one loop over the group's elements, the coefficient rows' spare columns repeating
    the channels), the last rows one by one; one loop per case, so that each vectorizes
    without the others' work."""
    group = _U(row_group(C, out.itemsize))
    r = lo
    while r < hi:
        rows = group if r + group <= hi else _U(1)
        width = rows * C
        i0 = r * C
        if with_dy and mode:
            for j in range(width):
                xv = x[i0 + j]
                dyv = masked(fmuladd(xv - rm[j], rp[j], rq[j]), dy[i0 + j])
                out[i0 + j] = fmuladd(dyv - d[j], g[j], fmuladd(xv - m[j], p[j], q[j]))
        elif with_dy:
            for j in range(width):
                xc = x[i0 + j] - m[j]
                out[i0 + j] = fmuladd(dy[i0 + j] - d[j], g[j], fmuladd(xc, p[j], q[j]))
        elif mode:
            for j in range(width):
                out[i0 + j] = relu_max(fmuladd(x[i0 + j] - m[j], p[j], q[j]))
        else:
            for j in range(width):
                out[i0 + j] = fmuladd(x[i0 + j] - m[j], p[j], q[j])
        r += rows


@inline
def _run(x, dy, out, m, p, q, g, d, rm, rp, rq, C, i0, n, j, step, with_dy, mode):
    """``n`` flat elements from ``i0`` whose first is channel ``j``, ordinary stores, the
    channel advancing by ``step`` per element (1: a run of rows; 0: within one plane).
    A streamed segment's head and tail (under a line each, in both families): one
    scalar loop, not a vectorized nest per case that these few elements never reach."""
    for e in range(n):
        out[i0 + e] = _element(x, dy, m, p, q, g, d, rm, rp, rq, i0 + e, j, with_dy, mode)
        j += step
        if j == C:
            j = _U(0)


@inline
def _plane_runs(x, dy, out, m, p, q, g, d, rm, rp, rq, c, first, count, stride, n, with_dy, mode):
    """``count`` runs of ``n`` elements of channel ``c``, the first at flat index ``first``
    and each ``stride`` after the one before, with ordinary stores; one loop nest per
    case with the channel's coefficients in scalars. Called once per task for whole
    planes (``count`` planes of ``inner``). (With a helper inlined per plane, the serial
    target of NCHW (32, 16, 8, 8) reference-counted every array argument per plane and ran
    ~10x slower.)"""
    mc, pc, qc, gc, dc = m[c], p[c], q[c], g[c], d[c]
    if with_dy and mode:
        rmc, rpc, rqc = rm[c], rp[c], rq[c]
        for o in range(count):
            i0 = first + o * stride
            for e in range(n):
                xv = x[i0 + e]
                dyv = masked(fmuladd(xv - rmc, rpc, rqc), dy[i0 + e])
                out[i0 + e] = fmuladd(dyv - dc, gc, fmuladd(xv - mc, pc, qc))
    elif with_dy:
        for o in range(count):
            i0 = first + o * stride
            for e in range(n):
                xc = x[i0 + e] - mc
                out[i0 + e] = fmuladd(dy[i0 + e] - dc, gc, fmuladd(xc, pc, qc))
    elif mode:
        for o in range(count):
            i0 = first + o * stride
            for e in range(n):
                out[i0 + e] = relu_max(fmuladd(x[i0 + e] - mc, pc, qc))
    else:
        for o in range(count):
            i0 = first + o * stride
            for e in range(n):
                out[i0 + e] = fmuladd(x[i0 + e] - mc, pc, qc)


@inline
def _line(out, x, dy, m, p, q, g, d, rm, rp, rq, i0, j, rows, with_dy, mode):
    """One streamed 64-byte line: the intrinsic of the family and case."""
    if rows:
        if with_dy and mode:
            S.line_rows_relu_dy(out, x, dy, m, p, q, g, d, rm, rp, rq, i0, j)
        elif with_dy:
            S.line_rows_dy(out, x, dy, m, p, q, g, d, rm, rp, rq, i0, j)
        elif mode:
            S.line_rows_relu(out, x, dy, m, p, q, g, d, rm, rp, rq, i0, j)
        else:
            S.line_rows(out, x, dy, m, p, q, g, d, rm, rp, rq, i0, j)
    elif with_dy and mode:
        S.line_planes_relu_dy(out, x, dy, m, p, q, g, d, rm, rp, rq, i0, j)
    elif with_dy:
        S.line_planes_dy(out, x, dy, m, p, q, g, d, rm, rp, rq, i0, j)
    elif mode:
        S.line_planes_relu(out, x, dy, m, p, q, g, d, rm, rp, rq, i0, j)
    else:
        S.line_planes(out, x, dy, m, p, q, g, d, rm, rp, rq, i0, j)


@inline
def _lines(x, dy, out, m, p, q, g, d, rm, rp, rq, C, k, nlines, j, rows, with_dy, mode):
    """``nlines`` whole 64-byte lines from flat index ``k`` (channel ``j`` first), streamed."""
    line = _U(LINE)
    for L in range(nlines):
        i0 = k + L * line
        _line(out, x, dy, m, p, q, g, d, rm, rp, rq, i0, j, rows, with_dy, mode)
        if rows:
            j += line
            while j >= C:
                j -= C


@borrowing
def _eval_relu_dx(plan, x, dy, out, q, g, d, rm, rp, rq, lo, hi, c_lo, c_hi):
    """``relu == 2``: ``out = (dy * (pre > 0) - d) * g + q`` over rows ``[lo, hi)`` or
    over the planes of channels ``[c_lo, c_hi)`` of outer indices ``[lo, hi)``."""
    C = _U(plan[CHANNELS])
    inner = _U(plan[INNER])
    if inner == 1:
        for r in range(lo, hi):
            i0 = r * C
            for j in range(C):
                dyv = masked(fmuladd(x[i0 + j] - rm[j], rp[j], rq[j]), dy[i0 + j])
                out[i0 + j] = fmuladd(dyv - d[j], g[j], q[j])
        return
    for o in range(lo, hi):
        for c in range(c_lo, c_hi):
            qc, gc, dc, rmc, rpc, rqc = q[c], g[c], d[c], rm[c], rp[c], rq[c]
            i0 = (o * C + c) * inner
            for e in range(inner):
                dyv = masked(fmuladd(x[i0 + e] - rmc, rpc, rqc), dy[i0 + e])
                out[i0 + e] = fmuladd(dyv - dc, gc, qc)


# Streamed rows of at least FOUR_ROWS_FROM bytes, a whole number of lines each, are
# written four rows at a time (two for dx), line by line: line j of rows r, r + 1, ...,
# then line j + 1. The coefficients of a line are read once per four rows instead of once
# per row: a row's coefficients (three rows of ``work``, five for ``dx``) outgrow L1 with
# the row, and the row-by-row pass slowed with the width (parallel, float32, probe units,
# forward / dx: 256 columns 0.78 / 1.28, 1024 0.93 / 1.69, 4096 1.13 / 1.77, 16384 1.14 /
# 1.81). Interleaved in one process, row by row -> across rows (2026-12-03): float32 2048
# columns 1.08-1.14 -> 0.90-0.91 / 1.81-1.83 -> 1.79, 4096 1.25 -> 0.77-0.79 / 1.92 ->
# 1.64, 16384 1.20-1.25 -> 0.84-0.85 / 1.86 -> 1.54 (four rows for dx: 1.70); float64
# 2048 1.16 -> 0.88 / 1.83 -> 1.66, 8192 1.10 -> 0.87 / 1.96 -> 1.63, 1024 (8 KiB) even.
# Short rows lose (one thread, 256 float32 columns, four rows: 0.91 -> 1.83 units: four
# streams within a page, which the prefetcher follows badly).
FOUR_ROWS_FROM = 8192


@inline
def _four_rows(C, size, addr):
    """Whether a streamed rows task is written across rows (``_interleaved_rows``): rows
    of at least ``FOUR_ROWS_FROM`` bytes, a whole number of lines each (every row then
    starts at the same offset within a line)."""
    row = C * size
    return row >= _U(FOUR_ROWS_FROM) and row % _U(64) == _U(0) and addr % size == _U(0)


@inline
def _interleaved_rows(x, dy, out, m, p, q, g, d, rm, rp, rq, C, lo, hi, addr, with_dy, mode):
    """Rows ``[lo, hi)`` (``_four_rows``), up to four at a time (two for ``dx``): each
    row's elements before its first 64-byte boundary and after its last whole line with
    ordinary stores, its lines streamed line by line across the rows."""
    line = _U(LINE)
    size = _U(out.itemsize)
    head = min(C, ((_U(64) - addr % _U(64)) % _U(64)) // size)
    nlines = (C - head) // line
    tail = head + nlines * line
    r = lo
    per = _U(2) if with_dy else _U(4)
    while r < hi:
        k = min(per, hi - r)
        for t in range(k * _U(2)):  # heads and tails (one inlined copy of the loop)
            i0 = (r + t // _U(2)) * C
            first, n = (_U(0), head) if t % _U(2) == _U(0) else (tail, C - tail)
            _run(x, dy, out, m, p, q, g, d, rm, rp, rq, C, i0 + first, n, first, _U(1),
                 with_dy, mode)  # fmt: skip
        for L in range(nlines):
            j = head + L * line
            for t in range(k):
                i0 = (r + t) * C + j
                _line(out, x, dy, m, p, q, g, d, rm, rp, rq, i0, j, True, with_dy, mode)
        r += k


@inline
def _split(addr, size, k, seglen, stream):
    """``(head, nlines)``: the elements before the first 64-byte boundary of segment ``k``
    of ``seglen`` elements, and its whole lines after that (0 lines: nothing streamed)."""
    line = _U(LINE)
    if stream and seglen >= _U(4) * line and (addr + k * size) % size == 0:
        head = min(seglen, ((_U(64) - (addr + k * size) % _U(64)) % _U(64)) // size)
        return head, (seglen - head) // line
    return seglen, _U(0)


def _affine_task(plan, t, x, dy, out, m, p, q, g, d, with_dy, stream, fwork, relu):
    """Write task ``t``'s outputs with the coefficients ``m, p, q, g, d`` (the rows of
    ``coefficients.working``); ``relu`` and ``fwork`` (the forward's ``work``, read only
    when ``relu`` and ``with_dy``): see the module docstring. ``relu`` is read in the
    ``affine_task_relu`` copy only; ``affine_task`` compiles no ReLU loop."""
    mode = relu if RELU else 0
    C = _U(plan[CHANNELS])
    rows = plan[INNER] == 1 if ROWS else False
    rm, rp, rq = fwork[W_MEAN], fwork[W_SCALE], fwork[W_OFFSET]
    lo, hi, c_lo, c_hi = _affine_range(plan, t)
    if mode == 2:
        _eval_relu_dx(plan, x, dy, out, q, g, d, rm, rp, rq, lo, hi, c_lo, c_hi)
        return
    if not stream:  # ordinary stores only: plain loops (see _plane_runs)
        if rows:
            _rows_plain(x, dy, out, m, p, q, g, d, rm, rp, rq, C, lo, hi, with_dy, mode)
        else:
            inner = _U(plan[INNER])
            # one channel (a fused task): its planes in one run; several: each plane in
            # memory order (one call site: one inlined copy of the loops)
            one = c_hi - c_lo == _U(1)
            steps, count = (_U(1), hi - lo) if one else (hi - lo, _U(1))
            for step in range(steps):
                for c in range(c_lo, c_hi):
                    first = ((lo + step) * C + c) * inner
                    _plane_runs(
                        x, dy, out, m, p, q, g, d, rm, rp, rq, c, first, count, C * inner, inner,
                        with_dy, mode,
                    )  # fmt: skip
        return
    size = _U(out.itemsize)
    addr = _U(out.ctypes.data)
    if rows and _four_rows(C, size, addr):
        _interleaved_rows(x, dy, out, m, p, q, g, d, rm, rp, rq, C, lo, hi, addr, with_dy, mode)
        store_fence()
        return
    # segments: one flat run of rows, or the task's planes in memory order
    nc = c_hi - c_lo
    nseg = _U(1) if rows else (hi - lo) * nc
    seglen = (hi - lo) * C if rows else _U(plan[INNER])
    streamed = False
    for s in range(nseg):
        c = _U(0) if rows else c_lo + s % nc
        k = lo * C if rows else ((lo + s // nc) * C + c) * _U(plan[INNER])
        head, nlines = _split(addr, size, k, seglen, stream)
        tail = head + nlines * _U(LINE)
        for part in range(2):  # the head, then the tail (one inlined copy of the loops)
            i0 = k if part == 0 else k + tail
            n = head if part == 0 else seglen - tail
            j0 = (_U(0) if part == 0 else tail % C) if rows else c
            step = _U(1) if rows else _U(0)
            _run(x, dy, out, m, p, q, g, d, rm, rp, rq, C, i0, n, j0, step, with_dy, mode)
        j = head % C if rows else c
        _lines(x, dy, out, m, p, q, g, d, rm, rp, rq, C, k + head, nlines, j, rows, with_dy, mode)
        streamed = streamed or nlines > _U(0)
    if streamed:
        store_fence()


@inline
def _affine_range(plan, t):
    """Task ``t``'s outer indices ``[lo, hi)`` and channels ``[c_lo, c_hi)`` (unsigned):
    ``AFFINE_BLOCK`` outer indices times ``AFFINE_CHANNELS`` channels (all of them for
    rows)."""
    per_task = plan[AFFINE_CHANNELS]
    chunks = max(1, (plan[CHANNELS] + per_task - 1) // per_task)  # 1 when C == 0
    b = t // chunks
    k = t - b * chunks
    lo = b * plan[AFFINE_BLOCK]
    hi = min(plan[OUTER], lo + plan[AFFINE_BLOCK])
    c_lo = k * per_task
    c_hi = min(plan[CHANNELS], c_lo + per_task)
    return _U(lo), _U(hi), _U(c_lo), _U(c_hi)


affine_task, affine_task_relu = relu_pair(borrowing, _affine_task)
affine_task_planes = planes_only(borrowing, affine_task)
affine_task_relu_planes = planes_only(borrowing, affine_task_relu)


def _affine(plan, x, dy, out, m, p, q, g, d, with_dy, stream, fwork, relu):
    for t in numba.prange(plan[AFFINE_TASKS]):
        affine_task(plan, np.int64(t), x, dy, out, m, p, q, g, d, with_dy, stream, fwork, relu)


AFFINE = drivers(_affine, affine_task=affine_task_relu)
