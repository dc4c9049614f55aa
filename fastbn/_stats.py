"""Glue for ``batch_norm(..., stats=)`` and ``batch_norm_backward(..., sums=)``: given
statistics (e.g. merged over processes) in place of the batch's own, given gradient sums
in place of the local ones. ``fastbn.functional`` validates its usual arguments and
delegates here; the kernels are ``fastbn._stats_kernels``.
"""

import numpy as np

from . import _launch
from . import _stats_kernels as SK
from ._threading import parallel_call
from .moments import Moments


def _call(plan, fn, *args):
    return parallel_call(fn, *args) if plan.parallel else fn(*args)


def check_stats(stats, C, training):
    """Validate ``batch_norm``'s ``stats`` argument; None passes through."""
    if stats is None:
        return None
    if not isinstance(stats, Moments):
        raise TypeError(f"stats must be a fastbn.Moments, got {type(stats).__name__}")
    if not training:
        raise ValueError("stats= is for training=True (eval mode uses the running statistics)")
    if stats.C != C:
        raise ValueError(f"stats has {stats.C} channels, x has {C}")
    if stats.count <= 1:
        got = "no values" if stats.count == 0 else "a single value per channel"
        raise ValueError(
            f"Expected more than 1 value per channel when training, got stats of {got} "
            f"(stats.count = {stats.count})"
        )
    return stats


def _kernel_running(a):
    """``a`` itself when the kernel can update it (native float32/float64), else a float64
    copy to write back (as ``fastbn._launch`` does for ``forward_train``)."""
    if a is None or (a.dtype.char in "fd" and a.dtype.isnative):
        return a
    return a.astype(np.float64)


def forward_with_stats(plan, x, y, gamma, beta, eps, stats, running_mean, running_var, momentum):
    """Training forward of flat ``x`` into flat ``y`` normalized with ``stats`` (mean and
    biased variance); the running statistics are updated from ``stats`` (unbiased with
    ``stats.count``). Returns float64 ``(mean, var, invstd)`` and whether every variance
    is finite. ``x`` may be empty (a process with no local values)."""
    mean = np.array(stats.mean)
    var = stats.var(0)
    if x.size:
        invstd = _launch.forward_eval(plan, x, y, gamma, beta, eps, mean, var)
    else:
        invstd = 1.0 / np.sqrt(var + eps)
    rm, rv = _kernel_running(running_mean), _kernel_running(running_var)
    if rm is not None or rv is not None:
        stand_in = rv if rm is None else rm
        args = (mean, var, float(stats.count), stand_in if rm is None else rm)
        args += (stand_in if rv is None else rv, float(momentum), rm is not None, rv is not None)
        SK.update_running(*args)
        for given, used in ((running_mean, rm), (running_var, rv)):
            if used is not given:
                given[...] = used
    return mean, var, invstd, bool(np.all(np.isfinite(var)))


def check_sums(sums, cache):
    """Validate ``batch_norm_backward``'s ``sums``: float64 ``(2, C)``; None passes."""
    if sums is None:
        return None
    if not isinstance(sums, np.ndarray) or isinstance(sums, np.ma.MaskedArray):
        raise TypeError(f"sums must be a numpy.ndarray, got {type(sums).__name__}")
    if sums.dtype.kind != "f":
        raise TypeError(f"sums must be a float array, got dtype {sums.dtype}")
    C = cache.view.C
    if sums.shape != (2, C):
        raise ValueError(f"sums must have shape (2, {C}) (fastbn.grad_sums), got {sums.shape}")
    return np.array(sums, dtype=np.float64, order="C")  # a private copy


def local_sums(plan, dy, cache):
    """Float64 ``(2, C)``: ``sum(dy)`` and ``sum(dy * (x - mean))`` of flat ``dy``."""
    sums = np.zeros((2, plan.C))
    if dy.size:
        args = (plan.ints, _launch._ro(dy), _launch._ro(cache.x_flat), cache.mean, sums)
        _call(plan, SK.grad_sums, *args)
    return sums


def backward_with_sums(plan, dy, cache, dx, sums):
    """Training backward into flat ``dx`` from ``sums`` (``(2, C)`` float64; None: the
    local sums) and the cache's count. Returns float64 ``(dgamma, dbeta)``."""
    if sums is None:
        sums = local_sums(plan, dy, cache)
    C = plan.C
    n = float(cache.count if cache.count is not None else plan.outer * plan.inner)
    gamma = plan.ones if cache.gamma is None else cache.gamma
    if dy.size == 0:
        return sums[1] * cache.invstd, sums[0].copy()
    dgamma, dbeta = np.empty(C), np.empty(C)
    mean, invstd = cache.mean, cache.invstd
    args = (plan.ints, _launch._ro(dy), _launch._ro(cache.x_flat), dx, mean, invstd, gamma)
    args += (sums, n, dgamma, dbeta, _launch.STREAM_BYTES)
    if not _call(plan, SK.backward_from_sums, *args):
        g = gamma * invstd
        p, q = -g * invstd * (dgamma / n), -g * (dbeta / n)
        _launch._affine_float64(plan, dx, cache.x_flat, mean, p, q, dy, g)
    return dgamma, dbeta
