"""dtype policy and the canonical ``(outer, C, inner)`` view of an input.

float32 and float64 are computed in place of the caller's memory; float16 is computed
from a float32 copy and the results are returned as float16. Non-native byte order is
copied to native. Other dtypes (int, bool, complex, object, ...) raise ``TypeError``, and
so do masked arrays (the mask would be ignored). Other ndarray subclasses (memmap,
matrix) are read as plain ndarrays. A View also carries its shape's ``Plan``.
"""

import math
import operator

import numpy as np

from . import _memory, _plan

_COMPUTE = {
    np.dtype(np.float16): np.dtype(np.float32),
    np.dtype(np.float32): np.dtype(np.float32),
    np.dtype(np.float64): np.dtype(np.float64),
}

# Values sampled from x at forward time to detect (best effort) that x was
# modified before backward: a strided sample of about this many elements.


def _describe(a):
    return f"array of shape {a.shape} and dtype {a.dtype}"


def _native(dtype):
    return dtype.newbyteorder("=") if dtype.byteorder not in "=|" else dtype


def _check_ndarray(a, name):
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a masked array ({_describe(a)}); fastbn would ignore its mask. "
            f"Pass {name}.filled(value) or drop the masked values"
        )
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if type(a) is not np.ndarray:
        a = a.view(np.ndarray)
    return a


_FLOAT32, _FLOAT64 = np.dtype(np.float32), np.dtype(np.float64)
_FAST_DTYPES = (_FLOAT32, _FLOAT64)
# NumPy's own dtype object per float type. Arrays unpickled (a saved model, a dataset in a
# pickle) carry dtype objects equal to np.dtype(np.float32) but not that object; a View
# (cached per shape and dtype) made from one keeps NumPy's, whose identity the quick
# paths test.
_CANONICAL = {d: d for d in (np.dtype(np.float16), _FLOAT32, _FLOAT64)}
# values of x sampled into a cache, to notice that x changed before backward (``_checks``)
_X_SAMPLES = 64


def check_array(a, name):
    """``a`` as a float ndarray (native byte order); raise TypeError otherwise."""
    if type(a) is np.ndarray and a.dtype in _FAST_DTYPES:  # the common case, quickly
        return a
    a = _check_ndarray(a, name)
    native = _native(a.dtype)
    if native not in _COMPUTE:
        raise TypeError(
            f"{name} must have dtype float16, float32 or float64, got {_describe(a)}; "
            f"convert it first, e.g. {name}.astype(np.float32)"
        )
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
    __slots__ += ("plan", "small", "count", "sample_step", "to_memory", "to_user", "strides")

    def __init__(self, shape, axis, channels_last, dtype):
        self.shape, self.axis, self.channels_last = shape, axis, channels_last
        self.dtype = _CANONICAL.get(dtype, dtype)
        self.compute = _COMPUTE[dtype]
        self.C = shape[axis]
        rest = math.prod(shape[:axis]) * math.prod(shape[axis + 1 :])
        if channels_last:
            self.outer, self.inner = rest, 1
        else:
            self.outer, self.inner = math.prod(shape[:axis]), math.prod(shape[axis + 1 :])
        self.plan = _plan.plan_for(self.outer, self.C, self.inner, self.compute.itemsize)
        # outputs too small for recycled memory (``fastbn._memory``)
        self.small = math.prod(shape) * self.compute.itemsize < _memory.MIN_BYTES
        self.count = self.outer * self.inner  # values per channel
        self.sample_step = max(1, math.prod(shape) // _X_SAMPLES)  # see ``_checks.x_sample``
        # the axes in memory order (channels last) and back: transposes cheaper than moveaxis
        ndim = len(shape)
        self.to_memory = tuple(i for i in range(ndim) if i != axis) + (axis,)
        self.to_user = tuple(self.to_memory.index(i) for i in range(ndim))
        # the strides of an array of this view's shape and layout with its dtype
        moved = self._moved_shape() if channels_last else shape
        step, strides = self.dtype.itemsize, [0] * ndim
        for i in reversed(range(ndim)):
            strides[i] = step
            step *= moved[i]
        strides = tuple(strides)
        self.strides = (
            tuple(strides[self.to_user[i]] for i in range(ndim)) if channels_last else strides
        )

    def matches(self, a):
        """True when ``a`` (an ndarray of this view's shape and dtype) has its memory
        layout: C-contiguous, or for ``channels_last`` exactly the strides of an array
        whose channel axis is innermost (size-1 axes included: another stride there
        takes the checked path)."""
        if self.channels_last:
            return a.strides == self.strides
        return a.flags.c_contiguous

    def quick_flat(self, a):
        """The flat buffer of ``a`` (one that ``matches``) in view order, a view of it."""
        if self.channels_last:
            return a.transpose(self.to_memory).ravel()
        return a.ravel()

    @property
    def per_channel(self):
        """Number of values each channel's statistics are taken over."""
        return self.count

    def _moved_shape(self):
        return tuple(self.shape[i] for i in self.to_memory)

    def flat(self, a):
        """A flat C-contiguous buffer of ``a`` (same shape as the view) in view order.

        A view of ``a`` when its memory already has that order, else one copy.
        """
        if a.dtype != self.compute:
            a = a.astype(self.compute)
        if self.channels_last:
            a = a.transpose(self.to_memory)
        return np.ascontiguousarray(a).reshape(-1)

    def empty(self):
        """A new output: ``(user_array, flat_buffer)`` with x's memory layout."""
        if self.small and not self.channels_last:
            a = np.empty(self.shape, self.compute)
            return a, a.ravel()  # a view of a new C-contiguous array (faster than reshape)
        if self.channels_last:
            moved = _memory.empty(self._moved_shape(), self.compute)
            return moved.transpose(self.to_user), moved.ravel()
        a = _memory.empty(self.shape, self.compute)
        return a, a.ravel()

    def writable_flat(self, out):
        """The flat buffer of ``out`` when kernels can write it directly, else None."""
        if out.dtype != self.compute:
            return None
        a = out.transpose(self.to_memory) if self.channels_last else out
        return a.ravel() if a.flags.c_contiguous else None


def check_axis(axis, ndim):
    if isinstance(axis, (bool, np.bool_)):
        raise TypeError("axis must be an int, got bool")
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an int, got {type(axis).__name__}") from None
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


_views = {}


def fast_view(x, axis):
    """The View of a plain float32/float64 ``x``, C-contiguous or channels-last (an NCHW
    array with NHWC memory: ``View.matches``), with an in-range int ``axis``, from a
    small cache; None when any of that does not hold, and then the caller runs the full
    checks (``view_of``), which give the same View or the error."""
    if type(x) is not np.ndarray or type(axis) is not int:
        return None
    contiguous = x.flags.c_contiguous
    key = (x.shape, axis, x.dtype, contiguous)
    view = _views.get(key)
    if view is None:
        if x.dtype not in _FAST_DTYPES or x.ndim < 2 or not -x.ndim <= axis < x.ndim:
            return None
        axis %= x.ndim
        if not contiguous and (axis == x.ndim - 1 or x.ndim < 3):
            return None  # not channels-last (a 2-d input that is not C-contiguous either)
        if len(_views) > 256:
            _views.clear()
        view = _views[key] = View(x.shape, axis, not contiguous, x.dtype)
    if not contiguous and x.strides != view.strides:
        return None
    return view
