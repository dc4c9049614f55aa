"""Glue for ``batch_norm(..., stats=)`` and ``batch_norm_backward(..., sums=)``: given
statistics (e.g. merged over processes) in place of the batch's own, given gradient sums
in place of the local ones. ``fastbn.functional`` validates its usual arguments and
delegates here; the passes are ``fastbn._launch``'s (the same kernels as without them).
"""

import numpy as np

from . import _launch
from .moments import Moments


def check_stats_type(stats):
    """``batch_norm``'s ``stats`` must be a ``fastbn.Moments`` (the rest of its checks is
    ``fastbn._checks.check_stats``)."""
    if not isinstance(stats, Moments):
        raise TypeError(f"stats must be a fastbn.Moments, got {type(stats).__name__}")


def forward_with_stats(plan, x, y, gamma, beta, eps, stats, running_mean, running_var, momentum):
    """Training forward of flat ``x`` into flat ``y`` normalized with ``stats`` (mean and
    biased variance); the running statistics are updated from ``stats`` (unbiased with
    ``stats.count``). Returns the ``(4, C)`` statistics and whether every variance is
    finite. ``x`` may be empty (a process with no local values)."""
    given = (stats.mean, stats.m2, stats.count)
    args = (plan, x, y, gamma, beta, eps, running_mean, running_var, momentum)
    stats, finite, _ = _launch.forward_train(*args, stats=given)
    return stats, finite


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
    if not dy.size:
        return np.zeros((2, plan.C))
    return _launch.grad_sums(plan, dy, cache.x_flat, cache.mean)


def backward_with_sums(plan, dy, cache, dx, sums):
    """Training backward into flat ``dx`` from ``sums`` (``(2, C)`` float64; None: the
    local sums) and the cache's count. Returns float64 ``(dgamma, dbeta)``."""
    n = cache.count if cache.count is not None else plan.outer * plan.inner
    if dy.size == 0:
        sums = np.zeros((2, plan.C)) if sums is None else sums
        return sums[1] * cache.invstd, sums[0].copy()
    args = (plan, dy, cache.x_flat, dx, cache.stats, cache.gamma, True)
    dgamma, dbeta = _launch.backward(*args, n=n, sums=sums)
    return dgamma, dbeta
