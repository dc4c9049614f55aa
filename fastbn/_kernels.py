"""Numba kernels over the canonical ``(outer, C, inner)`` view of batch norm.

Every array here is a flat, C-contiguous 1-D array; ``outer``, ``C`` and ``inner``
describe its canonical 3-D shape. Two families of loops cover every layout:

* rows (``inner == 1``): each row holds C contiguous channel values; loops run
  along the row (vectorized over channels) for a block of rows and a chunk of
  columns;
* planes (``inner > 1``): each ``(o, c)`` plane of ``inner`` values is contiguous;
  loops run along the plane for a block of ``outer`` indices of one channel.

Work is split into *tasks* (block ``b`` of rows/outer indices x split ``k`` of
columns/channels). The split depends on the shape only (see ``_launch``), each
task writes its own partial sums, and the partials are merged in a fixed order, so
results are bitwise identical on 1 thread or many.

Two operations suffice:

``reduce``      per block and channel: ``s1 = sum(a - sa)``, ``s2 = sum((a - sa) * (b - sb))``.
                Statistics use ``a = b = x`` with ``sa = sb =`` the block's first value
                (shifted sums: no catastrophic cancellation); backward uses ``a = dy``,
                ``sa = 0``, ``b = x``, ``sb = mean``.
``affine``      ``out = (x - m) * p + q`` (forward) or ``out = dy * g + (x - m) * p + q``
                (backward ``dx``), per-channel ``m, p, q, g`` in float64.

All arithmetic is float64 whatever the storage dtype (float32 or float64: one
generic source, compiled lazily per dtype). Indices are unsigned so that Numba
emits no negative-index wraparound, which would defeat vectorization.
Each operation has a serial and a ``parallel=True`` driver that are distinct
functions, because Numba's on-disk cache does not key on ``parallel=``.
"""

import numba
import numpy as np

# Never nnan/ninf: NaN and inf must propagate through every channel they touch.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

_jit = numba.njit(fastmath=FASTMATH, cache=True, nogil=True, error_model="numpy")
_pjit = numba.njit(fastmath=FASTMATH, cache=True, nogil=True, error_model="numpy", parallel=True)

_U = np.uint64


@_jit
def _task_bounds(t, nsplit, block_len, n_outer, split_width, n_split_items):
    """Block ``b`` and split ``k`` of task ``t``, as half-open unsigned ranges."""
    b = t // nsplit
    k = t - b * nsplit
    lo = _U(b * block_len)
    hi = _U(min(n_outer, (b + 1) * block_len))
    c0 = _U(k * split_width)
    c1 = _U(min(n_split_items, (k + 1) * split_width))
    return b, lo, hi, c0, c1


@_jit
def _reduce_rows(a, b, C, r0, r1, c0, c1, sa_in, sb_in, from_block, s1, s2, shift):
    """Partial sums over rows ``[r0, r1)`` and columns ``[c0, c1)``; write row ``blk``."""
    w = c1 - c0
    sa = np.empty(w)
    sb = np.empty(w)
    for j in range(w):
        if from_block:
            sa[j] = a[r0 * C + c0 + j]
        else:
            sa[j] = sa_in[c0 + j]
        sb[j] = sa[j] if from_block else sb_in[c0 + j]
    acc1 = np.zeros(w)
    acc2 = np.zeros(w)
    r = r0
    # Four rows per sweep: the accumulators are loaded/stored once per four rows.
    while r + _U(4) <= r1:
        i0 = r * C + c0
        i1 = i0 + C
        i2 = i1 + C
        i3 = i2 + C
        for j in range(w):
            da0 = a[i0 + j] - sa[j]
            da1 = a[i1 + j] - sa[j]
            da2 = a[i2 + j] - sa[j]
            da3 = a[i3 + j] - sa[j]
            acc1[j] += (da0 + da1) + (da2 + da3)
            acc2[j] += (da0 * (b[i0 + j] - sb[j]) + da1 * (b[i1 + j] - sb[j])) + (
                da2 * (b[i2 + j] - sb[j]) + da3 * (b[i3 + j] - sb[j])
            )
        r += _U(4)
    while r < r1:
        i0 = r * C + c0
        for j in range(w):
            da0 = a[i0 + j] - sa[j]
            acc1[j] += da0
            acc2[j] += da0 * (b[i0 + j] - sb[j])
        r += _U(1)
    for j in range(w):
        s1[c0 + j] = acc1[j]
        s2[c0 + j] = acc2[j]
        shift[c0 + j] = sa[j]


@_jit
def _reduce_planes(a, b, C, inner, o0, o1, c, sa_in, sb_in, from_block, s1, s2, shift):
    """Partial sums over the planes ``(o, c)`` for ``o`` in ``[o0, o1)``."""
    if from_block:
        sa = np.float64(a[(o0 * C + c) * inner])
        sb = sa
    else:
        sa = sa_in[c]
        sb = sb_in[c]
    acc1 = 0.0
    acc2 = 0.0
    for o in range(o0, o1):
        base = (o * C + c) * inner
        p1 = 0.0
        p2 = 0.0
        for i in range(inner):
            da = a[base + i] - sa
            p1 += da
            p2 += da * (b[base + i] - sb)
        acc1 += p1
        acc2 += p2
    s1[c] = acc1
    s2[c] = acc2
    shift[c] = sa


@_jit
def _reduce_task(
    t,
    a,
    b,
    outer,
    C,
    inner,
    block_len,
    nsplit,
    split_width,
    sa_in,
    sb_in,
    from_block,
    s1,
    s2,
    shift,
):
    if inner == 1:
        blk, lo, hi, c0, c1 = _task_bounds(t, nsplit, block_len, outer, split_width, C)
        _reduce_rows(
            a, b, _U(C), lo, hi, c0, c1, sa_in, sb_in, from_block, s1[blk], s2[blk], shift[blk]
        )
    else:
        blk, lo, hi, c0, c1 = _task_bounds(t, nsplit, block_len, outer, 1, C)
        _reduce_planes(
            a,
            b,
            _U(C),
            _U(inner),
            lo,
            hi,
            c0,
            sa_in,
            sb_in,
            from_block,
            s1[blk],
            s2[blk],
            shift[blk],
        )


@_jit
def reduce_serial(
    ntasks,
    a,
    b,
    outer,
    C,
    inner,
    block_len,
    nsplit,
    split_width,
    sa_in,
    sb_in,
    from_block,
    s1,
    s2,
    shift,
):
    for t in range(ntasks):
        _reduce_task(
            t,
            a,
            b,
            outer,
            C,
            inner,
            block_len,
            nsplit,
            split_width,
            sa_in,
            sb_in,
            from_block,
            s1,
            s2,
            shift,
        )


@_pjit
def reduce_parallel(
    ntasks,
    a,
    b,
    outer,
    C,
    inner,
    block_len,
    nsplit,
    split_width,
    sa_in,
    sb_in,
    from_block,
    s1,
    s2,
    shift,
):
    for t in numba.prange(ntasks):
        _reduce_task(
            t,
            a,
            b,
            outer,
            C,
            inner,
            block_len,
            nsplit,
            split_width,
            sa_in,
            sb_in,
            from_block,
            s1,
            s2,
            shift,
        )


@_jit
def _affine_rows(x, dy, out, C, r0, r1, c0, c1, m, p, q, g, with_dy):
    w = c1 - c0
    mm = m[c0:c1]
    pp = p[c0:c1]
    qq = q[c0:c1]
    gg = g[c0:c1]
    for r in range(r0, r1):
        base = r * C + c0
        if with_dy:
            for j in range(w):
                out[base + j] = dy[base + j] * gg[j] + (x[base + j] - mm[j]) * pp[j] + qq[j]
        else:
            for j in range(w):
                out[base + j] = (x[base + j] - mm[j]) * pp[j] + qq[j]


@_jit
def _affine_planes(x, dy, out, C, inner, o0, o1, c, m, p, q, g, with_dy):
    mc = m[c]
    pc = p[c]
    qc = q[c]
    gc = g[c]
    for o in range(o0, o1):
        base = (o * C + c) * inner
        if with_dy:
            for i in range(inner):
                out[base + i] = dy[base + i] * gc + (x[base + i] - mc) * pc + qc
        else:
            for i in range(inner):
                out[base + i] = (x[base + i] - mc) * pc + qc


@_jit
def _affine_task(
    t, x, dy, out, outer, C, inner, block_len, nsplit, split_width, m, p, q, g, with_dy
):
    if inner == 1:
        _, lo, hi, c0, c1 = _task_bounds(t, nsplit, block_len, outer, split_width, C)
        _affine_rows(x, dy, out, _U(C), lo, hi, c0, c1, m, p, q, g, with_dy)
    else:
        _, lo, hi, c0, c1 = _task_bounds(t, nsplit, block_len, outer, 1, C)
        _affine_planes(x, dy, out, _U(C), _U(inner), lo, hi, c0, m, p, q, g, with_dy)


@_jit
def affine_serial(
    ntasks, x, dy, out, outer, C, inner, block_len, nsplit, split_width, m, p, q, g, with_dy
):
    for t in range(ntasks):
        _affine_task(
            t, x, dy, out, outer, C, inner, block_len, nsplit, split_width, m, p, q, g, with_dy
        )


@_pjit
def affine_parallel(
    ntasks, x, dy, out, outer, C, inner, block_len, nsplit, split_width, m, p, q, g, with_dy
):
    for t in numba.prange(ntasks):
        _affine_task(
            t, x, dy, out, outer, C, inner, block_len, nsplit, split_width, m, p, q, g, with_dy
        )


@_jit
def merge_moments(s1, s2, shift, counts, mean, var):
    """Chan's merge of per-block shifted sums, in block order -> ``mean``, biased ``var``.

    Block ``b`` holds ``counts[b]`` values per channel with shifted sums
    ``s1 = sum(x - shift)`` and ``s2 = sum((x - shift)**2)``.
    """
    nblocks, C = s1.shape
    for c in range(C):
        n = 0.0
        mu = 0.0
        m2 = 0.0
        for blk in range(nblocks):
            nb = counts[blk]
            d = s1[blk, c] / nb
            mu_b = shift[blk, c] + d
            m2_b = s2[blk, c] - s1[blk, c] * d
            if n == 0.0:
                mu = mu_b
                m2 = m2_b
                n = nb
            else:
                tot = n + nb
                delta = mu_b - mu
                mu += delta * (nb / tot)
                m2 += m2_b + delta * delta * (n * nb / tot)
                n = tot
        mean[c] = mu
        # m2 may round to a tiny negative for a (nearly) constant channel.
        var[c] = max(m2, 0.0) / n if m2 == m2 else m2


@_jit
def merge_sums(s1, s2, sum1, sum2):
    """Plain per-channel sums of block partials, in block order."""
    nblocks, C = s1.shape
    for c in range(C):
        a = 0.0
        b = 0.0
        for blk in range(nblocks):
            a += s1[blk, c]
            b += s2[blk, c]
        sum1[c] = a
        sum2[c] = b


# -- whole operations: one dispatch from Python per call ----------------------------------
#
# ``plan`` is the int64 array (outer, C, inner, block_len, nblocks, nsplit, split_width,
# ntasks, parallel) from ``fastbn._launch.Plan``; ``counts`` the values per block.


@_jit
def _reduce(plan, a, b, sa, sb, from_block):
    outer, C, inner, block_len, nblocks, nsplit, split_width, ntasks, par = (
        plan[0],
        plan[1],
        plan[2],
        plan[3],
        plan[4],
        plan[5],
        plan[6],
        plan[7],
        plan[8],
    )
    s1 = np.empty((nblocks, C))
    s2 = np.empty((nblocks, C))
    shift = np.empty((nblocks, C))
    if par:
        reduce_parallel(
            ntasks,
            a,
            b,
            outer,
            C,
            inner,
            block_len,
            nsplit,
            split_width,
            sa,
            sb,
            from_block,
            s1,
            s2,
            shift,
        )
    else:
        reduce_serial(
            ntasks,
            a,
            b,
            outer,
            C,
            inner,
            block_len,
            nsplit,
            split_width,
            sa,
            sb,
            from_block,
            s1,
            s2,
            shift,
        )
    return s1, s2, shift


@_jit
def _affine(plan, x, dy, out, m, p, q, g, with_dy):
    outer, C, inner, block_len, nsplit, split_width, ntasks, par = (
        plan[0],
        plan[1],
        plan[2],
        plan[3],
        plan[5],
        plan[6],
        plan[7],
        plan[8],
    )
    if par:
        affine_parallel(
            ntasks, x, dy, out, outer, C, inner, block_len, nsplit, split_width, m, p, q, g, with_dy
        )
    else:
        affine_serial(
            ntasks, x, dy, out, outer, C, inner, block_len, nsplit, split_width, m, p, q, g, with_dy
        )


@_jit
def forward_train(plan, counts, x, y, gamma, beta, eps, mean, var, invstd):
    """Batch statistics into ``mean``, ``var`` (biased), ``invstd``; then ``y``."""
    s1, s2, shift = _reduce(plan, x, x, mean, mean, True)
    merge_moments(s1, s2, shift, counts, mean, var)
    forward_eval(plan, x, y, gamma, beta, eps, mean, var, invstd)


@_jit
def forward_eval(plan, x, y, gamma, beta, eps, mean, var, invstd):
    """``y = (x - mean) * invstd * gamma + beta`` with ``invstd = 1 / sqrt(var + eps)``."""
    C = mean.shape[0]
    scale = np.empty(C)
    for c in range(C):
        invstd[c] = 1.0 / np.sqrt(var[c] + eps)
        scale[c] = invstd[c] * gamma[c]
    _affine(plan, x, x, y, mean, scale, beta, scale, False)


@_jit
def backward(plan, dy, x, dx, mean, invstd, gamma, training, dgamma, dbeta):
    """``dx``; per-channel ``dgamma = sum(dy * xhat)`` and ``dbeta = sum(dy)``."""
    C = mean.shape[0]
    s1, s2, _ = _reduce(plan, dy, x, np.zeros(C), mean, False)
    merge_sums(s1, s2, dbeta, dgamma)
    n = float(plan[0] * plan[2])
    g = np.empty(C)
    p = np.zeros(C)
    q = np.zeros(C)
    for c in range(C):
        dgamma[c] *= invstd[c]
        g[c] = gamma[c] * invstd[c]
        if training:
            p[c] = -g[c] * invstd[c] * (dgamma[c] / n)
            q[c] = -g[c] * (dbeta[c] / n)
    _affine(plan, x, dy, dx, mean, p, q, g, True)
