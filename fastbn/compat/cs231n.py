"""The batch-norm functions of the CS231n assignments (``cs231n/layers.py``), computed
with fastbn's kernels.

Replace ``from cs231n.layers import batchnorm_forward, ...`` by ``from fastbn.compat.cs231n
import batchnorm_forward, ...`` (or ``from fastbn.compat import cs231n``); nothing else
changes. The functions:

``batchnorm_forward(x, gamma, beta, bn_param) -> (out, cache)``
    ``x`` of shape ``(N, D)``, ``gamma`` and ``beta`` of shape ``(D,)``.
``batchnorm_backward(dout, cache) -> (dx, dgamma, dbeta)``, ``batchnorm_backward_alt``
    The same gradients (the assignment's two derivations of one formula).
``spatial_batchnorm_forward(x, gamma, beta, bn_param)``, ``spatial_batchnorm_backward``
    ``x`` of shape ``(N, C, H, W)``, statistics per channel over ``N, H, W`` (computed in
    place: no transpose to ``(N*H*W, C)``).

``bn_param`` is a dict: ``mode`` ``'train'`` or ``'test'`` (required; anything else
raises ``ValueError`` naming it, and the call changes nothing); ``eps`` (default 1e-5);
``momentum`` (default 0.9), the weight of the old running value, ``running =
momentum * running + (1 - momentum) * batch``; ``running_mean`` and ``running_var``,
created as zeros of ``x``'s dtype when absent and stored back into the dict by every
call. Training replaces them by new arrays (updated with the batch mean and the biased
batch variance): an array kept from before is not changed. Test mode normalizes with
them.

Output dtypes are those of the assignment's formulas (``gamma * xhat + beta``: ``x``,
``gamma``, ``beta``, and the running statistics in test mode, promoted together). A
batch of one sample trains (output ``beta``). The cache is O(D) (fastbn keeps no
``xhat``, ``x - mean`` or ``sqrt(var + eps)`` of size ``N x D``); it refers to ``x``, so
``x`` must not be modified before the backward call. A backward after a test-mode
forward gives the gradient of the test-mode function (``dx = dout * gamma /
sqrt(running_var + eps)``). Shapes that do not match ``gamma`` raise ``ValueError``
naming the array, before anything is stored.
"""

import numpy as np

from . import _common

__all__ = [
    "batchnorm_forward",
    "batchnorm_backward",
    "batchnorm_backward_alt",
    "spatial_batchnorm_forward",
    "spatial_batchnorm_backward",
]

_MODES = ("train", "test")


def batchnorm_forward(x, gamma, beta, bn_param):
    """Batch normalization of ``x`` ``(N, D)`` per feature.

    Parameters: ``x`` float ndarray ``(N, D)``; ``gamma``, ``beta`` ``(D,)``;
    ``bn_param`` dict (see the module docstring), whose ``running_mean`` and
    ``running_var`` (``(D,)``) are stored back. Returns ``(out, cache)``: ``out`` of
    shape ``(N, D)``, ``cache`` for ``batchnorm_backward``.
    """
    return _forward(x, gamma, beta, bn_param, 2, "(N, D)")


def batchnorm_backward(dout, cache):
    """Gradients of ``batchnorm_forward``: ``dout`` ``(N, D)`` -> ``(dx, dgamma, dbeta)``
    with shapes ``(N, D)``, ``(D,)``, ``(D,)``."""
    return _backward(dout, cache)


def batchnorm_backward_alt(dout, cache):
    """``batchnorm_backward`` (the assignment's simplified derivation gives the same
    gradients; fastbn computes them in one way)."""
    return _backward(dout, cache)


def spatial_batchnorm_forward(x, gamma, beta, bn_param):
    """Batch normalization of ``x`` ``(N, C, H, W)`` per channel (over ``N, H, W``).

    ``gamma``, ``beta``, ``running_mean``, ``running_var``: ``(C,)``. Returns ``(out,
    cache)``, ``out`` of shape ``(N, C, H, W)``.
    """
    return _forward(x, gamma, beta, bn_param, 4, "(N, C, H, W)")


def spatial_batchnorm_backward(dout, cache):
    """Gradients of ``spatial_batchnorm_forward``: ``dout`` ``(N, C, H, W)`` ->
    ``(dx, dgamma, dbeta)`` with shapes ``(N, C, H, W)``, ``(C,)``, ``(C,)``."""
    return _backward(dout, cache)


def _forward(x, gamma, beta, bn_param, ndim, layout):
    if not isinstance(bn_param, dict):
        raise TypeError(f"bn_param must be a dict, got {type(bn_param).__name__}")
    mode = bn_param.get("mode")
    if not (type(mode) is str and mode in _MODES):
        if "mode" not in bn_param:
            raise ValueError("bn_param has no 'mode': it must be 'train' or 'test'")
        raise ValueError(f"Invalid forward batchnorm mode {mode!r}: expected 'train' or 'test'")
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a numpy.ndarray, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"x must have shape {layout}, got {_common.describe(x)}")
    training = mode == "train"
    momentum = bn_param.get("momentum", 0.9)
    if training:
        _common.check_momentum(momentum, "bn_param['momentum']")
    running_mean = bn_param.get("running_mean")
    running_var = bn_param.get("running_var")
    if running_mean is None:
        running_mean = np.zeros(x.shape[1], dtype=x.dtype)
    if running_var is None:
        running_var = np.zeros(x.shape[1], dtype=x.dtype)
    out, cache, running_mean, running_var = _common.forward(
        x,
        gamma,
        beta,
        training,
        running_mean,
        running_var,
        momentum,
        bn_param.get("eps", 1e-5),
    )
    bn_param["running_mean"] = running_mean
    bn_param["running_var"] = running_var
    return out, cache


def _backward(dout, cache):
    if not isinstance(cache, _common.Cache):
        raise TypeError(
            f"cache must be the cache returned by fastbn.compat.cs231n's forward functions, "
            f"got {type(cache).__name__}"
        )
    if not isinstance(dout, np.ndarray):
        raise TypeError(f"dout must be a numpy.ndarray, got {type(dout).__name__}")
    if dout.shape != cache.shape:
        raise ValueError(
            f"dout must have the shape of the forward output, {cache.shape}, "
            f"got {_common.describe(dout)}"
        )
    return _common.backward(dout, cache)
