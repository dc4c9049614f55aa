"""``fastbn.fold``: absorb an eval-mode batch norm into the layer before it, for inference.

A linear or convolution layer computes, per output channel ``c``, ``z_c = sum(W_c * x) + b_c``
(``W_c`` the weights that produce channel ``c``). Eval-mode batch norm then computes
``y_c = gamma_c * (z_c - running_mean_c) / sqrt(running_var_c + eps) + beta_c``, an affine map
of ``z_c``. With ``s_c = gamma_c / sqrt(running_var_c + eps)``, the layer with weights
``s_c * W_c`` and bias ``s_c * (b_c - running_mean_c) + beta_c`` gives ``y`` directly: one
layer, no normalization at inference.
"""

import numbers
import operator
from collections.abc import Mapping

import numpy as np

from . import _checks
from .layer import BatchNorm

__all__ = ["fold"]

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_DICT_KEYS = {"gamma", "beta", "weight", "bias", "running_mean", "running_var"}
_DICT_KEYS_IGNORED = {"num_batches_tracked"}
_DEFAULT_EPS = 1e-5


def fold(weight, bias, bn, *, out_axis, eps=None):
    """The weights of a layer followed by eval-mode batch norm, as one layer.

    Parameters
    ----------
    weight : ndarray, float16/32/64, any shape with ``C`` entries on ``out_axis``
        The preceding layer's weights. ``out_axis`` is the axis that indexes its output
        channels: the book's ``Affine`` ``(in, out)`` -> 1 (or -1), a torch-style
        ``Linear`` ``(out, in)`` -> 0, a convolution ``OIHW`` -> 0, ``HWIO`` -> -1, a
        transposed convolution with ``groups=1`` (PyTorch's ``(in, out, kH, kW)``) -> 1.
    bias : ndarray of shape ``(C,)``, float16/32/64, or None
        The layer's bias; None means no bias (zeros).
    bn : fastbn.BatchNorm, or a mapping like ``BatchNorm.state_dict()``
        A layer: its running statistics, ``gamma``/``beta`` (when affine) and ``eps``; its
        mode does not matter (folding always gives the eval-mode layer). A layer built
        with ``track_running_stats=False`` has no running statistics and is refused. A
        mapping: ``running_mean`` and ``running_var`` (shape ``(C,)``) are required,
        ``gamma`` and ``beta`` (or PyTorch's ``weight`` and ``bias``) are optional (absent:
        1 and 0, as ``affine=False``); ``num_batches_tracked`` is ignored.
    out_axis : int
        See ``weight``; negative values count from the end. A wrong axis of the right
        length cannot be detected (a square ``Linear``; a transposed convolution given
        ``out_axis=0``, its input channels, when they are as many as its outputs).
    eps : positive float or None
        None: the layer's ``eps``, or 1e-5 (the default of ``BatchNorm``) for a mapping.

    Returns
    -------
    (weight_folded, bias_folded) : new ndarrays
        ``weight_folded`` has ``weight``'s shape and dtype; ``bias_folded`` has shape
        ``(C,)`` and ``bias``'s dtype (``weight``'s when ``bias`` is None). Both are
        computed in float64 and rounded once. No input is modified or shared.

    The folded layer's output equals batch norm in eval mode applied to the original
    layer's output, up to rounding (in float32 mostly the rounding of the weights).

    NaN policy: a NaN or infinity in ``weight``, ``bias`` or the statistics reaches only
    the output channels that it feeds, as it would without folding (a NaN
    ``running_var`` makes its channel's weights and bias NaN). A negative
    ``running_var`` raises ``ValueError``, as eval-mode ``batch_norm`` does.

    Refused with ``ValueError``: ``out_axis`` out of range; ``weight.shape[out_axis]``
    other than the ``C`` channels of ``bn`` (this is what happens for a grouped
    transposed convolution, whose weight holds ``C / groups`` channels on that axis:
    it cannot be folded this way); a ``bias`` of another shape. ``TypeError``: arguments
    that are not arrays of float16/32/64 (or a layer or mapping for ``bn``).
    """
    weight = _check_float_array(weight, "weight")
    axis = _check_out_axis(out_axis, weight.ndim)
    params, eps = _bn_params(bn, eps)
    C = params["running_var"].shape[0]
    if weight.shape[axis] != C:
        raise ValueError(
            f"weight has {weight.shape[axis]} output channels on out_axis={out_axis} "
            f"({_describe(weight)}), but bn has {C} channels. Check out_axis: (in, out) "
            f"weights use out_axis=1, (out, in) and OIHW use 0, HWIO uses -1. A grouped "
            f"transposed convolution cannot be folded this way: its weight holds "
            f"out_channels / groups channels on that axis"
        )
    if bias is not None:
        bias = _check_float_array(bias, "bias")
        if bias.shape != (C,):
            raise ValueError(
                f"bias must have shape ({C},) to match the {C} channels of bn, "
                f"got {_describe(bias)}"
            )
    scale = params["gamma"] / np.sqrt(params["running_var"] + eps)
    shape = [1] * weight.ndim
    shape[axis] = C
    weight_folded = weight.astype(np.float64) * scale.reshape(shape)
    b = np.zeros(C) if bias is None else bias.astype(np.float64)
    bias_folded = (b - params["running_mean"]) * scale + params["beta"]
    bias_dtype = weight.dtype if bias is None else bias.dtype
    return weight_folded.astype(weight.dtype), bias_folded.astype(bias_dtype)


def _describe(a):
    return f"array of shape {a.shape} and dtype {a.dtype}"


def _check_float_array(a, name):
    """``a`` as a plain ndarray of a native float16/32/64 dtype; TypeError otherwise."""
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array ({_describe(a)}); fold would ignore its mask")
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    native = a.dtype.newbyteorder("=")
    if native not in _FLOATS:
        hint = f"; convert it first, e.g. {name}.astype(np.float32)" if name.isidentifier() else ""
        raise TypeError(
            f"{name} must have dtype float16, float32 or float64, got {_describe(a)}{hint}"
        )
    return a.view(np.ndarray).astype(native, copy=False)


def _check_out_axis(out_axis, ndim):
    if isinstance(out_axis, (bool, np.bool_)) or not isinstance(out_axis, numbers.Integral):
        raise TypeError(f"out_axis must be an int, got {type(out_axis).__name__} {out_axis!r}")
    out_axis = operator.index(out_axis)
    if not -ndim <= out_axis < ndim:
        raise ValueError(
            f"out_axis {out_axis} is out of range for a weight with {ndim} dimensions "
            f"(expected -{ndim} <= out_axis < {ndim})"
        )
    return out_axis % ndim


def _bn_params(bn, eps):
    """``({gamma, beta, running_mean, running_var} as float64 (C,) arrays, eps)``."""
    if isinstance(bn, BatchNorm):
        if not bn.track_running_stats:
            raise ValueError(
                f"bn ({bn!r}) was built with track_running_stats=False: it has no running "
                f"statistics (it normalizes with each batch's), so there is nothing to fold"
            )
        raw = {"running_mean": bn.running_mean, "running_var": bn.running_var}
        if bn.affine:
            raw.update(gamma=bn.gamma, beta=bn.beta)
        default_eps = bn.eps
    elif isinstance(bn, Mapping):
        raw = _from_mapping(bn)
        default_eps = _DEFAULT_EPS
    else:
        raise TypeError(
            f"bn must be a fastbn.BatchNorm or a mapping like BatchNorm.state_dict(), "
            f"got {type(bn).__name__}"
        )
    eps = default_eps if eps is None else _checks.check_eps(eps)
    return _per_channel(raw), eps


def _from_mapping(state):
    unknown = set(state) - _DICT_KEYS - _DICT_KEYS_IGNORED
    if unknown:
        raise ValueError(
            f"bn has unknown keys {sorted(map(str, unknown))}; expected running_mean, "
            f"running_var and optionally gamma/beta (or weight/bias), num_batches_tracked"
        )
    raw = {}
    for name, torch_name in (("gamma", "weight"), ("beta", "bias")):
        if name in state and torch_name in state:
            raise ValueError(f"bn has both {name!r} and {torch_name!r}: pass one of them")
        for key in (name, torch_name):
            if key in state:
                raw[name] = state[key]
    for name in ("running_mean", "running_var"):
        if name not in state:
            raise ValueError(
                f"bn has no {name!r}: folding needs the running statistics "
                f"(running_mean and running_var)"
            )
        raw[name] = state[name]
    return raw


def _per_channel(raw):
    """Validate the per-channel arrays (same shape ``(C,)``, float) -> float64 copies,
    with gamma = 1 and beta = 0 where absent."""
    C = None
    out = {}
    for name in ("running_mean", "running_var", "gamma", "beta"):
        if raw.get(name) is None:
            continue
        a = _check_float_array(raw[name], f"bn's {name}")
        if a.ndim != 1 or (C is not None and a.shape[0] != C):
            expected = "a 1-d array" if C is None else f"shape ({C},) like running_mean"
            raise ValueError(f"bn's {name} must be {expected}, got {_describe(a)}")
        C = a.shape[0]
        out[name] = np.array(a, dtype=np.float64)
    out.setdefault("gamma", np.ones(C))
    out.setdefault("beta", np.zeros(C))
    _checks.check_running_var(out["running_var"], "bn's running_var")
    return out
