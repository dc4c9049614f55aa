"""Numba entry points for statistics that merge (``fastbn.moments``) and for the passes
that take given statistics or given gradient sums (``batch_norm(stats=...)``,
``batch_norm_backward(sums=...)``).

They are compositions of the passes in ``fastbn._kernels`` (the same moments, gradient
sums and elementwise tasks, the same partition and block order), so that a result
computed from statistics that equal the batch's own has exactly the bits of the plain
operation. Only the merge differs: ``merge_m2`` returns the sum of squared deviations
``m2`` (what Chan's formula merges) instead of the variance.

Each entry point may run ``parallel=True`` drivers: call it through
``fastbn._threading.parallel_call`` when ``plan[PARALLEL]`` is set. Those drivers are
defined here, over ``_kernels``' tasks, not imported: a cached function that calls a
``parallel=True`` function of another module segfaulted (numba 0.68) when it was the
first kernel a process loaded from the on-disk cache.
"""

import numba
import numpy as np

from . import _kernels as K

_jit = K._jit
_pjit = K._pjit


@_jit
def merge_m2(s1, s2, shift, counts, mean, m2):
    """Chan's merge of the per-block shifted sums in block order, as
    ``_kernels.merge_moments``, into ``mean`` and ``m2`` (float64 ``(C,)``).

    ``m2`` is clamped at 0 (a nearly constant channel may round below); NaN is kept."""
    nblocks, C = s1.shape
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
        if not m2[c] > 0.0 and m2[c] == m2[c]:
            m2[c] = 0.0


@_jit
def moments(plan, counts, x, mean, var, m2):
    """Per-channel ``mean``, biased ``var`` and ``m2`` of flat ``x`` (canonical view of
    ``plan``). ``mean`` and ``var`` come from the very merge that ``batch_norm``'s
    training forward runs (``_merge_channel`` per channel for fused plans, else
    ``merge_moments``), so they are its bits; ``m2`` from ``merge_m2``. A channel with a
    NaN variance gets NaN ``mean`` and ``m2``, as in ``_kernels.forward_train``."""
    C = plan[K.CHANNELS]
    shape = (plan[K.NBLOCKS], C)
    s1 = np.empty(shape)
    s2 = np.empty(shape)
    shift = np.empty(shape)
    if plan[K.PARALLEL]:
        moments_parallel(plan, x, s1, s2, shift)
    else:
        K.moments_serial(plan, x, s1, s2, shift)
    if plan[K.FUSED]:
        for c in range(C):
            mean[c], var[c] = K._merge_channel(s1, s2, shift, counts, c)
    else:
        K.merge_moments(s1, s2, shift, counts, mean, var)
    merge_m2(s1, s2, shift, counts, np.empty(C), m2)
    for c in range(C):
        if var[c] != var[c]:
            mean[c] = np.nan
            m2[c] = np.nan


@_jit
def update_running(mean, var, n, running_mean, running_var, momentum, update_mean, update_var):
    """The running-statistics update of ``_kernels.forward_train`` (same arithmetic, so the
    same bits) from the biased ``var`` of ``n`` values per channel."""
    for c in range(mean.shape[0]):
        if update_mean and momentum != 0.0:
            if momentum == 1.0:
                running_mean[c] = mean[c]
            else:
                running_mean[c] = K._blend(running_mean[c], mean[c], momentum)
        if update_var and momentum != 0.0:
            unbiased = var[c] * (n / (n - 1.0))
            if momentum == 1.0:
                running_var[c] = unbiased
            else:
                running_var[c] = K._blend(running_var[c], unbiased, momentum)


@_jit
def grad_sums(plan, dy, x, mean, sums):
    """``sums[0] = sum(dy)``, ``sums[1] = sum(dy * (x - mean))`` per channel: the
    gradient-sums pass of ``_kernels.backward`` (same blocks, same order)."""
    shape = (plan[K.NBLOCKS], plan[K.CHANNELS])
    s1 = np.empty(shape)
    s2 = np.empty(shape)
    if plan[K.PARALLEL]:
        gradsums_parallel(plan, dy, x, mean, s1, s2)
    else:
        K.gradsums_serial(plan, dy, x, mean, s1, s2)
    K.merge_sums(s1, s2, sums[0], sums[1])


@_jit
def backward_from_sums(plan, dy, x, dx, mean, invstd, gamma, sums, n, dgamma, dbeta, stream_bytes):
    """Training ``dx`` from given per-channel ``sums`` (rows ``sum(dy)``,
    ``sum(dy * (x - mean))``, e.g. summed over processes) and ``n`` values per channel
    (the count the statistics were taken over): the coefficients and elementwise pass of
    ``_kernels.backward``. Sets ``dgamma = sums[1] * invstd`` and ``dbeta = sums[0]``.
    Returns False when ``dx`` must be redone in float64 (see ``_kernels._narrow``).

    ``training`` is passed on as a run-time value that is always True, as
    ``_kernels.backward`` passes its argument: with a literal ``True`` Numba compiled the
    coefficients differently, and ``dx`` differed from ``_kernels.backward``'s by an ulp."""
    C = plan[K.CHANNELS]
    g = np.empty(C)
    p = np.empty(C)
    q = np.empty(C)
    if plan[K.FUSED]:  # as _kernels.backward's fused tasks compute dx, channel by channel
        work = K._new_work(dx, C)
        stream = dx.size * dx.itemsize >= stream_bytes
        args = (plan, dy, x, dx, mean, invstd, gamma, sums, n, dgamma, dbeta, g, p, q, work)
        if plan[K.PARALLEL]:
            fused_dx_parallel(*args, stream)
        else:
            fused_dx_serial(*args, stream)
        return not K._any_clamped(work, C)
    sum_dy = sums[0]
    training = plan[K.OUTER] >= 0  # True, but not a literal: see the docstring
    for c in range(C):
        K._grad_params(c, sum_dy[c], sums[1, c], invstd, gamma, n, training, dgamma, dbeta, g, p, q)
    return not _affine(plan, x, dy, dx, mean, p, q, g, sum_dy, n, True, stream_bytes)


@_jit
def _fused_dx_task(
    plan, t, dy, x, dx, mean, invstd, gamma, sums, n, dgamma, dbeta, g, p, q, work, stream
):
    """Channel ``t`` of ``_kernels._fused_backward_task`` with given sums."""
    training = plan[K.OUTER] >= 0  # True, but not a literal (see backward_from_sums)
    K._grad_params(t, sums[0, t], sums[1, t], invstd, gamma, n, training, dgamma, dbeta, g, p, q)
    K._dx_working(t, training, mean, g, p, q, dbeta[t] * (1.0 / n), work)
    K._dx_task(plan, t, dy, x, dx, training, work, stream)


@_jit
def fused_dx_serial(
    plan, dy, x, dx, mean, invstd, gamma, sums, n, dgamma, dbeta, g, p, q, work, stream
):
    for t in range(plan[K.NTASKS]):
        _fused_dx_task(
            plan, t, dy, x, dx, mean, invstd, gamma, sums, n, dgamma, dbeta, g, p, q, work, stream
        )


@_pjit
def fused_dx_parallel(
    plan, dy, x, dx, mean, invstd, gamma, sums, n, dgamma, dbeta, g, p, q, work, stream
):
    for t in numba.prange(plan[K.NTASKS]):
        _fused_dx_task(
            plan, t, dy, x, dx, mean, invstd, gamma, sums, n, dgamma, dbeta, g, p, q, work, stream
        )


# -- parallel drivers over _kernels' tasks (see the module docstring) -----------------------


@_pjit
def moments_parallel(plan, x, s1, s2, shift):
    for t in numba.prange(plan[K.NTASKS]):
        K._moments_task(plan, t, x, s1, s2, shift)


@_pjit
def gradsums_parallel(plan, dy, x, mean, s1, s2):
    for t in numba.prange(plan[K.NTASKS]):
        K._gradsums_task(plan, t, dy, x, mean, s1, s2)


@_pjit
def affine_parallel(plan, x, dy, out, m, p, q, g, d, with_dy, stream):
    for t in numba.prange(plan[K.AFFINE_TASKS]):
        K._affine_task(plan, t, x, dy, out, m, p, q, g, d, with_dy, stream)


@_jit
def _affine(plan, x, dy, out, m, p, q, g, dsum, n, with_dy, stream_bytes):
    """``_kernels._affine`` with this module's parallel driver."""
    stream = out.size * out.itemsize >= stream_bytes
    work = K._working(out, m, p, q, g, dsum, n, with_dy)
    args = (plan, x, dy, out, work[0], work[1], work[2], work[3], work[4], with_dy, stream)
    if plan[K.PARALLEL]:
        affine_parallel(*args)
    else:
        K.affine_serial(*args)
    return K._any_clamped(work, m.shape[0])
