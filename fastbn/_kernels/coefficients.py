"""Per-channel coefficients of the elementwise pass, stored in the data's dtype.

The elementwise pass computes ``(x - m) * p + q`` (plus ``(dy - d) * g`` for ``dx``) in
the storage dtype. Its coefficients are computed in float64 and kept in a ``work`` array
(rows named in ``layout``) of the storage dtype. For float32 the means ``m`` and ``d``
are rounded to float32 and the rounding remainders move into the offset,
``q' = q + d' * g - (m - m') * p``: ``x - m'`` and ``dy - d'`` are then exact near the
means (Sterbenz), so an offset common to a channel's data, or to its gradients, costs no
digits, and each output is within about two units in the last place of the float64
formula rounded once. A finite coefficient beyond float32's range is clamped and
flagged (``W_CLAMPED``): the caller then redoes the pass in float64 (``fastbn._launch``).
"""

import numpy as np

from .jit import _copy, borrowing, exact, exact_borrowing, jit
from .layout import W_CLAMPED, W_DY_MEAN, W_DY_SCALE, W_MEAN, W_OFFSET, W_SCALE, WORK_ROWS
from .stream import LINE, fmuladd

_U = np.uint64  # loop indices: unsigned ones index without Numba's negative-index wraparound

_FLOAT32_MAX = 3.4028234663852886e38


@exact_borrowing
def _narrow(work, i, c, value):
    """``work[i, c] = value`` in ``work``'s dtype. True when a finite value does not fit
    (float32 beyond 3.4e38); it is then clamped to the largest float32."""
    work[i, c] = value
    if np.isinf(work[i, c]) and np.isfinite(value):
        work[i, c] = np.copysign(_FLOAT32_MAX, value)
        return True
    return False


@exact_borrowing
def _offset(m, m_w, p, q, g, d_w):
    """``q + (m_w - m) * p + d_w * g`` in float64, a term skipped when its first factor is
    0 (so an inf ``p`` or ``g`` makes no NaN). Fused multiply-adds, which no fastmath
    flag reorders: ``working`` and ``working_channel`` get the same bits."""
    m, m_w, p, q = np.float64(m), np.float64(m_w), np.float64(p), np.float64(q)
    g, d_w = np.float64(g), np.float64(d_w)
    offset = fmuladd(m_w - m, p, q) if m_w != m else q
    return fmuladd(d_w, g, offset) if d_w != 0.0 else offset


def _working_channel(m, p, q, g, dsum, n, center, c, work):
    """Channel ``c``'s coefficients from float64 ``m, p, q, g`` (arrays) and ``d = dsum *
    (1 / n)`` when ``center`` (else 0) into column ``c`` of ``work``, clamping and
    flagging what does not fit."""
    d = dsum * (1.0 / n) if center else 0.0
    # rows as int64 values, not literals: one compilation of _narrow, not one per row
    clamped = _narrow(work, np.int64(W_MEAN), c, m[c])
    clamped |= _narrow(work, np.int64(W_SCALE), c, p[c])
    clamped |= _narrow(work, np.int64(W_DY_SCALE), c, g[c])
    clamped |= _narrow(work, np.int64(W_DY_MEAN), c, d)
    offset = _offset(m[c], work[W_MEAN, c], p[c], q[c], g[c], work[W_DY_MEAN, c])
    clamped |= _narrow(work, np.int64(W_OFFSET), c, offset)
    work[W_CLAMPED, c] = 1.0 if clamped else 0.0


working_channel = exact_borrowing(_working_channel)
# the rare clamping pass
_clamp_channel = exact_borrowing(_copy(_working_channel, "clamp_channel", {}))


# Rows shorter than ROW_GROUP_BELOW bytes are written ROW_GROUP // C at a time by the
# elementwise pass (``affine._rows_plain``): one loop over the group's elements, whose
# coefficients are the channels' repeated, instead of one short loop per row that runs
# mostly in its scalar remainder. Measured per pass (serial, float32): (1024, 32) 4.9 ->
# 3.4 us, (1024, 16) 3.6 -> 1.6 us, (4096, 10) 16.7 -> 5.0 us, (100, 100) 1.22 -> 0.99 us;
# float64 rows of 800 B ((100, 100), (1000, 100)) were as fast or slower grouped.
ROW_GROUP = 256
ROW_GROUP_BELOW = 512


@exact_borrowing
def row_group(C, itemsize):
    """Rows per group of the elementwise pass for rows of ``C`` elements of ``itemsize``
    bytes (1: row by row)."""
    if C == 0 or C * itemsize >= ROW_GROUP_BELOW:
        return 1
    return max(1, ROW_GROUP // C)


@exact_borrowing
def spare_columns(C, itemsize):
    """Columns of ``work`` past ``C``, where the channels repeat: ``LINE`` for a streamed
    line that crosses a row's end, and the rest of a row group."""
    return max(LINE, (row_group(C, itemsize) - 1) * C)


@jit
def new_work(out, C):
    """A ``work`` array for ``C`` channels in ``out``'s dtype (``spare_columns`` spare
    columns)."""
    return np.empty((WORK_ROWS, C + spare_columns(C, out.itemsize)), out.dtype)


@exact
def repeated(a, fold):
    """A new float64 array with each value of ``a`` ``fold`` times in a row: per-channel
    values as the columns of a folded plan read them (see
    ``fastbn._plan.TINY_PLANE_BYTES``): the mean for the gradient sums."""
    f = _U(fold)
    out = np.empty(a.shape[0] * fold)
    for c in range(_U(a.shape[0])):
        for e in range(f):
            out[c * f + e] = a[c]
    return out


@borrowing
def any_clamped(work, C):
    for c in range(_U(C)):
        if work[W_CLAMPED, c] != 0.0:
            return True
    return False


@exact
def working(out, m, p, q, g, dsum, n, center, fold):
    """``working_channel`` for every channel, in ``out``'s dtype, with ``d = dsum * (1 / n)``
    when ``center`` (``dx``: ``dsum`` is ``sum(dy)``), else 0 -> ``(work, clamped)``:
    ``clamped`` True when some channel is flagged (``any_clamped``, without another sweep
    of the flags: ~0.5 ns per channel). ``fold`` > 1 (a folded plan, tiny planes seen as
    rows: see ``fastbn._plan.TINY_PLANE_BYTES``): ``work`` has ``fold`` columns per channel,
    channel ``c``'s in columns ``c * fold`` to ``c * fold + fold - 1``, from the same
    per-channel arrays (no array of columns is made for them). The columns past the last
    repeat the first ones (a streamed line of a row may run past the row's last channel
    into the next row's first; a row group reads them as its later rows' channels).

    The same values as ``working_channel``, from a loop without branches that vectorizes
    (per channel calls cost ~40 ns each); only when some coefficient does not fit the
    dtype are the channels redone with ``working_channel``, which clamps and flags."""
    C = m.shape[0]
    f = _U(fold)
    columns = _U(C) * f
    work = new_work(out, columns)
    m_w, p_w, q_w = work[W_MEAN], work[W_SCALE], work[W_OFFSET]
    g_w, d_w, flag = work[W_DY_SCALE], work[W_DY_MEAN], work[W_CLAMPED]
    inv_n = 1.0 / n
    unfit = 0
    for c in range(_U(C)):
        d = dsum[c] * inv_n if center else 0.0
        m_w[c] = m[c]
        p_w[c] = p[c]
        g_w[c] = g[c]
        d_w[c] = d
        offset = _offset(m[c], m_w[c], p[c], q[c], g[c], d_w[c])
        q_w[c] = offset
        flag[c] = 0.0
        if out.itemsize == 4:  # a float64 value always fits float64 storage
            unfit += (
                (np.isinf(m_w[c]) & np.isfinite(m[c]))
                | (np.isinf(p_w[c]) & np.isfinite(p[c]))
                | (np.isinf(g_w[c]) & np.isfinite(g[c]))
                | (np.isinf(d_w[c]) & np.isfinite(d))
                | (np.isinf(q_w[c]) & np.isfinite(offset))
            )
    if unfit:
        for c in range(_U(C)):
            _clamp_channel(m, p, q, g, dsum[c], n, center, c, work)
    if f > 1:  # channel c's column to its fold columns, last channel first (no overlap)
        for i in range(W_CLAMPED + 1):
            row = work[i]
            for k in range(_U(C)):
                c = _U(C) - _U(1) - k
                value = row[c]
                for e in range(f):
                    row[c * f + e] = value
    if C:  # doubling copies of the periodic prefix
        width = _U(work.shape[1])
        for i in range(W_CLAMPED):
            row = work[i]
            filled = columns
            while filled < width:
                k = min(filled, width - filled)
                for c in range(k):
                    row[filled + c] = row[c]
                filled += k
    return work, unfit != 0
