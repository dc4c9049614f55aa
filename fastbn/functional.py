"""Functional batch normalization: ``batch_norm`` and ``batch_norm_backward``.

Validation and views come from ``_checks``, the passes over memory from
``_launch``/``_kernels``. Semantics follow PyTorch's ``F.batch_norm``.
"""

import math
import warnings

import numpy as np

from . import _checks, _launch, _stats

__all__ = ["batch_norm", "batch_norm_backward", "BatchNormCache"]


class BatchNormCache:
    """What ``batch_norm_backward`` needs from a forward call; O(C) memory.

    Attributes: ``x`` (the forward input, by reference), ``mean``, ``invstd``
    (float64, shape ``(C,)``, the statistics used to normalize), ``gamma``,
    ``has_beta``, ``training``, ``axis``, ``shape``. ``xhat`` is never stored:
    backward recomputes it from ``x``. ``probe`` is a strided sample of about 64
    values of ``x`` (bits), which backward compares to detect that ``x`` was
    modified in between (best effort). ``count`` is None, or the number of values per
    channel of the ``stats=`` the forward call normalized with (backward's ``n``).

    A cache may be used for any number of backward calls; backward never changes it.
    """

    __slots__ = (
        "x",
        "x_flat",
        "view",
        "plan",
        "gamma",
        "gamma_dtype",
        "beta_dtype",
        "mean",
        "invstd",
        "training",
        "probe",
        "count",
    )

    def __init__(
        self, x, x_flat, view, plan, gamma, beta, mean, invstd, training, gamma_dtype=None
    ):
        self.x, self.x_flat, self.view, self.plan = x, x_flat, view, plan
        self.gamma = gamma
        self.gamma_dtype = gamma_dtype
        self.beta_dtype = None if beta is None else beta.dtype
        self.mean, self.invstd, self.training = mean, invstd, training
        self.probe = _checks.probe_of(x_flat)
        self.count = None

    @property
    def axis(self):
        return self.view.axis

    @property
    def shape(self):
        return self.view.shape

    @property
    def has_beta(self):
        return self.beta_dtype is not None

    def __repr__(self):
        return (
            f"BatchNormCache(shape={self.shape}, axis={self.axis}, dtype={self.view.dtype}, "
            f"training={self.training})"
        )


def batch_norm(
    x,
    gamma=None,
    beta=None,
    *,
    training=True,
    running_mean=None,
    running_var=None,
    momentum=0.1,
    eps=1e-5,
    axis=1,
    out=None,
    stats=None,
):
    """Batch normalization forward.

    Parameters
    ----------
    x : ndarray, float16/float32/float64, ndim >= 2
        Input. ``axis`` is its channel axis; statistics reduce over all other axes:
        ``(N, D)``, ``(N, C, L)``, ``(N, C, H, W)`` with ``axis=1``, channels-last
        with ``axis=-1``. Any memory layout is accepted (non-contiguous inputs
        that are not channels-last in memory are copied once).
    gamma, beta : ndarray of shape ``(C,)`` or None
        Scale and shift; None means 1 and 0 (no affine).
    training : bool
        True: normalize with the batch mean and biased batch variance, and update
        the running statistics if given. False: normalize with ``running_mean``
        and ``running_var`` (both required).
    running_mean, running_var : ndarray of shape ``(C,)``, float32/float64, or None
        Updated in place when training: ``running = (1 - momentum) * running +
        momentum * batch``, with the unbiased batch variance for ``running_var``.
    momentum : float in [0, 1]
        Only used when running statistics are updated; ``None`` (cumulative
        average) needs a batch count and is refused then: use ``BatchNorm``.
    eps : float > 0
        Added to the variance before the square root.
    axis : int
        The channel axis.
    out : ndarray or None
        Receives ``y``; same shape and dtype as ``x``, must not overlap ``x``,
        ``gamma``, ``beta`` or the running statistics.
    stats : fastbn.Moments or None
        Training only: normalize with ``stats.mean`` and ``stats.var(0)`` instead of the
        batch's statistics, and update the running statistics from them (unbiased with
        ``stats.count``), e.g. moments merged over processes. ``x`` may then be empty or
        hold one value per channel; ``stats.count`` must exceed 1. Backward uses
        ``stats.count`` as the number of values. ``stats=fastbn.moments(x)`` gives the
        bits of the call without it.

    Returns
    -------
    y : ndarray, shape and dtype of ``x`` (and its memory layout when new)
    cache : BatchNormCache
        For ``batch_norm_backward``. It refers to ``x``: do not modify ``x``
        before the backward call.

    Raises
    ------
    TypeError, ValueError
        For bad arguments, with the argument's name, shape and dtype. ValueError
        when training with a single value per channel or an empty batch, for a
        negative ``running_var`` in eval mode, and when an array written in place
        (``out``, the running statistics) overlaps another argument.

    A channel with any NaN or inf gets NaN ``mean`` and ``var`` and NaN outputs in
    training; the other channels are unaffected. Running statistics are updated
    with those NaN (as in PyTorch).
    """
    fast = out is None and training is True and stats is None
    view = _checks.fast_view(x, axis) if fast else None
    if (
        view is not None
        and type(eps) is float
        and 0.0 < eps < math.inf
        and view.per_channel > 1
        and _checks.fast_channel_params(view.C, gamma, beta, running_mean, running_var)
        and (running_mean is None or running_mean.flags.writeable)
        and (running_var is None or running_var.flags.writeable)
        and (
            (type(momentum) is float and 0.0 <= momentum <= 1.0)
            or (momentum is None and running_mean is None and running_var is None)
        )
        and _checks.owned_and_distinct(x, gamma, beta, running_mean, running_var)
    ):
        # the common case, validated quickly: every check below would pass
        C = view.C
    else:
        x, view = _checks.view_of(x, axis)
        C = view.C
        gamma = _checks.channel_param(gamma, "gamma", C)
        beta = _checks.channel_param(beta, "beta", C)
        eps = _checks.check_eps(eps)
        training = _checks.check_training(training)
        stats = _stats.check_stats(stats, C, training)
        if training:
            running_mean = _checks.channel_param(running_mean, "running_mean", C, writable=True)
            running_var = _checks.channel_param(running_var, "running_var", C, writable=True)
            updates = running_mean is not None or running_var is not None
            momentum = _checks.check_momentum(momentum, required=updates)
            if stats is None:
                _checks.check_batch(view, training)
            if running_mean is not None and running_var is not None and running_mean is running_var:
                raise ValueError("running_mean and running_var must be different arrays")
            _checks.check_disjoint(
                [("running_mean", running_mean), ("running_var", running_var)],
                [("x", x), ("gamma", gamma), ("beta", beta)],
            )
        else:
            if running_mean is None or running_var is None:
                raise ValueError("running_mean and running_var are required when training=False")
            running_mean = _checks.channel_param(running_mean, "running_mean", C)
            running_var = _checks.channel_param(running_var, "running_var", C)
            _checks.check_momentum(momentum, required=False)  # unused, but not nonsense
        if out is not None:
            out = _checks.check_out(
                out,
                view,
                [
                    ("x", x, False),
                    ("gamma", gamma, False),
                    ("beta", beta, False),
                    ("running_mean", running_mean, False),
                    ("running_var", running_var, False),
                ],
            )

    plan = _launch.plan_for(view.outer, C, view.inner, view.compute.itemsize)
    x_flat = view.flat(x)
    gamma64 = None if gamma is None else np.array(gamma, dtype=np.float64)  # a snapshot
    beta64 = None if beta is None else _checks.as_float64(beta)
    y, y_flat = _output(view, out)
    if stats is not None:
        mean, var, invstd, finite = _stats.forward_with_stats(
            plan, x_flat, y_flat, gamma64, beta64, eps, stats, running_mean, running_var, momentum
        )
        if not finite:
            _warn_overflow(var)
    elif training:
        if x.size:
            mean, var, invstd, finite = _launch.forward_train(
                plan, x_flat, y_flat, gamma64, beta64, eps, running_mean, running_var, momentum
            )
            if not finite:
                _warn_overflow(var)
        else:
            mean = var = invstd = np.full(C, np.nan)
    else:
        mean, var = _checks.as_float64(running_mean), _checks.as_float64(running_var)
        _checks.check_running_var(var)
        invstd = _launch.forward_eval(plan, x_flat, y_flat, gamma64, beta64, eps, mean, var)
    y = _finish(view, y, out)

    cache = BatchNormCache(
        x,
        x_flat,
        view,
        plan,
        gamma64,
        beta,
        mean,
        invstd,
        training,
        None if gamma is None else gamma.dtype,
    )
    if stats is not None:
        cache.count = stats.count
    return y, cache


def batch_norm_backward(dy, cache, *, out=None, sums=None):
    """Batch normalization backward.

    Parameters
    ----------
    dy : ndarray, shape and float dtype of the forward ``x``
        Gradient of the loss with respect to ``y``.
    cache : BatchNormCache
        The second value returned by ``batch_norm``.
    out : ndarray or None
        Receives ``dx``; shape and dtype of ``x``. May be ``dy`` itself (the update
        is elementwise), must not otherwise overlap ``dy`` or ``x``.

    sums : float64 ndarray of shape ``(2, C)`` or None
        Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` to use in place of this
        ``dy``'s (``fastbn.grad_sums``), e.g. summed over processes; ``dgamma`` and
        ``dbeta`` are then those of ``sums`` (``sums[1] * invstd``, ``sums[0]``). A cache
        from ``batch_norm(..., stats=)`` uses ``stats.count`` values per channel (without
        ``sums``: the local sums, the gradient of the loss of this ``dy`` alone).

    ``dy`` may have another float dtype than ``x``; it is converted to ``x``'s.

    Returns
    -------
    dx : ndarray, shape and dtype of ``x``
    dgamma, dbeta : ndarray of shape ``(C,)`` in the dtype of gamma / beta, or None
        when the forward call had no gamma / beta.

    In training mode the batch statistics depend on ``x``, which gives the full
    batch-norm gradient; in eval mode they are constants and ``dx = dy * gamma *
    invstd``.

    Raises ``ValueError`` when ``x`` was visibly modified since the forward call
    (a sample of its values is compared; see ``BatchNormCache``).
    """
    if not isinstance(cache, BatchNormCache):
        raise TypeError(
            f"cache must be the BatchNormCache returned by fastbn.batch_norm, "
            f"got {type(cache).__name__}"
        )
    view, plan = cache.view, cache.plan
    sums = _stats.check_sums(sums, cache)
    dy = _checks.check_same_shape(dy, "dy", view)
    _checks.check_probe(cache.x_flat, cache.probe)
    if out is not None:
        out = _checks.check_out(out, view, [("dy", dy, True), ("x", cache.x, False)])
    C = view.C
    dy_flat = view.flat(dy)
    dx, dx_flat = _output(view, out)
    if cache.training and (sums is not None or cache.count is not None):
        dgamma_raw, sum_dy = _stats.backward_with_sums(plan, dy_flat, cache, dx_flat, sums)
    elif dy.size:
        dgamma_raw, sum_dy = _launch.backward(
            plan,
            dy_flat,
            cache.x_flat,
            dx_flat,
            cache.mean,
            cache.invstd,
            cache.gamma,
            cache.training,
        )
    else:
        dgamma_raw, sum_dy = np.zeros(C), np.zeros(C)
    if sums is not None and not cache.training:  # dx = dy * gamma * invstd needs no sums
        dgamma_raw, sum_dy = sums[1] * cache.invstd, sums[0]
    dx = _finish(view, dx, out)
    dgamma = None if cache.gamma_dtype is None else dgamma_raw.astype(cache.gamma_dtype)
    dbeta = None if cache.beta_dtype is None else sum_dy.astype(cache.beta_dtype)
    return dx, dgamma, dbeta


def _output(view, out):
    """``(array, flat buffer)`` to write into: ``out`` itself when it can be, else new."""
    if out is not None:
        flat = view.writable_flat(out)
        if flat is not None:
            return out, flat
    return view.empty()


def _finish(view, result, out):
    """Copy into ``out`` when it could not be written directly; cast float16 back."""
    if out is not None:
        if result is not out:
            out[...] = result
        return out
    if result.dtype != view.dtype:
        result = result.astype(view.dtype)
    return result


def _warn_overflow(var):
    """An infinite variance can only come from finite values whose squared deviations
    overflow float64 (spread beyond ~1e154): warn, as NumPy's ``var`` does. (A NaN
    variance, from a NaN or inf in the channel, already made that channel's mean NaN.)"""
    over = np.flatnonzero(np.isinf(var))
    if over.size:
        warnings.warn(
            f"batch_norm: the variance of channels {over[:8].tolist()} overflows float64 "
            f"(values more than ~1e154 apart); their outputs equal beta",
            RuntimeWarning,
            stacklevel=3,
        )
