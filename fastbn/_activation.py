"""Batch norm fused with a ReLU (``activation="relu"``): argument check and what backward
needs of the forward.

Forward writes ``y = np.maximum(gamma * xhat + beta, 0)`` in the elementwise pass
(``fastbn._kernels.affine``). Backward masks ``dy`` where that pre-activation was not
positive, ``dy * (pre > 0)``, inside its two passes; the mask is recomputed from ``x``
and the forward's per-channel coefficients (``work``: the mean, scale and offset rounded
to the storage dtype), which the forward's kernels return and the cache keeps
(``BatchNormCache.fwork``, O(C)): the mask is ``y > 0`` of the forward's ``y``, bit for
bit.
"""

import numpy as np

from ._kernels import coefficients

ACTIVATIONS = ("relu",)


def check_activation(activation):
    """``activation`` itself when it is None or ``"relu"``; TypeError for a non-str,
    ValueError for another name."""
    if activation is None:
        return None
    if isinstance(activation, str) and activation == "relu":
        return "relu"
    if not isinstance(activation, str):
        raise TypeError(
            f"activation must be None or a str ('relu'), got {type(activation).__name__} "
            f"{activation!r}"
        )
    raise ValueError(f"activation must be None or 'relu', got {activation!r}")


def _coefficient_inputs(cache):
    """The float64 inputs of the forward's coefficients: mean, scale, beta."""
    plan = cache.view.plan
    gamma = plan.ones if cache.gamma is None else cache.gamma
    beta = plan.zeros if cache.beta is None else cache.beta
    return cache.stats[0], cache.stats[3] * gamma, beta


def backward_inputs(cache, dy_flat):
    """``(dy_flat, fwork)`` for ``fastbn._launch.backward``: ``fwork`` the forward's
    coefficients, for the fused kernels; or, when the forward redid its elementwise pass
    in NumPy float64 (a coefficient beyond float32, see ``coefficients``), ``dy`` masked
    here by that pass's output and ``fwork`` None (plain backward of the masked ``dy``)."""
    fwork = cache.fwork
    plan = cache.view.plan
    # float64 coefficients always fit float64 storage: only float32 ones can be clamped
    if fwork.itemsize == 8 or not coefficients.any_clamped(fwork, plan.columns):
        return dy_flat, fwork
    from ._launch import _affine_float64  # the forward's float64 pass (imports this module)

    mean, scale, beta = _coefficient_inputs(cache)
    y_bn = np.empty_like(cache.x_flat)
    _affine_float64(plan, y_bn, cache.x_flat, mean, scale, beta)
    return dy_flat * (y_bn > 0), None


def masked_dy(plan, dy, x, fwork):
    """``dy * (pre > 0)`` with the forward's pre-activation ``pre``, by the elementwise
    pass's eval-mode ReLU step with unit coefficients (a new flat array, storage dtype)."""
    from ._launch import _call  # (imports this module)

    out = np.empty_like(dy)
    zeros, ones = np.zeros(plan.columns), np.ones(plan.columns)  # per kernel column
    coef = (zeros, zeros, zeros, ones, zeros, 1.0, True, 1 << 62, fwork, 2)
    args = (plan.ints, x, dy, out) + coef
    _call(plan, "affine", False, True, args)
    return out
