"""Planes that fit in L2: one task per channel that reads its planes from memory once
per operation.

When a channel's planes fit in a core's L2 cache (``fastbn._plan.FUSE_BYTES``), a task
computes the channel's statistics (or gradient sums) and then writes its outputs,
re-reading x (and dy) from L2 instead of memory. Such a plan has one block (``FUSED``):
task ``t`` is channel ``t``. Every step is the one the two-pass operations use, on one
channel, so both paths give the same bits.
"""

import numba
import numpy as np

from .affine import affine_task, affine_task_planes, affine_task_relu_planes
from .coefficients import working_channel
from .gradsums import gradsums_task, gradsums_task_planes, gradsums_task_relu_planes
from .jit import borrowing, drivers, exact_borrowing, relu_pair
from .layout import NTASKS, W_DY_MEAN, W_DY_SCALE, W_MEAN, W_OFFSET, W_SCALE
from .moments import merge_channel, moments_task, moments_task_planes, normalizer

RELU = False  # a constant per compiled copy of the tasks (see jit.relu_pair)


def _forward_task(
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
    stats,
    have_stats,
    n,
    scale,
    work,
    stream,
    relu,
):
    """Channel ``t``: statistics into ``stats[:, t]`` (mean, m2, var, invstd; with
    ``have_stats`` mean and m2 of ``n`` values are given), then ``y`` (``relu``:
    ``max(0, y)``, see ``affine``)."""
    mean, m2, var, invstd = stats[0], stats[1], stats[2], stats[3]
    if not have_stats:
        moments_task(plan, t, x, s1, s2, shift)
        mean[t], m2[t] = merge_channel(s1, s2, shift, counts, t)
    var[t] = m2[t] / n
    normalizer(var, gamma, eps, invstd, scale, t)
    working_channel(mean, scale, beta, scale, 0.0, 1.0, np.bool_(False), t, work)
    w = (work[W_MEAN], work[W_SCALE], work[W_OFFSET], work[W_DY_SCALE], work[W_DY_MEAN])
    affine_task(plan, t, x, x, y, w[0], w[1], w[2], w[3], w[4], np.bool_(False), stream, work, relu)


# the planes-only copies of the passes' tasks (a fused plan is never rows)
_PLANES = dict(
    affine_task=affine_task_planes,
    moments_task=moments_task_planes,
    gradsums_task=gradsums_task_planes,
)
forward_task, forward_task_relu = relu_pair(
    borrowing, _forward_task, _PLANES, affine_task=affine_task_relu_planes
)


def _forward(
    plan, x, y, gamma, beta, eps, counts, s1, s2, shift, stats, have_stats, n, scale, work,
    stream, relu,
):  # fmt: skip
    for t in numba.prange(plan[NTASKS]):
        forward_task(
            plan, np.int64(t), x, y, gamma, beta, eps, counts, s1, s2, shift, stats, have_stats, n,
            scale, work, stream, relu,
        )  # fmt: skip


FORWARD = drivers(_forward, forward_task=forward_task_relu)


@exact_borrowing
def grad_params(c, sum_dy, sum_dy_xc, invstd, gamma, n, training, grads, coef):
    """Channel ``c``'s ``dgamma``, ``dbeta`` (``grads[0:2, c]``) and the coefficients
    ``g, p, q`` (``coef[0:3, c]``) of ``dx = dy * g + (x - mean) * p + q``."""
    dgamma, dbeta = grads[0], grads[1]
    g, p, q = coef[0], coef[1], coef[2]
    dbeta[c] = sum_dy
    dgamma[c] = sum_dy_xc * invstd[c]
    g[c] = gamma[c] * invstd[c]
    if training:
        p[c] = -g[c] * invstd[c] * (dgamma[c] / n)
        q[c] = -g[c] * (dbeta[c] / n)
    else:
        p[c] = 0.0
        q[c] = 0.0


def _backward_task(
    plan, t, dy, x, dx, mean, invstd, gamma, n, training, s1, s2, grads, coef, work, stream,
    fwork, relu,
):  # fmt: skip
    """Channel ``t``: gradient sums, ``dgamma``/``dbeta``, then ``dx``. Training: ``dx =
    dy * g + (x - mean) * p + q`` centred on the mean of ``dy``; eval: ``dy * g``, as
    ``(dy - 0) * g + 0``, because x is not read (a NaN there must not leak into dx).
    ``relu``: ``dy`` masked by the forward pre-activation (``fwork``, see ``affine``);
    eval then reads x for the mask only."""
    gradsums_task(plan, t, dy, x, mean, s1, s2, fwork, relu)
    grad_params(t, s1[0, t], s2[0, t], invstd, gamma, n, training, grads, coef)
    g, p, q = coef[0], coef[1], coef[2]
    w = (work[W_MEAN], work[W_SCALE], work[W_OFFSET], work[W_DY_SCALE], work[W_DY_MEAN])
    yes, no = np.bool_(True), np.bool_(False)  # not literals (see the module docstring)
    if training:
        working_channel(mean, p, q, g, grads[1, t], n, yes, t, work)
        affine_task(plan, t, x, dy, dx, w[0], w[1], w[2], w[3], w[4], yes, stream, fwork, relu)
    elif RELU and relu:  # (masked dy - 0) * g + 0
        working_channel(q, q, q, g, 0.0, 1.0, no, t, work)
        eval_dx = np.int64(2)
        affine_task(plan, t, x, dy, dx, w[0], w[1], w[2], w[3], w[4], yes, stream, fwork, eval_dx)
    else:
        working_channel(q, g, q, g, 0.0, 1.0, no, t, work)
        plain = np.int64(0)
        affine_task(plan, t, dy, dy, dx, w[0], w[1], w[2], w[3], w[4], no, stream, work, plain)


backward_task, backward_task_relu = relu_pair(
    borrowing,
    _backward_task,
    _PLANES,
    gradsums_task=gradsums_task_relu_planes,
    affine_task=affine_task_relu_planes,
)


def _backward(
    plan, dy, x, dx, mean, invstd, gamma, n, training, s1, s2, grads, coef, work, stream,
    fwork, relu,
):  # fmt: skip
    for t in numba.prange(plan[NTASKS]):
        backward_task(
            plan, np.int64(t), dy, x, dx, mean, invstd, gamma, n, training, s1, s2, grads, coef,
            work, stream, fwork, relu,
        )  # fmt: skip


BACKWARD = drivers(_backward, backward_task=backward_task_relu)
