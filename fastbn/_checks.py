"""Validation with clear messages, and the canonical ``(outer, C, inner)`` view.

Everything a kernel needs is prepared here: dtype policy, the flat contiguous
buffers and the per-channel float64 parameters. Kernels never validate.

dtype policy: float32 and float64 are computed in place of the caller's memory
(float64 arithmetic inside); float16 is computed from a float32 copy and the
results are returned as float16. Non-native byte order is copied to native.
Other dtypes (int, bool, complex, object, ...) raise ``TypeError``, and so do
masked arrays (the mask would be ignored). Other ndarray subclasses (memmap,
matrix) are read as plain ndarrays.

Every message names the argument, what it got (shape and dtype for arrays) and
what was expected.
"""

import math
import numbers
import operator

import numpy as np

from . import _memory

_COMPUTE = {
    np.dtype(np.float16): np.dtype(np.float32),
    np.dtype(np.float32): np.dtype(np.float32),
    np.dtype(np.float64): np.dtype(np.float64),
}

# Values sampled from x at forward time to detect (best effort) that x was
# modified before backward: a strided sample of about this many elements.
_PROBE_SAMPLES = 64

_TooHardError = getattr(np, "exceptions", np).TooHardError


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
            moved = _memory.empty(self._moved_shape(), self.compute)
            return np.moveaxis(moved, -1, self.axis), moved.reshape(-1)
        a = _memory.empty(self.shape, self.compute)
        return a, a.reshape(-1)

    def writable_flat(self, out):
        """The flat buffer of ``out`` when kernels can write it directly, else None."""
        if out.dtype != self.compute:
            return None
        a = np.moveaxis(out, self.axis, -1) if self.channels_last else out
        return a.reshape(-1) if a.flags.c_contiguous else None


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
    """The View of a plain C-contiguous float32/float64 ``x`` with an in-range int ``axis``,
    from a small cache; None when any of that does not hold, and then the caller runs
    the full checks (``view_of``), which give the same View or the error."""
    if type(x) is not np.ndarray or type(axis) is not int or not x.flags.c_contiguous:
        return None
    key = (x.shape, axis, x.dtype)
    view = _views.get(key)
    if view is None:
        if x.dtype not in _FAST_DTYPES or x.ndim < 2 or not -x.ndim <= axis < x.ndim:
            return None
        if len(_views) > 256:
            _views.clear()
        view = _views[key] = View(x.shape, axis % x.ndim, False, x.dtype)
    return view


def fast_channel_params(C, *params):
    """True when every parameter is None or a plain native float32/float64 array of shape
    (C,)."""
    for p in params:
        if p is not None and not (
            type(p) is np.ndarray
            and (p.dtype is _FLOAT32 or p.dtype is _FLOAT64)
            and p.ndim == 1
            and p.shape[0] == C
        ):
            return False
    return True


def owned_and_distinct(*arrays):
    """True when the arrays given (None skipped) each own their buffer and are distinct
    objects: then none can overlap another (the quick form of ``check_disjoint``). An
    output whose memory fastbn recycles (``fastbn._memory``) owns it through its lease."""
    seen = []
    for a in arrays:
        if a is None:
            continue
        base = a.base
        if base is not None and type(base) is not _memory.Lease:
            return False
        for b in seen:
            if b is a:
                return False
        seen.append(a)
    return True


def check_batch(view, training, running_var_ddof=1):
    """Training needs more than ``running_var_ddof`` values per channel: more than one
    for the unbiased running variance (as in PyTorch), at least one for the biased."""
    if not training or view.per_channel > running_var_ddof:
        return
    if view.per_channel == 0:
        got = "an empty batch"
    else:
        got = "a single value per channel"
    need = "more than 1 value" if running_var_ddof else "at least 1 value"
    raise ValueError(
        f"Expected {need} per channel when training, got {got}: x has shape "
        f"{view.shape} with channel axis {view.axis}. Use training=False (running "
        f"statistics) for such inputs"
        + ("" if view.per_channel == 0 else ", or running_var_ddof=0 (biased running variance)")
    )


def check_same_shape(a, name, view):
    a = check_array(a, name)
    if a.shape != view.shape:
        raise ValueError(f"{name} must have the shape of x, {view.shape}, got {_describe(a)}")
    return a


def channel_param(p, name, C, *, writable=False):
    """A per-channel 1-D parameter of length C, or None. Returns the validated array.

    ``writable``: the array is updated in place (running statistics when training),
    so it is returned as is (any float dtype and byte order), never as a copy.
    """
    if p is None:
        return None
    p = _check_running(p, name) if writable else check_array(p, name)
    if p.shape != (C,):
        raise ValueError(
            f"{name} must have shape ({C},) to match the {C} channels of x, got {_describe(p)}"
        )
    return p


def _check_running(p, name):
    p = _check_ndarray(p, name)
    if _native(p.dtype) not in _COMPUTE:
        raise TypeError(
            f"{name} must have dtype float16, float32 or float64 (it is updated in place), "
            f"got {_describe(p)}"
        )
    if not p.flags.writeable:
        raise ValueError(
            f"{name} is read-only ({_describe(p)}) but must be updated in place when training"
        )
    return p


def check_running_var(var, name="running_var"):
    """``var`` (float64) must not be negative (NaN passes through: NaN policy)."""
    if var.size and np.fmin.reduce(var) < 0:  # fmin: NaN does not hide a negative
        bad = np.flatnonzero(var < 0)
        raise ValueError(
            f"{name} must be >= 0, got negative values at channels {bad[:8].tolist()}"
            f"{' ...' if bad.size > 8 else ''} (e.g. {float(var[bad[0]])!r})"
        )


def as_float64(p):
    """A float64 copy of ``p``: a snapshot, so later writes to ``p`` (or to ``out``
    overlapping it) cannot change what a kernel or a cache reads."""
    return np.array(p, dtype=np.float64)


def _real(value):
    if type(value) is float:  # the common case, without the slow ABC check
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_eps(eps):
    if not _real(eps):
        raise TypeError(f"eps must be a positive float, got {type(eps).__name__} {eps!r}")
    eps = float(eps)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")
    return eps


def check_momentum(momentum, *, required=True):
    """A float in [0, 1]. ``None`` (cumulative average) is only possible in the layer,
    which counts batches: the functional form raises when it would be used
    (``required``) and passes it through otherwise."""
    if momentum is None:
        if not required:
            return None
        raise ValueError(
            "momentum=None (cumulative average) needs a batch count: use "
            "fastbn.BatchNorm(momentum=None), or pass momentum=1/num_batches"
        )
    if not _real(momentum):
        raise TypeError(
            f"momentum must be a float in [0, 1], got {type(momentum).__name__} {momentum!r}"
        )
    momentum = float(momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    return momentum


def check_ddof(ddof, name="running_var_ddof"):
    """0 (biased) or 1 (unbiased): an int, not a bool."""
    if isinstance(ddof, (bool, np.bool_)) or not isinstance(ddof, (int, np.integer)):
        raise TypeError(f"{name} must be the int 0 or 1, got {type(ddof).__name__} {ddof!r}")
    if ddof not in (0, 1):
        raise ValueError(f"{name} must be 0 (biased) or 1 (unbiased), got {ddof!r}")
    return int(ddof)


def check_training(training):
    if isinstance(training, (bool, np.bool_)):
        return bool(training)
    raise TypeError(f"training must be a bool, got {type(training).__name__} {training!r}")


def check_out(out, view, inputs):
    """Validate a caller's ``out`` against ``view``; it may not overlap ``inputs``.

    ``inputs`` is a sequence of ``(name, array, same_ok)``: ``same_ok`` allows ``out``
    to be exactly that array (an elementwise in-place update that is safe).
    ``out`` may have non-native byte order (the result is then copied into it).
    """
    if isinstance(out, np.ma.MaskedArray) or not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != view.shape or _native(out.dtype) != view.dtype:
        raise ValueError(
            f"out must have shape {view.shape} and dtype {view.dtype} (those of x), "
            f"got {_describe(out)}"
        )
    if not out.flags.writeable:
        raise ValueError(f"out is read-only ({_describe(out)})")
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


def check_disjoint(written, read):
    """Arrays written in place (``[(name, array)]``) share no memory with each other
    or with the arrays ``read``; None entries are skipped."""
    written = [(n, a) for n, a in written if a is not None]
    if not written:
        return
    read = [(n, a) for n, a in read if a is not None]
    arrays = [a for _, a in written + read]
    if all(a.base is None for a in arrays) and len({id(a) for a in arrays}) == len(arrays):
        return  # distinct arrays that each own their buffer (the common case)
    for i, (name, a) in enumerate(written):
        for other, b in written[i + 1 :] + read:
            if _overlaps(a, b):
                raise ValueError(
                    f"{name} overlaps {other}: {name} is written in place, so it must "
                    f"not share memory with any other argument; pass a separate array"
                )


def _same_memory(a, b):
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.shape == b.shape
        and a.strides == b.strides
        and a.dtype == b.dtype
    )


def _overlaps(a, b):
    if a is not b and a.base is None and b.base is None:
        return False  # two arrays that each own their buffer (the common case)
    if not np.may_share_memory(a, b):  # memory bounds only: cheap
        return False
    try:
        return bool(np.shares_memory(a, b, max_work=1000))
    except _TooHardError:  # too costly to decide exactly: be safe
        return True


# -- x modified between forward and backward (best effort) ---------------------------


def probe_of(x_flat):
    """A small strided sample of the flat input, kept in the cache: ``(step, bytes)``."""
    step = max(1, x_flat.size // _PROBE_SAMPLES)
    return step, x_flat[::step].tobytes()


def check_probe(x_flat, probe):
    """Raise ValueError if the sampled values of ``x_flat`` changed since ``probe_of``.

    Compares bits, so NaN equals NaN. Catches changes of the whole array (an in-place
    activation, ``x *= s``, ``x[...] = next_batch``); a change confined to a few
    elements between the samples goes unnoticed.
    """
    step, sample = probe
    if x_flat[::step].tobytes() != sample:
        raise ValueError(
            "x was modified after batch_norm returned this cache: the cache refers to x "
            "(it keeps no copy), so batch_norm_backward would use the new values. Keep x "
            "unchanged until backward, or pass a copy of x to batch_norm"
        )
