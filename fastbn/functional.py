"""Functional batch normalization: ``batch_norm`` and ``batch_norm_backward``.

Validation and views come from ``_checks``, the passes over memory from
``_launch``/``_kernels``. Semantics follow PyTorch's ``F.batch_norm``.
"""

import warnings

import numpy as np

from . import _activation, _checks, _launch, _stats

__all__ = ["batch_norm", "batch_norm_backward", "BatchNormCache"]

_FLOAT64 = np.dtype(np.float64)


class BatchNormCache:
    """What ``batch_norm_backward`` needs from a forward call; O(C) memory.

    Attributes: ``x`` (the forward input, by reference), ``mean``, ``invstd`` (float64,
    shape ``(C,)``, the statistics used to normalize), ``gamma`` (a copy, or None),
    ``has_beta``, ``training``, ``axis``, ``shape``, ``activation`` (None or ``"relu"``;
    with ``"relu"``, ``beta`` is a copy too, for backward's mask). ``xhat`` is never
    stored: backward recomputes it from ``x``. ``x_sample`` is a strided sample of about
    64 values of ``x`` (bits), which backward compares to detect that ``x`` was modified
    in between (best effort). ``count`` is None, or the number of values per channel of
    the ``stats=`` the forward call normalized with (backward's ``n``). ``fwork``: with
    ``"relu"``, the coefficients the forward's elementwise pass read (storage dtype,
    ``(WORK_ROWS, C + spare)``, see ``_kernels.coefficients``), from which backward
    recomputes the ReLU's mask.

    A cache may be used for any number of backward calls; backward never changes it.
    """

    __slots__ = ("x", "x_flat", "view", "gamma", "gamma_dtype", "beta_dtype", "stats")
    __slots__ += ("training", "x_sample", "count", "activation", "beta", "fwork")

    def __init__(
        self, x, x_flat, view, gamma_copy, gamma, beta, stats, training, activation=None,
        beta_copy=None, fwork=None,
    ):  # fmt: skip
        self.x, self.x_flat, self.view = x, x_flat, view
        self.gamma = gamma_copy
        self.gamma_dtype = None if gamma is None else gamma.dtype
        self.beta_dtype = None if beta is None else beta.dtype
        self.stats, self.training = stats, training
        step = view.sample_step
        self.x_sample = step, x_flat[::step].tobytes()  # as _checks.x_sample
        self.count = None
        self.activation, self.beta, self.fwork = activation, beta_copy, fwork

    def refill(self, x, x_flat, gamma, beta, training, fwork):
        """This cache rewritten for another call of its form (``call_again``'s ``reuse``;
        ``stats`` the kernels rewrote in place): the input, the snapshots of gamma (and
        of beta with ReLU), the mode, the coefficients and the sample of x."""
        self.x, self.x_flat = x, x_flat
        # new snapshots: a copy costs about half of np.copyto into the old one
        if gamma is not None:
            self.gamma = gamma.copy()
        if self.beta is not None:
            self.beta = beta.copy()
        self.training, self.fwork = training, fwork
        step = self.view.sample_step
        self.x_sample = step, x_flat[::step].tobytes()  # as _checks.x_sample
        return self

    @property
    def mean(self):
        return self.stats[0]

    @property
    def invstd(self):
        return self.stats[3]

    @property
    def plan(self):
        return self.view.plan

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
            f"training={self.training}"
            + ("" if self.activation is None else f", activation={self.activation!r}")
            + ")"
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
    running_var_ddof=1,
    stats=None,
    activation=None,
):
    """Batch normalization forward (optionally fused with a ReLU).

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
        momentum * batch``, with the unbiased batch variance for ``running_var``
        (see ``running_var_ddof``). For the textbooks' ``running = m * running +
        (1 - m) * batch``, pass ``momentum=1 - m``.
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
    running_var_ddof : int, 0 or 1
        The batch variance that updates ``running_var`` is ``sum((x - mean)**2) /
        (n - running_var_ddof)``: 1 (default) is the unbiased one (PyTorch), 0 the
        biased one (the textbook layers of "Deep Learning from Scratch" and CS231n).
        With 0, training on a single value per channel is allowed (variance 0:
        ``y = beta``, ``dx`` 0 up to the rounding of ``dy * gamma * invstd``); with 1
        it raises. Normalization always uses the biased variance.
    stats : fastbn.Moments or None
        Training only: normalize with ``stats.mean`` and ``stats.var(0)`` instead of the
        batch's statistics, and update the running statistics from them (unbiased with
        ``stats.count``), e.g. moments merged over processes. ``x`` may then be empty or
        hold one value per channel; ``stats.count`` must exceed 1. Backward uses
        ``stats.count`` as the number of values. ``stats=fastbn.moments(x)`` gives the
        bits of the call without it. Not with ``activation``.
    activation : None or "relu"
        ``"relu"``: ``y = np.maximum(batch_norm(x), 0)`` computed in the same pass (a NaN
        stays NaN); the backward of this cache then masks ``dy`` where the
        pre-activation was not positive, ``dy * (y > 0)``, inside its passes.

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
    if activation is not None:
        activation = _activation.check_activation(activation)
    if stats is None:
        view = _checks.quick_view(
            x, gamma, beta, training, running_mean, running_var, momentum, eps, axis,
            running_var_ddof, out,
        )  # fmt: skip
        if view is not None:
            return _quick(
                view, x, gamma, beta, training, running_mean, running_var, momentum, eps,
                activation, running_var_ddof, out,
            )  # fmt: skip
    relu = activation is not None
    if stats is not None:
        _stats.check_stats_type(stats)
        if relu:
            raise ValueError("stats= with activation='relu' is not supported; apply the ReLU apart")
    args = (x, gamma, beta, training, running_mean, running_var, momentum, eps, axis, out)
    x, view, gamma, beta, running_mean, running_var, momentum, eps, training, out, ddof = (
        _checks.forward_args(*args, running_var_ddof, stats)
    )
    plan = view.plan
    x_flat = view.flat(x)
    kernel_gamma, kernel_beta = _launch.params(plan, gamma, beta)
    y, y_flat = _output(view, out)
    given = stats
    fwork = None  # the ReLU-fused forward's coefficients (see BatchNormCache)
    if given is not None:
        train = (plan, x_flat, y_flat, kernel_gamma, kernel_beta, eps)
        stats, finite = _stats.forward_with_stats(
            *train, given, running_mean, running_var, momentum
        )
        if not finite:
            _warn_overflow(stats[2])
    elif not training:
        stats, fwork = _launch.forward_eval(
            plan, x_flat, y_flat, kernel_gamma, kernel_beta, eps, running_mean, running_var, relu
        )
    elif x.size:
        train = (plan, x_flat, y_flat, kernel_gamma, kernel_beta, eps)
        stats, finite, fwork = _launch.forward_train(
            *train, running_mean, running_var, momentum, ddof=ddof, relu=relu
        )
        if not finite:
            _warn_overflow(stats[2])
    else:
        stats = np.full((4, view.C), np.nan)
    y = _finish(view, y, out)
    gamma_copy = None if gamma is None else np.array(kernel_gamma)  # a snapshot for backward
    beta_copy = (None if beta is None else np.array(kernel_beta)) if relu else None
    cache = BatchNormCache(
        x, x_flat, view, gamma_copy, gamma, beta, stats, training, activation, beta_copy, fwork
    )
    if given is not None:
        cache.count = given.count
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
    invstd``. A cache of ``activation="relu"`` gives the gradients of the ReLU-fused
    forward: those of batch norm for ``dy * (y > 0)``.

    Raises ``ValueError`` when ``x`` was visibly modified since the forward call
    (a sample of its values is compared; see ``BatchNormCache``).
    """
    if sums is None and type(cache) is BatchNormCache:
        result = _backward_quick(dy, cache, out)
        if result is not None:
            return result
    dy, out = _checks.backward_args(dy, cache, out, BatchNormCache)
    if sums is not None:
        sums = _stats.check_sums(sums, cache)
        if cache.activation is not None:
            raise ValueError("sums= with a cache of activation='relu' is not supported")
    view = cache.view
    dy_flat = view.flat(dy)
    dx, dx_flat = _output(view, out)
    fwork = None
    if cache.activation is not None and dy.size:
        dy_flat, fwork = _activation.backward_inputs(cache, dy_flat)
    if cache.training and (sums is not None or cache.count is not None):
        dgamma_raw, sum_dy = _stats.backward_with_sums(view.plan, dy_flat, cache, dx_flat, sums)
    elif dy.size:
        dgamma_raw, sum_dy = _launch.backward(
            view.plan,
            dy_flat,
            cache.x_flat,
            dx_flat,
            cache.stats,
            cache.gamma,
            cache.training,
            fwork=fwork,
        )
    else:
        dgamma_raw, sum_dy = np.zeros(view.C), np.zeros(view.C)
    if sums is not None and not cache.training:  # dx = dy * gamma * invstd needs no sums
        dgamma_raw, sum_dy = sums[1] * cache.invstd, sums[0]
    dx = _finish(view, dx, out)
    # views of kernel-owned float64 rows when the dtype is float64 (no copy), else converted
    return dx, _as_param(dgamma_raw, cache.gamma_dtype), _as_param(sum_dy, cache.beta_dtype)


def _quick(
    view, x, gamma, beta, training, running_mean, running_var, momentum, eps, activation, ddof,
    out=None,
):  # fmt: skip
    """``batch_norm`` without ``stats``, for arguments that every check passes as they
    are (``_checks.quick_view``): ``x`` a plain C-contiguous array of ``view``'s shape and
    dtype whose memory's owner is known (itself or its base) and none of the others;
    ``gamma``, ``beta`` and the running arrays None or native contiguous float arrays of
    shape ``(C,)`` owning theirs (the running ones writable when training); ``eps`` and
    ``momentum`` float or ``np.float64``; ``out`` None or a writable C-contiguous array
    like ``x`` owning its memory (None for a channels-last ``x``)."""
    x_flat = view.quick_flat(x)
    if out is None:
        y, y_flat = view.empty()
    else:
        y, y_flat = out, out.ravel()
    relu = activation is not None
    stats, finite, fwork, kernel_gamma, kernel_beta = _launch.forward_quick(
        view.plan, x_flat, y_flat, gamma, beta, float(eps), running_mean, running_var, momentum,
        ddof if training else None, relu,
    )  # fmt: skip
    if not finite:
        _warn_overflow(stats[2])
    # snapshots for backward (a float64 conversion is one already)
    gamma_copy = None
    if gamma is not None:
        gamma_copy = kernel_gamma.copy() if kernel_gamma is gamma else kernel_gamma
    beta_copy = None
    if relu and beta is not None:
        beta_copy = kernel_beta.copy() if kernel_beta is beta else kernel_beta
    cache = BatchNormCache(
        x, x_flat, view, gamma_copy, gamma, beta, stats, training, activation, beta_copy, fwork
    )
    return y, cache


def call_again(
    view, x, gamma, beta, running_mean, running_var, momentum, eps, activation, training,
    out=None, reuse=None,
):  # fmt: skip
    """``batch_norm(x, gamma, beta, training=training, running_mean=..., running_var=...,
    momentum=momentum, eps=eps, axis=view.axis, activation=activation, out=out)`` for a
    caller that has checked that every argument is what an earlier successful call of
    that form validated (``_quick``'s conditions; gamma, beta and both running arrays of
    ``view``'s dtype, C-contiguous and writable when validated: the kernels read them
    as they are; ``out`` None or an array that ``_checks.plain_out`` accepts for ``x``).
    Skips every check: in eval mode the caller checks ``running_var``'s values first
    (``_checks.check_native_running_var``: a negative one raises ``batch_norm``'s error before
    anything is written). The layer's path for repeated calls.

    ``reuse``: None, or a cache that this function returned for an earlier call of the
    same form (view, gamma, beta, activation) and that nothing else will read (a layer's
    own, replaced by this call's): it is refilled and returned instead of a new one, its
    statistics written in place (two allocations and the object's construction less)."""
    plan = view.plan
    x_flat = view.quick_flat(x)
    y, y_flat = view.empty() if out is None else (out, out.ravel())
    relu = activation is not None
    kernel_gamma = plan.ones if gamma is None else gamma
    kernel_beta = plan.zeros if beta is None else beta
    stats = np.empty((4, plan.C)) if reuse is None else reuse.stats
    # float(): one compiled signature whatever number type the layer's attributes hold
    normalize = (plan, x_flat, y_flat, kernel_gamma, kernel_beta, float(eps), stats)
    finite = True
    if training:
        running = (running_mean, running_var, float(momentum), True, True, 1.0, plan.count)
        finite, fwork = _launch.train(*normalize, False, running, relu)
    else:
        stats[0], stats[2] = running_mean, running_var
        fwork = _launch.evaluate(*normalize, relu)
    if reuse is None:
        gamma_copy = None if gamma is None else gamma.copy()
        beta_copy = beta.copy() if relu and beta is not None else None
        cache = BatchNormCache(
            x, x_flat, view, gamma_copy, gamma, beta, stats, training, activation, beta_copy,
            fwork,
        )  # fmt: skip
    else:
        cache = reuse.refill(x, x_flat, gamma, beta, training, fwork)
    if not finite:  # warned once the cache is whole (a warning may be an error)
        _warn_overflow(stats[2])
    return y, cache


def _backward_quick(dy, cache, out):
    """``batch_norm_backward(dy, cache, out=out)`` of the common call, or None when it is
    not one: a plain ``dy`` of the forward's shape, storage dtype (float32 or float64) and
    memory layout (C-contiguous, or channels-last as ``x``: ``View.matches``), a cache
    without ``stats=``, ``out`` None or (C-contiguous layout only) an array the kernels
    write directly that overlaps nothing it must not (``_checks.plain_dx_out``)."""
    view = cache.view
    if cache.count is not None:
        return None
    if type(dy) is not np.ndarray or dy.dtype is not view.dtype or view.dtype is not view.compute:
        return None
    if dy.shape != view.shape or not view.matches(dy) or not dy.size:
        return None
    if out is not None and (view.channels_last or not _checks.plain_dx_out(out, dy, cache.x)):
        return None
    _checks.check_x_sample(cache.x_flat, cache.x_sample)
    dx, dx_flat = view.empty() if out is None else (out, out.ravel())
    dy_flat, fwork = view.quick_flat(dy), None
    if cache.activation is not None:
        dy_flat, fwork = _activation.backward_inputs(cache, dy_flat)
    grads = _launch.backward_quick(
        view.plan, dy_flat, cache.x_flat, dx_flat, cache.stats, cache.gamma, cache.training,
        fwork,
    )  # fmt: skip
    gamma_dtype, beta_dtype = cache.gamma_dtype, cache.beta_dtype
    if gamma_dtype is beta_dtype and gamma_dtype is not None:
        if gamma_dtype is not _FLOAT64:
            grads = grads[:2].astype(gamma_dtype)  # both in one conversion (float32 model)
        return dx, grads[0], grads[1]
    return dx, _as_param(grads[0], gamma_dtype), _as_param(grads[1], beta_dtype)


def _as_param(grad, dtype):
    """A float64 gradient row in its parameter's ``dtype`` (None: no parameter); the row
    itself for float64."""
    if dtype is None:
        return None
    return grad if dtype is _FLOAT64 else grad.astype(dtype)


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
