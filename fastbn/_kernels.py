"""Numba kernels over the canonical ``(outer, C, inner)`` view of batch norm.

Every data array here is a flat, C-contiguous 1-D array; ``plan`` (an int64 array
made by ``fastbn._launch.Plan``) describes its canonical 3-D shape and how the work
is cut into tasks. Two families of loops cover every layout:

* rows (``inner == 1``): each row holds C contiguous channel values; loops run
  along a row (vectorized over channels) for a block of rows and a chunk of columns
  (one row per sweep, or four where the prefetcher allows: ``_four_row_sweeps``);
* planes (``inner > 1``): each ``(o, c)`` plane of ``inner`` values is contiguous;
  loops run along the plane for a block of ``outer`` indices of one channel.

A task is block ``b`` of rows/outer indices times split ``k`` of columns/channels.
The cut depends on the shape only, each task writes its own partial sums, and the
partials are merged in block order, so results are bitwise identical on 1 thread
or many. Three passes exist:

``moments``   per block and channel, shifted sums ``s1 = sum(x - s)``,
              ``s2 = sum((x - s)**2)`` with ``s`` the block's first value (no
              cancellation at large offsets), merged with Chan's formula;
``gradsums``  per channel ``sum(dy)`` and ``sum(dy * (x - mean))``;
``affine``    ``out = (x - m) * p + q``, or ``dy * g + (x - m) * p + q`` for ``dx``,
              with per-channel ``m, p, q, g`` computed in float64 and stored in the
              data's dtype by ``_working`` (the mean split exactly, see there); its
              tasks are whole rows in the rows family; outputs of at least
              ``fastbn._launch.STREAM_BYTES`` are written with streaming stores
              (``fastbn._stream``).

Sums and statistics are float64 whatever the storage dtype; the elementwise pass
computes in the storage dtype (float32 or float64: one generic source, compiled
lazily per dtype). Indices are unsigned so that Numba
emits no negative-index wraparound, which would defeat vectorization. Each pass
has a serial and a ``parallel=True`` driver that are distinct functions, because
Numba's on-disk cache does not key on ``parallel=``.
"""

import numba
import numpy as np

from ._stream import (
    LINE,
    fmuladd,
    line_planes,
    line_planes_dy,
    line_rows,
    line_rows_dy,
    store_fence,
)

# Never nnan/ninf: NaN and inf must propagate through every channel they touch.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

_jit = numba.njit(fastmath=FASTMATH, cache=True, nogil=True, error_model="numpy")
# small per-channel helpers, inlined into their callers' Numba IR: no call, no reference
# counting of the array arguments per channel
_inline = numba.njit(
    fastmath=FASTMATH, cache=True, nogil=True, error_model="numpy", inline="always"
)
_pjit = numba.njit(fastmath=FASTMATH, cache=True, nogil=True, error_model="numpy", parallel=True)

_U = np.uint64

# Layout of the ``plan`` array.
(
    OUTER,
    CHANNELS,
    INNER,
    BLOCK_LEN,
    NBLOCKS,
    NSPLIT,
    SPLIT_WIDTH,
    NTASKS,
    PARALLEL,
    FUSED,
    AFFINE_BLOCK,
    AFFINE_TASKS,
) = range(12)


@_jit
def _task(plan, t):
    """Block index and unsigned ranges ``[lo, hi)`` (rows/outer), ``[c0, c1)`` (channels)."""
    nsplit = plan[NSPLIT]
    block_len = plan[BLOCK_LEN]
    b = t // nsplit
    k = t - b * nsplit
    width = plan[SPLIT_WIDTH]
    lo = _U(b * block_len)
    hi = _U(min(plan[OUTER], (b + 1) * block_len))
    c0 = _U(k * width)
    c1 = _U(min(plan[CHANNELS], (k + 1) * width))
    return b, lo, hi, c0, c1


# -- statistics -----------------------------------------------------------------------------


@_jit
def _four_row_sweeps(C, itemsize, small_rows):
    """Whether the per-column reductions of the rows family sweep four rows at a time
    (the accumulators are loaded and stored once per four rows) or one.

    Four rows read at once are four streams within a page when a row is between 512 B
    and 4 KiB, which the hardware prefetcher follows badly: on the 2-core EPYC VM this
    made the statistics pass 1.0-1.5x and the gradient-sum pass 1.2-1.9x slower than
    one row at a time at 512 B - 2 KiB rows. Rows of a page or more (each row its own
    stream) and, for ``small_rows``, rows of at most 256 B (four rows within 1 KiB) do
    better four at a time.
    """
    row_bytes = C * _U(itemsize)
    return row_bytes >= _U(4096) or (small_rows and row_bytes <= _U(256))


@_jit
def _moments_rows(x, C, r0, r1, c0, c1, s1, s2, shift):
    w = c1 - c0
    first = r0 * C + c0
    s = np.empty(w)
    for j in range(w):
        s[j] = x[first + j]
    acc1 = np.zeros(w)
    acc2 = np.zeros(w)
    r = r0
    four = _four_row_sweeps(C, x.itemsize, True)
    while four and r + _U(4) <= r1:
        i0 = r * C + c0
        i1 = i0 + C
        i2 = i1 + C
        i3 = i2 + C
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
    for j in range(w):
        s1[c0 + j] = acc1[j]
        s2[c0 + j] = acc2[j]
        shift[c0 + j] = s[j]


@_jit
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


@_jit
def _moments_task(plan, t, x, s1, s2, shift):
    b, lo, hi, c0, c1 = _task(plan, t)
    C = _U(plan[CHANNELS])
    if plan[INNER] == 1:
        _moments_rows(x, C, lo, hi, c0, c1, s1[b], s2[b], shift[b])
    else:
        _moments_planes(x, C, _U(plan[INNER]), lo, hi, c0, s1[b], s2[b], shift[b])


@_jit
def moments_serial(plan, x, s1, s2, shift):
    for t in range(plan[NTASKS]):
        _moments_task(plan, t, x, s1, s2, shift)


@_pjit
def moments_parallel(plan, x, s1, s2, shift):
    for t in numba.prange(plan[NTASKS]):
        _moments_task(plan, t, x, s1, s2, shift)


@_jit
def _merge_channel(s1, s2, shift, counts, c):
    """Chan's merge of channel ``c``'s per-block shifted sums, in block order ->
    ``(mean, biased var)``. Block ``b`` holds ``counts[b]`` values with
    ``s1 = sum(x - shift)`` and ``s2 = sum((x - shift)**2)``."""
    n = 0.0
    mu = 0.0
    m2 = 0.0
    for blk in range(s1.shape[0]):
        nb = counts[blk]
        d = s1[blk, c] / nb
        mu_b = shift[blk, c] + d
        m2_b = s2[blk, c] - s1[blk, c] * d
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
    return mu, (m2 if m2 > 0.0 or m2 != m2 else 0.0) / n


@_jit
def merge_moments(s1, s2, shift, counts, mean, var):
    """Chan's merge of every channel's per-block shifted sums, in block order (the same
    formula as ``_merge_channel``), with the blocks outermost so that the loop over
    channels vectorizes: per-block weights are shared by all channels."""
    nblocks, C = s1.shape
    m2 = np.empty(C)
    n = counts[0]
    for c in range(C):
        d = s1[0, c] / n
        mean[c] = shift[0, c] + d
        m2[c] = s2[0, c] - s1[0, c] * d
    for blk in range(1, nblocks):
        nb = counts[blk]
        tot = n + nb
        w_mean = nb / tot
        w_m2 = n * nb / tot
        for c in range(C):
            d = s1[blk, c] / nb
            delta = (shift[blk, c] + d) - mean[c]
            mean[c] += delta * w_mean
            m2[c] += (s2[blk, c] - s1[blk, c] * d) + delta * delta * w_m2
        n = tot
    for c in range(C):
        # m2 may round to a tiny negative for a (nearly) constant channel; keep NaN.
        var[c] = (m2[c] if m2[c] > 0.0 or m2[c] != m2[c] else 0.0) / n


# -- gradient sums -------------------------------------------------------------------------


@_jit
def _gradsums_rows(dy, x, C, r0, r1, c0, c1, mean, s1, s2):
    w = c1 - c0
    m = mean[c0:c1]
    acc1 = np.zeros(w)
    acc2 = np.zeros(w)
    r = r0
    four = _four_row_sweeps(C, x.itemsize, False)
    while four and r + _U(4) <= r1:
        i0 = r * C + c0
        i1 = i0 + C
        i2 = i1 + C
        i3 = i2 + C
        for j in range(w):
            g0 = dy[i0 + j]
            g1 = dy[i1 + j]
            g2 = dy[i2 + j]
            g3 = dy[i3 + j]
            acc1[j] += (g0 + g1) + (g2 + g3)
            acc2[j] += (g0 * (x[i0 + j] - m[j]) + g1 * (x[i1 + j] - m[j])) + (
                g2 * (x[i2 + j] - m[j]) + g3 * (x[i3 + j] - m[j])
            )
        r += _U(4)
    while r < r1:
        i0 = r * C + c0
        for j in range(w):
            g0 = dy[i0 + j]
            acc1[j] += g0
            acc2[j] += g0 * (x[i0 + j] - m[j])
        r += _U(1)
    for j in range(w):
        s1[c0 + j] = acc1[j]
        s2[c0 + j] = acc2[j]


@_jit
def _gradsums_planes(dy, x, C, inner, o0, o1, c, mean, s1, s2):
    """Two planes at a time, as ``_moments_planes``."""
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


@_jit
def _gradsums_task(plan, t, dy, x, mean, s1, s2):
    b, lo, hi, c0, c1 = _task(plan, t)
    C = _U(plan[CHANNELS])
    if plan[INNER] == 1:
        _gradsums_rows(dy, x, C, lo, hi, c0, c1, mean, s1[b], s2[b])
    else:
        _gradsums_planes(dy, x, C, _U(plan[INNER]), lo, hi, c0, mean, s1[b], s2[b])


@_jit
def gradsums_serial(plan, dy, x, mean, s1, s2):
    for t in range(plan[NTASKS]):
        _gradsums_task(plan, t, dy, x, mean, s1, s2)


@_pjit
def gradsums_parallel(plan, dy, x, mean, s1, s2):
    for t in numba.prange(plan[NTASKS]):
        _gradsums_task(plan, t, dy, x, mean, s1, s2)


@_jit
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


# -- elementwise: y or dx ------------------------------------------------------------------

_FLOAT32_MAX = 3.4028234663852886e38


@_inline
def _narrow(work, i, c, value):
    """``work[i, c] = value`` in ``work``'s dtype. True when a finite value does not fit
    (float32 beyond 3.4e38); it is then clamped to the largest float32, and the caller
    must redo the pass in float64 (``fastbn._launch``)."""
    work[i, c] = value
    if np.isinf(work[i, c]) and np.isfinite(value):
        work[i, c] = np.copysign(_FLOAT32_MAX, value)
        return True
    return False


@_inline
def _working_channel(m, p, q, g, d, c, work):
    """Channel ``c``'s coefficients of ``(x - m) * p + q`` (plus ``dy * g``), float64, as
    ``work[0:5, c]`` in the storage dtype, for the elementwise loops, which compute
    ``(x - m') * p' + q'`` (plus ``(dy - d') * g'``) in that dtype; ``work[5, c]`` is 1
    when one of them does not fit the dtype, else 0.

    float64 storage: ``m, p, g, d`` as given. float32: ``m`` and ``d`` (for ``dx``, the
    mean of ``dy``; else 0) are rounded to float32 and the remainders move into the
    offset, ``q' = q + d' * g - (m - m') * p``. ``x - m'`` and ``dy - d'`` are then exact
    near the means (Sterbenz), so an offset common to a channel's data, or to its
    gradients, costs no digits, and each output is within about two units in the last
    place of the float64 formula rounded once.
    """
    clamped = _narrow(work, 0, c, m[c])
    clamped |= _narrow(work, 1, c, p[c])
    clamped |= _narrow(work, 3, c, g[c])
    clamped |= _narrow(work, 4, c, d)
    offset = _offset(m[c], work[0, c], p[c], q[c], g[c], work[4, c])
    clamped |= _narrow(work, 2, c, offset)
    work[5, c] = 1.0 if clamped else 0.0


@_inline
def _offset(m, m_w, p, q, g, d_w):
    """``q + (m_w - m) * p + d_w * g`` in float64, a term skipped when its first factor is
    0 (so an inf ``p`` or ``g`` makes no NaN). Fused multiply-adds, which no fastmath
    flag reorders: ``_working`` and ``_working_channel`` get the same bits."""
    m_w = np.float64(m_w)
    d_w = np.float64(d_w)
    offset = fmuladd(m_w - m, p, q) if m_w != m else q
    return fmuladd(d_w, g, offset) if d_w != 0.0 else offset


@_jit
def _new_work(out, C):
    """The ``(6, C + LINE)`` array of ``_working_channel`` in ``out``'s dtype."""
    return np.empty((6, C + LINE), out.dtype)


@_jit
def _any_clamped(work, C):
    for c in range(C):
        if work[5, c] != 0.0:
            return True
    return False


@_jit
def _working(out, m, p, q, g, dsum, n, center):
    """``_working_channel`` for every channel, in ``out``'s dtype, with ``d = dsum * (1 / n)``
    when ``center`` (``dx``: ``dsum`` is ``sum(dy)``), else 0, as a ``(6, C + LINE)``
    array whose columns repeat with period ``C`` (a streamed line of a row may run past
    the row's last channel into the next row's first).

    The same values as ``_working_channel``, computed by a loop without branches that
    vectorizes (``_working_channel`` per channel took ~40 ns, 0.13 probe units at
    C = 16384); only when some coefficient does not fit the dtype does it redo every
    channel with ``_working_channel``, which clamps and flags."""
    C = m.shape[0]
    work = _new_work(out, C)
    m_w, p_w, q_w, g_w, d_w, flag = work[0], work[1], work[2], work[3], work[4], work[5]
    inv_n = 1.0 / n
    unfit = 0
    for c in range(C):
        d = dsum[c] * inv_n if center else 0.0
        m_w[c] = m[c]
        p_w[c] = p[c]
        g_w[c] = g[c]
        d_w[c] = d
        offset = _offset(m[c], m_w[c], p[c], q[c], g[c], d_w[c])
        q_w[c] = offset
        flag[c] = 0.0
        unfit += (
            (np.isinf(m_w[c]) and np.isfinite(m[c]))
            + (np.isinf(p_w[c]) and np.isfinite(p[c]))
            + (np.isinf(g_w[c]) and np.isfinite(g[c]))
            + (np.isinf(d_w[c]) and np.isfinite(d))
            + (np.isinf(q_w[c]) and np.isfinite(offset))
        )
    if unfit:
        for c in range(C):
            _working_channel(m, p, q, g, dsum[c] * inv_n if center else 0.0, c, work)
    for c in range(C, C + LINE if C else C):
        for i in range(5):
            work[i, c] = work[i, c % C]
    return work


@_jit
def _affine_task(plan, t, x, dy, out, m, p, q, g, d, with_dy, stream):
    """Write this task's outputs with the coefficients ``m, p, q, g, d`` (made by
    ``_working``) and the arithmetic in the storage dtype.

    Rows: the task's whole rows, row by row; or, with ``stream``, as one flat segment
    whose whole 64-byte lines of ``out`` are written by streaming stores
    (``fastbn._stream``), the coefficient arrays being extended periodically past ``C`` so
    that a line may cross a row's end. Planes: plane by plane, each plane's lines streamed
    likewise. The unaligned head and tail of a streamed segment take the ordinary loops.
    All loops are inline: a call per row would increment and decrement the reference
    count of every array argument, atomics that the threads contend on.
    """
    C = _U(plan[CHANNELS])
    rows = plan[INNER] == 1
    if rows:  # whole rows (see AFFINE_BLOCK)
        lo = _U(t * plan[AFFINE_BLOCK])
        hi = _U(min(plan[OUTER], (t + 1) * plan[AFFINE_BLOCK]))
        c0 = _U(0)
    else:
        _, lo, hi, c0, _ = _task(plan, t)
    inner = _U(plan[INNER])
    line = _U(LINE)
    if rows and not stream:
        for r in range(lo, hi):
            i0 = r * C
            if with_dy:
                for j in range(C):
                    xc = x[i0 + j] - m[j]
                    out[i0 + j] = fmuladd(dy[i0 + j] - d[j], g[j], fmuladd(xc, p[j], q[j]))
            else:
                for j in range(C):
                    out[i0 + j] = fmuladd(x[i0 + j] - m[j], p[j], q[j])
        return
    # segments: one flat run of rows, or one plane per outer index
    nseg = _U(1) if rows else hi - lo
    seglen = (hi - lo) * C if rows else inner
    size = _U(out.itemsize)
    addr = _U(out.ctypes.data)
    streamed = False
    for s in range(nseg):
        k = lo * C if rows else ((lo + s) * C + c0) * inner
        head = seglen
        nlines = _U(0)
        if stream and seglen >= _U(4) * line and (addr + k * size) % size == 0:
            head = min(seglen, ((_U(64) - (addr + k * size) % _U(64)) % _U(64)) // size)
            nlines = (seglen - head) // line
        for part in range(2):  # the head, then the tail after the whole lines
            a = _U(0) if part == 0 else head + nlines * line
            n = (head if part == 0 else seglen) - a
            i0 = k + a
            if rows:
                j = _U(0) if part == 0 else (nlines * line + head) % C
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
            else:
                mc, pc, qc, gc, dc = m[c0], p[c0], q[c0], g[c0], d[c0]
                if with_dy:
                    for e in range(n):
                        xc = x[i0 + e] - mc
                        out[i0 + e] = fmuladd(dy[i0 + e] - dc, gc, fmuladd(xc, pc, qc))
                else:
                    for e in range(n):
                        out[i0 + e] = fmuladd(x[i0 + e] - mc, pc, qc)
        j = head % C if rows else c0
        for L in range(nlines):
            i0 = k + head + L * line
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
            streamed = True
    if streamed:
        store_fence()


@_jit
def affine_serial(plan, x, dy, out, m, p, q, g, d, with_dy, stream):
    for t in range(plan[AFFINE_TASKS]):
        _affine_task(plan, t, x, dy, out, m, p, q, g, d, with_dy, stream)


@_pjit
def affine_parallel(plan, x, dy, out, m, p, q, g, d, with_dy, stream):
    for t in numba.prange(plan[AFFINE_TASKS]):
        _affine_task(plan, t, x, dy, out, m, p, q, g, d, with_dy, stream)


# -- planes that fit in L2: one task per channel, read from memory once per pass ------------
#
# When a channel's planes fit in a core's L2 cache, a task that computes the channel's
# statistics and then writes its outputs re-reads x (and dy) from L2, not from memory.
# The plan then has one block (``FUSED``): task ``t`` is channel ``t``.


@_jit
def _fused_forward_task(
    plan, t, x, y, gamma, beta, eps, counts, s1, s2, shift, mean, var, invstd, scale, work, stream
):
    _moments_task(plan, t, x, s1, s2, shift)
    mean[t], var[t] = _merge_channel(s1, s2, shift, counts, t)
    invstd[t] = 1.0 / np.sqrt(var[t] + eps)
    scale[t] = invstd[t] * gamma[t]
    _working_channel(mean, scale, beta, scale, 0.0, t, work)
    _affine_task(plan, t, x, x, y, work[0], work[1], work[2], work[3], work[4], False, stream)


@_jit
def fused_forward_serial(
    plan, x, y, gamma, beta, eps, counts, s1, s2, shift, mean, var, invstd, scale, work, stream
):
    for t in range(plan[NTASKS]):
        _fused_forward_task(
            plan,
            t,
            x,
            y,
            gamma,
            beta,
            eps,
            counts,
            s1,
            s2,
            shift,
            mean,
            var,
            invstd,
            scale,
            work,
            stream,
        )


@_pjit
def fused_forward_parallel(
    plan, x, y, gamma, beta, eps, counts, s1, s2, shift, mean, var, invstd, scale, work, stream
):
    for t in numba.prange(plan[NTASKS]):
        _fused_forward_task(
            plan,
            t,
            x,
            y,
            gamma,
            beta,
            eps,
            counts,
            s1,
            s2,
            shift,
            mean,
            var,
            invstd,
            scale,
            work,
            stream,
        )


@_jit
def _grad_params(c, sum_dy, sum_dy_xc, invstd, gamma, n, training, dgamma, dbeta, g, p, q):
    """Channel ``c``'s ``dbeta``, ``dgamma`` and the coefficients of
    ``dx = dy * g + (x - mean) * p + q``."""
    dbeta[c] = sum_dy
    dgamma[c] = sum_dy_xc * invstd[c]
    g[c] = gamma[c] * invstd[c]
    if training:
        p[c] = -g[c] * invstd[c] * (dgamma[c] / n)
        q[c] = -g[c] * (dbeta[c] / n)
    else:
        p[c] = 0.0
        q[c] = 0.0


@_jit
def _dx_working(c, training, mean, g, p, q, d, work):
    """Channel ``c``'s ``_working_channel`` coefficients of ``dx``: training
    ``dy * g + (x - mean) * p + q`` centred on ``d``, the mean of ``dy``; eval ``dy * g``,
    written as ``(dy - 0) * g + 0`` (``q`` is 0 then) because x is not read (a NaN there
    must not leak into dx)."""
    if training:
        _working_channel(mean, p, q, g, d, c, work)
    else:
        _working_channel(q, g, q, g, 0.0, c, work)


@_jit
def _dx_task(plan, t, dy, x, dx, training, work, stream):
    w = (work[0], work[1], work[2], work[3], work[4])
    if training:
        _affine_task(plan, t, x, dy, dx, w[0], w[1], w[2], w[3], w[4], True, stream)
    else:
        _affine_task(plan, t, dy, dy, dx, w[0], w[1], w[2], w[3], w[4], False, stream)


@_jit
def _fused_backward_task(
    plan, t, dy, x, dx, mean, invstd, gamma, training, s1, s2, dgamma, dbeta, g, p, q, work, stream
):
    _gradsums_task(plan, t, dy, x, mean, s1, s2)
    n = float(plan[OUTER] * plan[INNER])
    _grad_params(t, s1[0, t], s2[0, t], invstd, gamma, n, training, dgamma, dbeta, g, p, q)
    _dx_working(t, training, mean, g, p, q, dbeta[t] * (1.0 / n), work)
    _dx_task(plan, t, dy, x, dx, training, work, stream)


@_jit
def fused_backward_serial(
    plan, dy, x, dx, mean, invstd, gamma, training, s1, s2, dgamma, dbeta, g, p, q, work, stream
):
    for t in range(plan[NTASKS]):
        _fused_backward_task(
            plan,
            t,
            dy,
            x,
            dx,
            mean,
            invstd,
            gamma,
            training,
            s1,
            s2,
            dgamma,
            dbeta,
            g,
            p,
            q,
            work,
            stream,
        )


@_pjit
def fused_backward_parallel(
    plan, dy, x, dx, mean, invstd, gamma, training, s1, s2, dgamma, dbeta, g, p, q, work, stream
):
    for t in numba.prange(plan[NTASKS]):
        _fused_backward_task(
            plan,
            t,
            dy,
            x,
            dx,
            mean,
            invstd,
            gamma,
            training,
            s1,
            s2,
            dgamma,
            dbeta,
            g,
            p,
            q,
            work,
            stream,
        )


# -- whole operations: one dispatch from Python per call -----------------------------------


@_jit
def _affine(plan, x, dy, out, m, p, q, g, dsum, n, with_dy, stream_bytes):
    """The elementwise pass with float64 coefficients ``m, p, q, g`` (``dy`` centred on
    ``dsum / n`` when ``with_dy``). Returns True when they do not fit the storage dtype
    (then ``out`` is not right: see ``_narrow``)."""
    stream = out.size * out.itemsize >= stream_bytes
    work = _working(out, m, p, q, g, dsum, n, with_dy)
    args = (plan, x, dy, out, work[0], work[1], work[2], work[3], work[4], with_dy, stream)
    if plan[PARALLEL]:
        affine_parallel(*args)
    else:
        affine_serial(*args)
    return _any_clamped(work, m.shape[0])


@_jit
def _blend(running, batch, momentum):
    """``(1 - momentum) * running + momentum * batch``. Reassociated (fastmath, also
    after inlining) as ``running + momentum * (batch - running)`` it would turn an inf
    running value into NaN, so that case keeps the exact formula's answer explicitly."""
    if np.isfinite(running):
        return (1.0 - momentum) * running + momentum * batch
    return running + momentum * batch  # inf stays inf unless batch brings a NaN / -inf


@_jit
def forward_train(
    plan,
    counts,
    x,
    y,
    gamma,
    beta,
    eps,
    mean,
    var,
    invstd,
    stream_bytes,
    running_mean,
    running_var,
    momentum,
    update_mean,
    update_var,
    var_ddof,
):
    """Batch statistics into ``mean``, ``var`` (biased), ``invstd``; then ``y``.

    A channel whose variance is NaN (it holds a NaN or an inf) gets a NaN mean too. The
    running statistics, when ``update_*``, become ``(1 - momentum) * running + momentum *
    batch`` (variance ``var * n / (n - var_ddof)``: 1.0 unbiased, 0.0 biased); a term
    whose factor is 0 is skipped, so ``momentum=1`` replaces an inf running value instead
    of making it NaN. Returns ``(finite, fits)``:
    False when some variance is not finite; False when the elementwise coefficients do
    not fit the storage dtype and ``y`` must be redone in float64 (see ``_narrow``).
    """
    shape = (plan[NBLOCKS], plan[CHANNELS])
    s1 = np.empty(shape)
    s2 = np.empty(shape)
    shift = np.empty(shape)
    fused = plan[FUSED] != 0
    if fused:  # statistics and y, channel by channel
        stream = y.size * y.itemsize >= stream_bytes
        scale = np.empty(plan[CHANNELS])
        work = _new_work(y, plan[CHANNELS])
        args = (plan, x, y, gamma, beta, eps, counts, s1, s2, shift, mean, var, invstd, scale, work)
        if plan[PARALLEL]:
            fused_forward_parallel(*args, stream)
        else:
            fused_forward_serial(*args, stream)
    else:
        if plan[PARALLEL]:
            moments_parallel(plan, x, s1, s2, shift)
        else:
            moments_serial(plan, x, s1, s2, shift)
        merge_moments(s1, s2, shift, counts, mean, var)
    finite = True
    n = float(plan[OUTER] * plan[INNER])
    for c in range(mean.shape[0]):
        if not np.isfinite(var[c]):
            finite = False
            if var[c] != var[c]:
                mean[c] = np.nan
        if update_mean and momentum != 0.0:
            if momentum == 1.0:
                running_mean[c] = mean[c]
            else:
                running_mean[c] = _blend(running_mean[c], mean[c], momentum)
        if update_var and momentum != 0.0:
            unbiased = var[c] * (n / (n - var_ddof))
            if momentum == 1.0:
                running_var[c] = unbiased
            else:
                running_var[c] = _blend(running_var[c], unbiased, momentum)
    if fused:
        fits = not _any_clamped(work, plan[CHANNELS])
    else:
        fits = forward_eval(plan, x, y, gamma, beta, eps, mean, var, invstd, stream_bytes)
    return finite, fits


@_jit
def forward_eval(plan, x, y, gamma, beta, eps, mean, var, invstd, stream_bytes):
    """``y = (x - mean) * invstd * gamma + beta`` with ``invstd = 1 / sqrt(var + eps)``.
    Returns False when ``y`` must be redone in float64 (see ``_narrow``)."""
    C = mean.shape[0]
    scale = np.empty(C)
    for c in range(C):
        invstd[c] = 1.0 / np.sqrt(var[c] + eps)
        scale[c] = invstd[c] * gamma[c]
    return not _affine(plan, x, x, y, mean, scale, beta, scale, mean, 1.0, False, stream_bytes)


@_jit
def backward(plan, dy, x, dx, mean, invstd, gamma, training, dgamma, dbeta, stream_bytes):
    """``dx``; per-channel ``dgamma = sum(dy * xhat)`` and ``dbeta = sum(dy)``. Returns False
    when ``dx`` must be redone in float64 (see ``_narrow``)."""
    C = plan[CHANNELS]
    shape = (plan[NBLOCKS], C)
    s1 = np.empty(shape)
    s2 = np.empty(shape)
    g = np.empty(C)
    p = np.empty(C)
    q = np.empty(C)
    stream = dx.size * dx.itemsize >= stream_bytes
    if plan[FUSED]:  # sums and dx, channel by channel
        work = _new_work(dx, C)
        args = (
            plan,
            dy,
            x,
            dx,
            mean,
            invstd,
            gamma,
            training,
            s1,
            s2,
            dgamma,
            dbeta,
            g,
            p,
            q,
            work,
        )
        if plan[PARALLEL]:
            fused_backward_parallel(*args, stream)
        else:
            fused_backward_serial(*args, stream)
        return not _any_clamped(work, C)
    if plan[PARALLEL]:
        gradsums_parallel(plan, dy, x, mean, s1, s2)
    else:
        gradsums_serial(plan, dy, x, mean, s1, s2)
    sum_dy = np.empty(C)
    sum_dy_xc = np.empty(C)
    merge_sums(s1, s2, sum_dy, sum_dy_xc)
    n = float(plan[OUTER] * plan[INNER])
    for c in range(C):
        _grad_params(c, sum_dy[c], sum_dy_xc[c], invstd, gamma, n, training, dgamma, dbeta, g, p, q)
    if training:
        return not _affine(plan, x, dy, dx, mean, p, q, g, sum_dy, n, True, stream_bytes)
    # dx = dy * gamma * invstd: x is not read (a NaN there must not leak into dx)
    return not _affine(plan, dy, dy, dx, q, g, q, g, q, 1.0, False, stream_bytes)
