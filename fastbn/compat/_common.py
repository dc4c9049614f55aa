"""What the two textbook drop-ins share: the textbook conventions mapped onto
``fastbn.batch_norm`` / ``fastbn.batch_norm_backward``.

The textbook layers differ from fastbn's PyTorch conventions in three ways, each
handled here by an option of the functional API, never by patching outputs:

- momentum is the weight of the *old* running value, ``running = m * running +
  (1 - m) * batch``: fastbn is called with ``momentum=1 - m``;
- the running variance is updated with the *biased* batch variance:
  ``running_var_ddof=0`` (which also lets a batch of one sample train);
- the running arrays are *replaced* by new ones at every training call (the
  textbooks compute ``running = m * running + ...`` into a new array), so a
  reference to the old array, or the caller's initial array, never changes: fastbn
  updates a fresh O(C) copy in place.

Output dtypes follow NumPy's promotion of the textbook formulas: ``y = gamma * xhat +
beta`` has the dtype of ``x``, ``gamma`` and ``beta`` promoted together (and of the
running statistics in eval mode, where they enter the formula); when that is not
``x``'s dtype (a float32 ``x`` with the float64 parameters of the book's network),
``x`` is converted once and computed in the wider dtype.
"""

import numpy as np

from ..functional import batch_norm, batch_norm_backward

__all__ = ["Cache", "forward", "backward", "promoted", "check_momentum", "describe"]


def describe(a):
    """``array of shape ... and dtype ...`` or the type name, for messages."""
    if isinstance(a, np.ndarray):
        return f"array of shape {a.shape} and dtype {a.dtype}"
    return type(a).__name__


def promoted(*arrays):
    """NumPy's result dtype of the float arrays given, quickly when all agree. Others
    (None, lists, int arrays) are left out: fastbn rejects them by name."""
    first = None
    for a in arrays:
        dtype = getattr(a, "dtype", None)
        if dtype is None or dtype.kind != "f":
            continue
        if first is None:
            first = dtype
        elif dtype != first:
            dtypes = [getattr(a, "dtype", None) for a in arrays]
            return np.result_type(*[d for d in dtypes if d is not None and d.kind == "f"])
    return first


def check_momentum(momentum, name="momentum"):
    """The textbooks' momentum, the weight of the old running value: a real in [0, 1]."""
    if type(momentum) is float and 0.0 <= momentum <= 1.0:
        return momentum
    if isinstance(momentum, (bool, np.bool_)) or not isinstance(
        momentum, (int, float, np.integer, np.floating)
    ):
        raise TypeError(
            f"{name} must be a float in [0, 1] (the weight of the old running value), "
            f"got {type(momentum).__name__} {momentum!r}"
        )
    value = float(momentum)
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{name} must be in [0, 1] (the weight of the old running value), got {momentum!r}"
        )
    return value


class Cache:
    """What a drop-in's backward needs: fastbn's O(C) cache (which refers to the
    forward's input, never copies it) and the dtype of the caller's ``x``.

    ``bn``: the ``fastbn.BatchNormCache``; ``x_dtype``, ``gamma_dtype``: the dtypes of
    ``x`` and ``gamma`` as given (``gamma_dtype`` None without gamma: the gradients'
    dtypes follow the textbook formulas from them); ``shape``: the shape ``dout`` must
    have.
    """

    __slots__ = ("bn", "x_dtype", "gamma_dtype", "shape")

    def __init__(self, bn, x_dtype, gamma_dtype, shape):
        self.bn, self.x_dtype, self.gamma_dtype, self.shape = bn, x_dtype, gamma_dtype, shape

    def __repr__(self):
        return f"Cache(shape={self.shape}, dtype={self.x_dtype}, training={self.bn.training})"


def _replaced(running, name, x_dtype, C):
    """A new array holding ``running`` (zeros of float64 when None) in the dtype of the
    textbook update ``m * running + (1 - m) * batch_mean``, for fastbn to update in place.
    """
    if running is None:
        return np.zeros(C)
    if not isinstance(running, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(running).__name__}")
    dtype = running.dtype if running.dtype == x_dtype else np.result_type(running, x_dtype)
    return np.array(running, dtype=dtype)


def forward(x, gamma, beta, training, running_mean, running_var, momentum, eps, axis=1):
    """The textbook forward over channel ``axis`` of ``x`` with fastbn's kernels.

    ``x``: ndarray of shape ``(N, C)`` or ``(N, C, H, W)`` (any float dtype); ``gamma``,
    ``beta``: ``(C,)``; ``momentum``: the old value's weight (validated here);
    ``running_*``: ``(C,)`` or None. Training: returns ``(y, cache, running_mean,
    running_var)`` with *new* running arrays (None given: float64 zeros to start from),
    updated with the batch mean and biased batch variance. Eval: the running arrays are
    used (they must be given) and returned as they are.
    """
    if x.dtype.kind != "f":
        raise TypeError(f"x must have dtype float16, float32 or float64, got {describe(x)}")
    if training:
        momentum = check_momentum(momentum)
        dtype = promoted(x, gamma, beta)
        C = x.shape[axis] if x.ndim > axis else 0
        running_mean = _replaced(running_mean, "running_mean", x.dtype, C)
        running_var = _replaced(running_var, "running_var", x.dtype, C)
    else:
        dtype = promoted(x, gamma, beta, running_mean, running_var)
    x_dtype = x.dtype
    if dtype != x_dtype:
        x = x.astype(dtype)
    y, cache = batch_norm(
        x,
        gamma,
        beta,
        training=bool(training),
        running_mean=running_mean,
        running_var=running_var,
        momentum=1.0 - momentum if training else 0.0,
        eps=eps,
        axis=axis,
        running_var_ddof=0,
    )
    gamma_dtype = None if gamma is None else gamma.dtype
    return y, Cache(cache, x_dtype, gamma_dtype, x.shape), running_mean, running_var


def backward(dout, cache):
    """``(dx, dgamma, dbeta)`` for ``dout`` (an ndarray of ``cache.shape``) in the dtypes
    of the textbook formulas: ``dx`` that of ``gamma * dout / std`` (``gamma``, ``dout``
    and ``x`` promoted), ``dgamma`` that of ``xhat * dout`` (``x``, ``dout``), ``dbeta``
    that of ``dout``."""
    if dout.dtype.kind != "f":
        raise TypeError(f"dout must have dtype float16, float32 or float64, got {describe(dout)}")
    dx, dgamma, dbeta = batch_norm_backward(dout, cache.bn)
    x_dtype = cache.x_dtype
    if dout.dtype == x_dtype and cache.gamma_dtype in (x_dtype, None) and dx.dtype == x_dtype:
        if dbeta is None or dbeta.dtype == x_dtype:
            return dx, dgamma, dbeta  # one dtype throughout (the common case)
    gamma = None if cache.gamma_dtype is None else _Dtype(cache.gamma_dtype)
    dx_dtype = promoted(gamma, dout, _Dtype(x_dtype))
    if dx_dtype != dx.dtype:
        dx = dx.astype(dx_dtype)
    if dgamma is not None:
        dgamma = dgamma.astype(promoted(dout, _Dtype(x_dtype)), copy=False)
    if dbeta is not None:
        dbeta = dbeta.astype(dout.dtype, copy=False)
    return dx, dgamma, dbeta


class _Dtype:
    """A stand-in with just a ``dtype``, for ``promoted``."""

    __slots__ = ("dtype",)

    def __init__(self, dtype):
        self.dtype = dtype
