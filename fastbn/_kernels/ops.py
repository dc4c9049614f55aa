"""Whole operations, one Numba dispatch from Python each, composed from the passes.

Every operation is one Python body compiled into targets (``jit.operations``): serial
targets call the passes' serial drivers, parallel ones their ``parallel=True`` drivers;
fused targets hold the fused-planes path only (``FUSED``), the others the two-pass
path, and only the ``relu`` targets (``RELU``, for ``activation="relu"``) hold the
ReLU loops. So a call compiles only the code its plan runs. In the bodies
``moments_pass``, ``gradsums_pass``, ``affine_pass``, ``fused_forward_pass``,
``fused_backward_pass`` and the ``*_op`` names are the pass of the target being compiled
(the serial ones below are what a linter sees). ``TARGETS[name][parallel, fused, relu]``
is an operation's dispatcher.

Per-channel float64 arrays: ``stats`` is ``(4, C)``: mean, m2 (sum of squared
deviations), biased variance, invstd; ``grads`` is ``(2, C)``: dgamma, dbeta; ``sums``
is ``(2, C)``: ``sum(dy)``, ``sum(dy * (x - mean))``.
"""

import numpy as np

from . import fused
from .affine import AFFINE
from .coefficients import any_clamped, new_work, repeated, row_group, working
from .gradsums import GRADSUMS, fold_sums, masked_dy_at, merge_sums
from .jit import borrowing, exact_borrowing, operations
from .layout import (
    CHANNELS,
    FOLD,
    INNER,
    NBLOCKS,
    OUTER,
    PARALLEL,
    W_DY_MEAN,
    W_DY_SCALE,
    W_MEAN,
    W_OFFSET,
    W_SCALE,
)
from .moments import MOMENTS, fold_moments, merge_moments, normalizers

_U = np.uint64  # per-channel loops: unsigned indices (no negative-index wraparound code)

_PASSES = dict(
    moments_pass=MOMENTS,
    gradsums_pass=GRADSUMS,
    affine_pass=AFFINE,
    fused_forward_pass=fused.FORWARD,
    fused_backward_pass=fused.BACKWARD,
)
_SERIAL = False, False  # (parallel, relu)
moments_pass, gradsums_pass, affine_pass = MOMENTS[_SERIAL], GRADSUMS[_SERIAL], AFFINE[_SERIAL]
fused_forward_pass, fused_backward_pass = fused.FORWARD[_SERIAL], fused.BACKWARD[_SERIAL]
FUSED = RELU = False
TARGETS = {}


def _register(body):
    """Targets of ``body``; its two-pass pair becomes a pass the later bodies may call."""
    name = body.__name__.lstrip("_")
    targets = TARGETS[name] = operations(body, **_PASSES)
    both = (False, True)
    _PASSES[name + "_op"] = {(p, r): targets[p, False, r] for p in both for r in both}
    return targets[False, False, False]


def _affine(plan, x, dy, out, m, p, q, g, dsum, n, with_dy, stream_bytes, fwork, relu):
    """The elementwise pass with float64 per-channel coefficients ``m, p, q, g`` (``dy``
    centred on ``dsum / n`` when ``with_dy``; ``relu``, ``fwork``: see ``affine``); a
    folded plan's columns read their channel's. Returns ``(clamped, work)``: True when they
    do not fit the storage dtype (``out`` must then be redone in float64), and the
    coefficients as the pass read them (``coefficients.working``)."""
    stream = out.size * out.itemsize >= stream_bytes
    work, clamped = working(out, m, p, q, g, dsum, n, with_dy, plan[FOLD])
    w = (work[W_MEAN], work[W_SCALE], work[W_OFFSET], work[W_DY_SCALE], work[W_DY_MEAN])
    affine_pass(plan, x, dy, out, w[0], w[1], w[2], w[3], w[4], with_dy, stream, fwork, relu)
    return clamped, work


affine_op = _register(_affine)


def _moments(plan, counts, x, stats):
    """Per-channel mean and m2 of ``x`` into ``stats[0:2]`` of the ``(4, C)`` ``stats``
    (the statistics pass and its merge, without the variance, whose row a one-block plan
    uses as scratch; a folded plan's columns then merged per channel)."""
    if plan[NBLOCKS] == 1 and plan[FOLD] == 1:
        # one block: its shifted sums go straight into rows of stats, s1 into the variance's
        # row (written later), and are merged in place (merge_moments reads a channel's
        # sums before it writes its mean and m2): no arrays of C for a few rows of many
        # channels, whose fresh pages cost more than the data
        moments_pass(plan, x, stats[2:3], stats[1:2], stats[0:1])
        merge_moments(stats[2:3], stats[1:2], stats[0:1], counts, stats[0], stats[1])
        return
    shape = (plan[NBLOCKS], plan[CHANNELS])
    s1, s2, shift = np.empty(shape), np.empty(shape), np.empty(shape)
    moments_pass(plan, x, s1, s2, shift)
    if plan[FOLD] > 1:  # tiny planes seen as rows (fastbn._plan.TINY_PLANE_BYTES)
        columns = np.empty((2, plan[CHANNELS]))
        merge_moments(s1, s2, shift, counts, columns[0], columns[1])
        n_col = np.float64(plan[OUTER])
        fold_moments(columns[0], columns[1], n_col, plan[FOLD], stats[0], stats[1])
    else:
        merge_moments(s1, s2, shift, counts, stats[0], stats[1])


moments_op = _register(_moments)


@exact_borrowing
def _blend(running, batch, momentum):
    """``(1 - momentum) * running + momentum * batch``. Reassociated (fastmath, also
    after inlining) as ``running + momentum * (batch - running)`` it would turn an inf
    running value into NaN, so that case keeps the exact formula's answer explicitly."""
    if np.isfinite(running):
        return (1.0 - momentum) * running + momentum * batch
    return running + momentum * batch  # inf stays inf unless batch brings a NaN / -inf


@exact_borrowing
def update_running(running, batch, scale, momentum):
    """``running = (1 - momentum) * running + momentum * batch * scale`` per channel; a
    term whose factor is 0 is skipped, so ``momentum=1`` replaces an inf running value
    instead of making it NaN and ``momentum=0`` keeps it bit for bit."""
    if momentum == 0.0:
        return
    for c in range(_U(batch.shape[0])):
        value = batch[c] * scale
        if momentum == 1.0:
            running[c] = value
        else:
            running[c] = _blend(running[c], value, momentum)


@exact_borrowing
def _running(stats, n, ddof, running_mean, running_var, momentum, update_mean, update_var):
    """The running statistics' update from ``stats`` of ``n`` values per channel: the
    batch variance with ``ddof`` (1: unbiased, 0: biased) goes into ``running_var``."""
    if update_mean:
        update_running(running_mean, stats[0], 1.0, momentum)
    if update_var:
        update_running(running_var, stats[2], n / (n - ddof), momentum)


@exact_borrowing
def _check_variance(stats):
    """False when some variance is not finite; a NaN variance (a NaN or inf in the
    channel) makes that channel's mean NaN too."""
    finite = True
    for c in range(_U(stats.shape[1])):
        if not np.isfinite(stats[2, c]):
            finite = False
            if stats[2, c] != stats[2, c]:
                stats[0, c] = np.nan
    return finite


def _forward_eval(plan, x, y, gamma, beta, eps, stats, stream_bytes, relu):
    """``y = (x - mean) * invstd * gamma + beta`` with ``mean = stats[0]`` and
    ``invstd = stats[3] = 1 / sqrt(stats[2] + eps)`` (``relu``: ``max(0, y)``). Returns
    False when ``y`` must be redone in float64 (see ``coefficients``); the ``RELU`` targets
    return ``(that, work)``, the coefficients of the pass, which the ReLU-fused backward
    reads for its mask (``fastbn._activation``)."""
    mean, var, invstd = stats[0], stats[2], stats[3]
    C = mean.shape[0]
    scale, offset = np.empty(C), np.empty(C)
    normalizers(var, gamma, eps, invstd, scale)
    for c in range(_U(C)):  # float64 like the backward's q: one compilation of affine_op, not two
        offset[c] = beta[c]
    stub = new_work(y, np.int64(0))  # fwork: not read by a forward pass
    no_dy = np.bool_(False)
    clamped, work = affine_op(
        plan, x, x, y, mean, scale, offset, scale, mean, 1.0, no_dy, stream_bytes, stub, relu
    )
    if RELU:
        return not clamped, work
    else:
        return not clamped


forward_eval_op = _register(_forward_eval)


def _forward_train(
    plan, counts, x, y, gamma, beta, eps, stats, have_stats, stream_bytes, running, relu
):
    """Normalize with the batch statistics (``have_stats``: with those already in ``stats``:
    mean, m2 of ``n`` values) into ``y`` (``relu``: ``max(0, y)``), and update the running
    statistics.

    ``running`` is ``(running_mean, running_var, momentum, update_mean, update_var, ddof,
    n)``. Returns ``(finite, fits)``: False when some variance is not finite; False when
    ``y`` must be redone in float64 (see ``coefficients``). The ``RELU`` targets return
    ``(finite, fits, work)``, ``work`` as ``_forward_eval``'s."""
    if FUSED:  # statistics and y, channel by channel
        stream = y.size * y.itemsize >= stream_bytes
        scale = np.empty(plan[CHANNELS])
        work = new_work(y, plan[CHANNELS])
        shape = (plan[NBLOCKS], plan[CHANNELS])
        s1, s2, shift = np.empty(shape), np.empty(shape), np.empty(shape)
        fused_forward_pass(
            plan, x, y, gamma, beta, eps, counts, s1, s2, shift, stats, have_stats, running[6],
            scale, work, stream, relu,
        )  # fmt: skip
    else:
        if not have_stats:
            moments_op(plan, counts, x, stats)
        n = running[6]
        for c in range(_U(stats.shape[1])):
            stats[2, c] = stats[1, c] / n
    finite = _check_variance(stats)
    running_mean, running_var, momentum, update_mean, update_var, ddof, n = running
    _running(stats, n, ddof, running_mean, running_var, momentum, update_mean, update_var)
    if FUSED:
        if RELU:
            return finite, not any_clamped(work, plan[CHANNELS]), work
        else:
            return finite, not any_clamped(work, plan[CHANNELS])
    if RELU:
        fits, work = forward_eval_op(plan, x, y, gamma, beta, eps, stats, stream_bytes, relu)
        return finite, fits, work
    else:
        return finite, forward_eval_op(plan, x, y, gamma, beta, eps, stats, stream_bytes, relu)


_register(_forward_train)


def _grad_sums(plan, dy, x, mean, sums, fwork, relu):
    """``sums[0] = sum(dy)``, ``sums[1] = sum(dy * (x - mean))`` per channel (float64);
    ``relu``: of ``dy`` masked by the forward pre-activation (``fwork``, see ``gradsums``)."""
    fold = plan[FOLD]
    if fold == 1 and plan[NBLOCKS] == 1:  # one block: its sums are the channels' (no arrays)
        gradsums_pass(plan, dy, x, mean, sums[0:1], sums[1:2], fwork, relu)
        return
    shape = (plan[NBLOCKS], plan[CHANNELS])
    s1, s2 = np.empty(shape), np.empty(shape)
    if fold > 1:  # a folded plan's columns: the mean repeated, their sums merged per channel
        gradsums_pass(plan, dy, x, repeated(mean, fold), s1, s2, fwork, relu)
        columns = np.empty((2, plan[CHANNELS]))
        merge_sums(s1, s2, columns[0], columns[1])
        fold_sums(columns[0], columns[1], fold, sums[0], sums[1])
    else:
        gradsums_pass(plan, dy, x, mean, s1, s2, fwork, relu)
        merge_sums(s1, s2, sums[0], sums[1])


grad_sums_op = _register(_grad_sums)


@borrowing
def _masked_rows(dy, x, out, rm, rp, rq, C):
    """``out = dy * (pre > 0)`` over flat rows of ``C`` channels, ``pre = (x - rm) * rp +
    rq`` from the forward's coefficients (``fwork``'s rows, whose spare columns repeat the
    channels: ``coefficients.row_group`` rows per loop), the ReLU loops' mask.

    For the ReLU-fused training backward of small rows inputs (serial plans: below
    ``fastbn._plan.SERIAL_BELOW`` elements, in cache): ``dy`` masked once, then the plain
    passes, instead of masking it in both passes. Serial kernels called from a Numba loop
    (2026-12-03), ReLU over plain backward: (100, 100) float64 1.64x -> 1.41x, (64, 256)
    float32 1.48x -> 1.29x."""
    C = _U(C)
    group = _U(row_group(C, out.itemsize))
    size = _U(out.size)
    i0 = _U(0)
    while i0 < size:
        width = group * C if i0 + group * C <= size else C
        for j in range(width):
            out[i0 + j] = masked_dy_at(dy, x, i0 + j, rm[j], rp[j], rq[j])
        i0 += width


def _backward(
    plan, dy, x, dx, stats, gamma, n, training, grads, have_sums, stream_bytes, fwork, relu
):  # fmt: skip
    """``dx``, and ``grads[0:2]`` = (dgamma, dbeta) = (``sums[1] * invstd``, ``sums[0]``)
    from the gradient sums ``sums = grads[2:4]`` of ``dy`` (``have_sums``: the ones given
    there, e.g. summed over processes; ``n`` is then their number of values per channel),
    with ``mean = stats[0]``, ``invstd = stats[3]`` (the forward's ``(4, C)`` statistics:
    one array argument for the four rows, no views made per call in Python). ``relu`` (0
    or 1): ``dy`` is masked where the forward pre-activation, from the forward's
    coefficients ``fwork``, is not positive (see ``affine``). Returns False when ``dx``
    must be redone in float64 (see ``coefficients``)."""
    C = plan[CHANNELS]  # the columns of a folded plan
    fold = plan[FOLD]
    mean, invstd, sums = stats[0], stats[3], grads[2:4]
    coef = np.empty((3, C // fold))  # g, p, q of dx = dy * g + (x - mean) * p + q
    if FUSED:  # sums and dx, channel by channel (have_sums is False)
        stream = dx.size * dx.itemsize >= stream_bytes
        work = new_work(dx, C)
        s1, s2 = np.empty((1, C)), np.empty((1, C))
        fused_backward_pass(
            plan, dy, x, dx, mean, invstd, gamma, n, training, s1, s2, grads, coef, work,
            stream, fwork, relu,
        )  # fmt: skip
        for c in range(_U(C)):
            sums[0, c], sums[1, c] = s1[0, c], s2[0, c]
        return not any_clamped(work, C)
    passes_dy, passes_relu = dy, relu  # what the two passes read
    if RELU and relu == 1 and training and plan[INNER] == 1 and plan[PARALLEL] == 0:
        passes_dy = np.empty_like(dx)  # dy masked once (see _masked_rows)
        _masked_rows(dy, x, passes_dy, fwork[W_MEAN], fwork[W_SCALE], fwork[W_OFFSET], C)
        passes_relu = np.int64(0)
    if not have_sums:
        grad_sums_op(plan, passes_dy, x, mean, sums, fwork, passes_relu)
    for c in range(_U(C // fold)):
        fused.grad_params(c, sums[0, c], sums[1, c], invstd, gamma, n, training, grads, coef)
    g, p, q, dsum = coef[0], coef[1], coef[2], sums[0]
    if training:
        centred = np.bool_(True)
        clamped, _ = affine_op(
            plan, x, passes_dy, dx, mean, p, q, g, dsum, n, centred, stream_bytes, fwork,
            passes_relu,
        )  # fmt: skip
        return not clamped
    if RELU and relu:  # dx = masked dy * gamma * invstd: x is read for the mask only
        centred, mode = np.bool_(True), np.int64(2)
        clamped, _ = affine_op(
            plan, x, dy, dx, q, q, q, g, q, 1.0, centred, stream_bytes, fwork, mode
        )
        return not clamped
    # dx = dy * gamma * invstd: x is not read (a NaN there must not leak into dx)
    centred, mode = np.bool_(False), np.int64(0)
    clamped, _ = affine_op(plan, dy, dy, dx, q, g, q, g, q, 1.0, centred, stream_bytes, fwork, mode)
    return not clamped


_register(_backward)
