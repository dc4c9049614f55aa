"""The naive NumPy batch normalization: the test oracle and the benchmark baseline.

These are the textbook formulas (Ioffe & Szegedy 2015; the staged backward of the
"Deep Learning from Scratch" / CS231n layer), written plainly so that they are
obviously right. They make about ten passes over memory, store ``xhat`` in the
cache (an N-sized copy) and compute in the input's own dtype, so float32 inputs
with a large offset lose digits here. Use ``fastbn.batch_norm`` for real work.

The signatures match ``fastbn.batch_norm`` / ``fastbn.batch_norm_backward``:

``batch_norm(x, gamma, beta, *, training=True, running_mean=None, running_var=None,
momentum=0.1, eps=1e-5, axis=1, out=None, running_var_ddof=1) -> (y, cache)``

``batch_norm_backward(dy, cache, *, out=None) -> (dx, dgamma, dbeta)``

This module depends on NumPy only; it validates nothing beyond what NumPy does.
"""

import numpy as np

__all__ = ["batch_norm", "batch_norm_backward"]


def _to_rows(a, axis):
    """View/copy ``a`` as a 2-D ``(M, C)`` array with the channel axis last."""
    moved = np.moveaxis(a, axis, -1)
    return moved.reshape(-1, moved.shape[-1]), moved.shape


def _from_rows(rows, moved_shape, axis):
    return np.moveaxis(rows.reshape(moved_shape), -1, axis)


def batch_norm(
    x,
    gamma,
    beta,
    *,
    training=True,
    running_mean=None,
    running_var=None,
    momentum=0.1,
    eps=1e-5,
    axis=1,
    out=None,
    running_var_ddof=1,
):
    """Naive batch normalization forward. See the module docstring."""
    x = np.asarray(x)
    axis = axis % x.ndim
    xr, moved_shape = _to_rows(x, axis)
    m = xr.shape[0]
    if training:
        if m <= running_var_ddof:
            raise ValueError("Expected more than 1 value per channel when training")
        mu = xr.mean(axis=0)
        xc = xr - mu
        var = np.mean(xc**2, axis=0)
        if running_mean is not None:
            running_mean *= 1 - momentum
            running_mean += momentum * mu
        if running_var is not None:
            running_var *= 1 - momentum
            running_var += momentum * var * m / (m - 1) if running_var_ddof else momentum * var
    else:
        mu = running_mean.astype(x.dtype)
        var = running_var.astype(x.dtype)
        xc = xr - mu
    std = np.sqrt(var + eps)
    xn = xc / std
    yr = xn
    if gamma is not None:
        yr = gamma.astype(x.dtype) * yr
    if beta is not None:
        yr = yr + beta.astype(x.dtype)
    y = _from_rows(yr.astype(x.dtype, copy=False), moved_shape, axis)
    if out is not None:
        out[...] = y
        y = out
    cache = {
        "xc": xc,
        "xn": xn,
        "std": std,
        "gamma": gamma,
        "beta": beta,
        "axis": axis,
        "training": training,
        "moved_shape": moved_shape,
        "dtype": x.dtype,
    }
    return y, cache


def batch_norm_backward(dy, cache, *, out=None):
    """Naive staged batch normalization backward. See the module docstring."""
    axis = cache["axis"]
    dout, _ = _to_rows(np.asarray(dy), axis)
    xc, xn, std, gamma = cache["xc"], cache["xn"], cache["std"], cache["gamma"]
    m = dout.shape[0]
    dbeta = dout.sum(axis=0)
    dgamma = np.sum(xn * dout, axis=0)
    dxn = dout if gamma is None else gamma.astype(dout.dtype) * dout
    if cache["training"]:
        dxc = dxn / std
        dstd = -np.sum((dxn * xc) / (std * std), axis=0)
        dvar = 0.5 * dstd / std
        dxc += (2.0 / m) * xc * dvar
        dmu = np.sum(dxc, axis=0)
        dxr = dxc - dmu / m
    else:
        dxr = dxn / std
    dx = _from_rows(dxr.astype(cache["dtype"], copy=False), cache["moved_shape"], axis)
    if out is not None:
        out[...] = dx
        dx = out
    dgamma = None if gamma is None else dgamma.astype(gamma.dtype)
    dbeta = None if cache["beta"] is None else dbeta.astype(cache["beta"].dtype)
    return dx, dgamma, dbeta
