"""Validation with clear messages, and the canonical ``(outer, C, inner)`` view.

Everything a kernel needs is prepared here: dtype policy, the flat contiguous
buffers and the per-channel float64 parameters. Kernels never validate.

dtype policy: float32 and float64 are computed in place of the caller's memory
(float64 arithmetic inside); float16 is computed from a float32 copy and the
results are returned as float16. Non-native byte order is copied to native.
Other dtypes (int, bool, complex, object, ...) raise ``TypeError``.
"""

import math
import operator

import numpy as np

_COMPUTE = {
    np.dtype(np.float16): np.dtype(np.float32),
    np.dtype(np.float32): np.dtype(np.float32),
    np.dtype(np.float64): np.dtype(np.float64),
}


def _describe(a):
    return f"array of shape {a.shape} and dtype {a.dtype}"


def check_array(a, name):
    """``a`` as a float ndarray (native byte order); raise TypeError otherwise."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    native = a.dtype.newbyteorder("=") if a.dtype.byteorder not in "=|" else a.dtype
    if native not in _COMPUTE:
        raise TypeError(f"{name} must have dtype float16, float32 or float64, got {a.dtype}")
    if native != a.dtype or not a.dtype.isnative:
        a = a.astype(native)
    return a


class View:
    """How an array of ``shape`` maps onto the canonical ``(outer, C, inner)`` view.

    ``channels_last`` is True when the channel axis is physically innermost in a
    non-C-contiguous input (e.g. an NCHW array with NHWC memory); the flat buffers
    then hold the data in ``moveaxis(x, axis, -1)`` order with ``inner == 1``.
    """

    __slots__ = ("shape", "axis", "outer", "C", "inner", "channels_last", "dtype", "compute")

    def __init__(self, shape, axis, channels_last, dtype):
        self.shape, self.axis, self.channels_last = shape, axis, channels_last
        self.dtype = dtype
        self.compute = _COMPUTE[dtype]
        self.C = shape[axis]
        rest = math.prod(shape[:axis]) * math.prod(shape[axis + 1 :])
        if channels_last:
            self.outer, self.inner = rest, 1
        else:
            self.outer, self.inner = math.prod(shape[:axis]), math.prod(shape[axis + 1 :])

    @property
    def per_channel(self):
        """Number of values each channel's statistics are taken over."""
        return self.outer * self.inner

    def _moved_shape(self):
        return self.shape[: self.axis] + self.shape[self.axis + 1 :] + (self.C,)

    def flat(self, a):
        """A flat C-contiguous buffer of ``a`` (same shape as the view) in view order.

        A view of ``a`` when its memory already has that order, else one copy.
        """
        if a.dtype != self.compute:
            a = a.astype(self.compute)
        if self.channels_last:
            a = np.moveaxis(a, self.axis, -1)
        return np.ascontiguousarray(a).reshape(-1)

    def empty(self):
        """A new output: ``(user_array, flat_buffer)`` with x's memory layout."""
        if self.channels_last:
            moved = np.empty(self._moved_shape(), self.compute)
            return np.moveaxis(moved, -1, self.axis), moved.reshape(-1)
        a = np.empty(self.shape, self.compute)
        return a, a.reshape(-1)

    def writable_flat(self, out):
        """The flat buffer of ``out`` when kernels can write it directly, else None."""
        if out.dtype != self.compute:
            return None
        a = np.moveaxis(out, self.axis, -1) if self.channels_last else out
        return a.reshape(-1) if a.flags.c_contiguous else None


def check_axis(axis, ndim):
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an int, got {type(axis).__name__}") from None
    if isinstance(axis, (bool, np.bool_)):
        raise TypeError("axis must be an int, got bool")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis {axis} is out of range for an input with {ndim} dimensions "
            f"(expected -{ndim} <= axis < {ndim})"
        )
    return axis % ndim


def view_of(x, axis):
    """Validate ``x`` and ``axis`` -> ``(x_native, View)``."""
    x = check_array(x, "x")
    if x.ndim < 2:
        raise ValueError(
            f"x must have at least 2 dimensions (batch and channel), got "
            f"{_describe(x)}; reshape a single sample to (1, C) and a "
            f"1-d batch of one feature to (N, 1)"
        )
    axis = check_axis(axis, x.ndim)
    channels_last = (
        not x.flags.c_contiguous
        and axis != x.ndim - 1
        and np.moveaxis(x, axis, -1).flags.c_contiguous
    )
    return x, View(x.shape, axis, channels_last, x.dtype)


def check_same_shape(a, name, view):
    a = check_array(a, name)
    if a.shape != view.shape:
        raise ValueError(f"{name} must have the shape of x, {view.shape}, got {_describe(a)}")
    return a


def channel_param(p, name, C, *, writable=False):
    """A per-channel 1-D parameter of length C, or None. Returns the validated array."""
    if p is None:
        return None
    p = check_array(p, name) if not writable else _check_running(p, name)
    if p.shape != (C,):
        raise ValueError(
            f"{name} must have shape ({C},) to match the {C} channels of x, got {_describe(p)}"
        )
    return p


def _check_running(p, name):
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(p).__name__}")
    if p.dtype not in (np.float32, np.float64):
        raise TypeError(
            f"{name} must have dtype float32 or float64 (it is updated in place), got {p.dtype}"
        )
    if not p.flags.writeable:
        raise ValueError(f"{name} is read-only but must be updated in place when training")
    return p


def as_float64(p):
    return np.ascontiguousarray(p, dtype=np.float64)


def check_eps(eps):
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"eps must be a positive float, got {eps!r}") from None
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")
    return eps


def check_momentum(momentum):
    if momentum is None:
        raise ValueError(
            "momentum=None (cumulative average) needs a batch count: use "
            "fastbn.BatchNorm(momentum=None), or pass momentum=1/num_batches"
        )
    try:
        momentum = float(momentum)
    except (TypeError, ValueError):
        raise TypeError(f"momentum must be a float in [0, 1], got {momentum!r}") from None
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    return momentum


def check_out(out, view, inputs):
    """Validate a caller's ``out`` against ``view``; it may not overlap ``inputs``.

    ``inputs`` is a sequence of ``(name, array, same_ok)``: ``same_ok`` allows ``out``
    to be exactly that array (an elementwise in-place update that is safe).
    """
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != view.shape or out.dtype != view.dtype:
        raise ValueError(
            f"out must have shape {view.shape} and dtype {view.dtype}, got {_describe(out)}"
        )
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    for name, a, same_ok in inputs:
        if a is None:
            continue
        if same_ok and _same_memory(out, a):
            continue
        if _overlaps(out, a):
            raise ValueError(
                f"out overlaps {name}, which is still read while out is "
                f"written; pass a separate array"
            )
    return out


def _same_memory(a, b):
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.shape == b.shape
        and a.strides == b.strides
        and a.dtype == b.dtype
    )


def _overlaps(a, b):
    try:
        return bool(np.shares_memory(a, b, max_work=1000))
    except np.exceptions.TooHardError:  # too costly to decide exactly: be safe
        return True
