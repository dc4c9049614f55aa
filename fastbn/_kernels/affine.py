"""Elementwise pass: ``out = (x - m) * p + q``, or ``(dy - d) * g + (x - m) * p + q`` for
``dx``, in the storage dtype, with the per-channel coefficients of ``coefficients``.

Rows family: a task is ``AFFINE_BLOCK`` whole rows (no per-column state), so a wide row
streams from start to end. Planes family: a task is a reduction task's block of planes.
With ``stream`` (outputs of at least ``fastbn._plan.STREAM_BYTES``) a task's whole
64-byte lines of ``out`` are written by streaming stores (``stream``), its unaligned head
and tail by ordinary loops; the coefficient arrays extend periodically past ``C`` so
that a line may cross a row's end. The helpers are inlined into the task: a call per
row or plane would increment and decrement the reference count of every array
argument, atomics that the threads contend on.
"""

import numba
import numpy as np

from .jit import drivers, inline, jit
from .layout import AFFINE_BLOCK, AFFINE_TASKS, CHANNELS, INNER, OUTER
from .partition import task
from .stream import LINE, fmuladd, line_planes, line_planes_dy, line_rows, line_rows_dy, store_fence

_U = np.uint64


@inline
def _rows_plain(x, dy, out, m, p, q, g, d, C, lo, hi, with_dy):
    """Rows ``[lo, hi)`` with ordinary stores, row by row."""
    for r in range(lo, hi):
        i0 = r * C
        if with_dy:
            for j in range(C):
                xc = x[i0 + j] - m[j]
                out[i0 + j] = fmuladd(dy[i0 + j] - d[j], g[j], fmuladd(xc, p[j], q[j]))
        else:
            for j in range(C):
                out[i0 + j] = fmuladd(x[i0 + j] - m[j], p[j], q[j])


@inline
def _run_rows(x, dy, out, m, p, q, g, d, C, i0, n, j, with_dy):
    """``n`` flat elements from ``i0`` whose first is channel ``j``, ordinary stores."""
    for e in range(n):
        xc = x[i0 + e] - m[j]
        if with_dy:
            gc = dy[i0 + e] - d[j]
            out[i0 + e] = fmuladd(gc, g[j], fmuladd(xc, p[j], q[j]))
        else:
            out[i0 + e] = fmuladd(xc, p[j], q[j])
        j += _U(1)
        if j == C:
            j = _U(0)


@inline
def _run_plane(x, dy, out, m, p, q, g, d, c, i0, n, with_dy):
    """``n`` elements from ``i0`` of one plane of channel ``c``, ordinary stores."""
    mc, pc, qc, gc, dc = m[c], p[c], q[c], g[c], d[c]
    if with_dy:
        for e in range(n):
            xc = x[i0 + e] - mc
            out[i0 + e] = fmuladd(dy[i0 + e] - dc, gc, fmuladd(xc, pc, qc))
    else:
        for e in range(n):
            out[i0 + e] = fmuladd(x[i0 + e] - mc, pc, qc)


@inline
def _lines(x, dy, out, m, p, q, g, d, C, k, nlines, j, rows, with_dy):
    """``nlines`` whole 64-byte lines from flat index ``k`` (channel ``j`` first), streamed."""
    line = _U(LINE)
    for L in range(nlines):
        i0 = k + L * line
        if rows:
            if with_dy:
                line_rows_dy(out, x, dy, m, p, q, g, d, i0, j)
            else:
                line_rows(out, x, dy, m, p, q, g, d, i0, j)
            j += line
            while j >= C:
                j -= C
        elif with_dy:
            line_planes_dy(out, x, dy, m, p, q, g, d, i0, j)
        else:
            line_planes(out, x, dy, m, p, q, g, d, i0, j)


@inline
def _split(addr, size, k, seglen, stream):
    """``(head, nlines)``: the elements before the first 64-byte boundary of segment ``k``
    of ``seglen`` elements, and its whole lines after that (0 lines: nothing streamed)."""
    line = _U(LINE)
    if stream and seglen >= _U(4) * line and (addr + k * size) % size == 0:
        head = min(seglen, ((_U(64) - (addr + k * size) % _U(64)) % _U(64)) // size)
        return head, (seglen - head) // line
    return seglen, _U(0)


@jit
def affine_task(plan, t, x, dy, out, m, p, q, g, d, with_dy, stream):
    """Write task ``t``'s outputs with the coefficients ``m, p, q, g, d`` (the rows of
    ``coefficients.working``)."""
    C = _U(plan[CHANNELS])
    rows = plan[INNER] == 1
    if rows:  # whole rows (see AFFINE_BLOCK)
        lo = _U(t * plan[AFFINE_BLOCK])
        hi = _U(min(plan[OUTER], (t + 1) * plan[AFFINE_BLOCK]))
        c0 = _U(0)
    else:
        _, lo, hi, c0, _ = task(plan, t)
    if rows and not stream:
        _rows_plain(x, dy, out, m, p, q, g, d, C, lo, hi, with_dy)
        return
    # segments: one flat run of rows, or one plane per outer index
    nseg = _U(1) if rows else hi - lo
    seglen = (hi - lo) * C if rows else _U(plan[INNER])
    size = _U(out.itemsize)
    addr = _U(out.ctypes.data)
    streamed = False
    for s in range(nseg):
        k = lo * C if rows else ((lo + s) * C + c0) * _U(plan[INNER])
        head, nlines = _split(addr, size, k, seglen, stream)
        tail = head + nlines * _U(LINE)
        if rows:
            _run_rows(x, dy, out, m, p, q, g, d, C, k, head, _U(0), with_dy)
            _run_rows(x, dy, out, m, p, q, g, d, C, k + tail, seglen - tail, tail % C, with_dy)
        else:
            _run_plane(x, dy, out, m, p, q, g, d, c0, k, head, with_dy)
            _run_plane(x, dy, out, m, p, q, g, d, c0, k + tail, seglen - tail, with_dy)
        j = head % C if rows else c0
        _lines(x, dy, out, m, p, q, g, d, C, k + head, nlines, j, rows, with_dy)
        streamed = streamed or nlines > _U(0)
    if streamed:
        store_fence()


def _affine(plan, *args):
    for t in numba.prange(plan[AFFINE_TASKS]):
        affine_task(plan, t, *args)


affine_serial, affine_parallel = drivers(_affine)
