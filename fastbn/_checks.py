"""Validation with clear messages: one call per operation checks every argument.

Every message names the argument, what it got (shape and dtype for arrays) and what
was expected; a call that raises has changed nothing. Kernels never validate.
"""

import math
import numbers

import numpy as np

from . import _memory
from ._kernels.moments import any_negative
from ._view import (
    _COMPUTE,
    _FLOAT32,
    _FLOAT64,
    _X_SAMPLES,
    _check_ndarray,
    _describe,
    _native,
    check_array,
    fast_view,
    view_of,
)

_TooHardError = getattr(np, "exceptions", np).TooHardError
# the number types of eps and momentum on the quick path (NumPy's float64, e.g. from
# arithmetic on array values, is a float; the kernels read both as float64)
_FLOATS = (float, np.float64)


def _plain_params(C, x, gamma, beta, running_mean, running_var):
    """True when every parameter is None or a plain native float32/float64 array of
    shape ``(C,)`` owning its buffer (an output whose memory fastbn recycles,
    ``fastbn._memory``, owns it through its lease), and ``x`` (the owner of the input's
    memory, ``memory_owner``) and the parameters given are distinct objects: then none
    can overlap another (the quick form of ``channel_param`` and ``check_disjoint``).
    One loop, no helper calls: this runs on every quick call, where each Python call
    and attribute read costs tens of ns."""
    for p in (gamma, beta, running_mean, running_var):
        if p is None:
            continue
        if type(p) is not np.ndarray:
            return False
        dtype = p.dtype
        if (dtype is not _FLOAT32 and dtype is not _FLOAT64) or p.ndim != 1 or len(p) != C:
            return False
        base = p.base
        if base is not None and type(base) is not _memory.Lease:
            return False
    # each one given is none of the objects before it (a None matches no given one)
    if gamma is x or beta is x or running_mean is x or running_var is x:
        return False
    if beta is not None and beta is gamma:
        return False
    if running_mean is not None and (running_mean is gamma or running_mean is beta):
        return False
    return running_var is None or not (
        running_var is gamma or running_var is beta or running_var is running_mean
    )


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


def check_native_running_var(var):
    """``check_running_var`` for a native float32 or float64 1-D ``var`` (the quick paths'):
    a compiled loop looks for a negative value; only then does NumPy's check run (and
    raise its error)."""
    if any_negative(var):
        check_running_var(var)


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


def x_sample(x_flat, step=None):
    """A small strided sample of the flat input, kept in the cache: ``(step, bytes)``
    (``step``: ``View.sample_step`` of its view, else computed)."""
    if step is None:
        step = max(1, x_flat.size // _X_SAMPLES)
    return step, x_flat[::step].tobytes()


def check_x_sample(x_flat, sample_of_x):
    """Raise ValueError if the sampled values of ``x_flat`` changed since ``x_sample``.

    Compares bits, so NaN equals NaN. Catches changes of the whole array (an in-place
    activation, ``x *= s``, ``x[...] = next_batch``); a change confined to a few
    elements between the samples goes unnoticed.
    """
    step, sample = sample_of_x
    if x_flat[::step].tobytes() != sample:
        raise ValueError(
            "x was modified after batch_norm returned this cache: the cache refers to x "
            "(it keeps no copy), so batch_norm_backward would use the new values. Keep x "
            "unchanged until backward, or pass a copy of x to batch_norm"
        )


# -- one call per operation: every argument checked, the view prepared ---------------------


def quick_view(
    x, gamma, beta, training, running_mean, running_var, momentum, eps, axis, ddof, out
):  # fmt: skip
    """The View of a common call (``training`` True or False, no ``stats``) when every
    check of ``forward_args`` would pass as the arguments are, else None: plain
    C-contiguous float arrays that own their memory (so that none overlaps another),
    ``eps`` and ``momentum`` of type float or ``np.float64``, ``out`` None or such an
    array of x's shape and dtype; ``x`` may also be a view of an array that owns its
    memory (a slice of a batch, a reshaped activation) when that array is none of the
    others, and channels-last (``View.matches``; then without ``out``). In eval mode it
    raises ``forward_args``'s error for a negative ``running_var`` (its last check, so
    no other error comes first)."""
    if type(eps) not in _FLOATS or type(ddof) is not int or not 0.0 < eps < math.inf:
        return None
    if not 0 <= ddof <= 1 or (out is not None and not plain_out(out, x)):
        return None
    view = fast_view(x, axis)
    if view is None or (view.channels_last and out is not None):
        return None  # (an out= of a channels-last x: the checked path finds its layout)
    owner = memory_owner(x)
    if owner is None or owner is out:  # (out is x itself: plain_out refused it)
        return None
    if not _plain_params(view.C, owner, gamma, beta, running_mean, running_var):
        return None
    if training is True:
        if type(momentum) in _FLOATS:
            if not 0.0 <= momentum <= 1.0:
                return None
        elif not (momentum is None and running_mean is None and running_var is None):
            return None
        if view.count <= ddof:
            return None
        if running_mean is not None and not running_mean.flags.writeable:
            return None
        if running_var is not None and not running_var.flags.writeable:
            return None
        return view
    if training is not False or running_mean is None or running_var is None:
        return None
    if not (momentum is None or (type(momentum) in _FLOATS and 0.0 <= momentum <= 1.0)):
        return None
    check_native_running_var(running_var)
    return view


def plain_out(out, x):
    """True when ``out`` is a writable C-contiguous array of ``x``'s shape and dtype that
    owns its buffer and is not ``x``: then the kernels write it directly and it overlaps
    no argument that owns its memory (the quick form of ``check_out``)."""
    if type(out) is not np.ndarray or out is x or out.dtype is not x.dtype:
        return False
    if out.shape != x.shape or not out.flags.c_contiguous or not out.flags.writeable:
        return False
    return owns_memory(out)


def memory_owner(a):
    """The array that owns the buffer ``a``'s memory lies in, when that is known: ``a``
    itself when it owns its buffer (``owns_memory``), its ``base`` when that is a plain
    ndarray owning its own (NumPy makes a view of a view refer to the owner), else None
    (memory from another object: a ``bytes``, a ``memoryview``, ``as_strided``). Two
    arrays whose owners are distinct objects share no memory."""
    base = a.base
    if base is None or type(base) is _memory.Lease:
        return a
    if type(base) is np.ndarray:
        root = base.base
        if root is None or type(root) is _memory.Lease:
            return base
    return None


def owns_memory(a):
    """True when ``a`` owns its buffer (or holds a recycled output's, ``_memory.Lease``):
    then only ``a`` itself or a view of it can overlap it."""
    base = a.base
    return base is None or type(base) is _memory.Lease


def plain_dx_out(out, dy, x):
    """The quick form of ``backward_args``' check of ``out`` for a plain ``dy`` (a
    C-contiguous ndarray of the storage dtype and x's shape): True when ``out`` is a
    writable C-contiguous array like ``dy`` that is ``dy`` itself or owns its buffer,
    and the owners of the memory of ``out``, ``dy`` and ``x`` (``memory_owner``) are
    known and distinct (``out`` and ``dy`` may be one array); then ``out`` overlaps
    neither ``dy`` (unless it is ``dy``, which an elementwise update allows) nor ``x``."""
    dy_owner, x_owner = memory_owner(dy), memory_owner(x)
    if dy_owner is None or x_owner is None or dy_owner is x_owner:
        return False
    if out is dy:
        return dy.flags.writeable
    return plain_out(out, dy) and out is not dy_owner and out is not x_owner


def check_stats(stats, C, training):
    """The given statistics of ``batch_norm(..., stats=)`` (a ``Moments``) fit the call."""
    if not training:
        raise ValueError("stats= is for training=True (eval mode uses the running statistics)")
    if stats.C != C:
        raise ValueError(f"stats has {stats.C} channels, x has {C}")
    if stats.count <= 1:
        got = "no values" if stats.count == 0 else "a single value per channel"
        raise ValueError(
            f"Expected more than 1 value per channel when training, got stats of {got} "
            f"(stats.count = {stats.count})"
        )


def forward_args(
    x, gamma, beta, training, running_mean, running_var, momentum, eps, axis, out, ddof, stats
):
    """Validate every argument of ``batch_norm`` at once -> ``(x, view, gamma, beta,
    running_mean, running_var, momentum, eps, training, out, ddof)``, checked and
    converted (``x`` native; ``eps``/``momentum`` floats), or raise with a clear message."""
    x, view = view_of(x, axis)
    C = view.C
    gamma = channel_param(gamma, "gamma", C)
    beta = channel_param(beta, "beta", C)
    eps = check_eps(eps)
    ddof = check_ddof(ddof)
    training = check_training(training)
    if stats is not None:
        check_stats(stats, C, training)
    if training:
        running_mean = channel_param(running_mean, "running_mean", C, writable=True)
        running_var = channel_param(running_var, "running_var", C, writable=True)
        updates = running_mean is not None or running_var is not None
        momentum = check_momentum(momentum, required=updates)
        if stats is None:
            check_batch(view, training, ddof)
        if running_mean is not None and running_mean is running_var:
            raise ValueError("running_mean and running_var must be different arrays")
        check_disjoint(
            [("running_mean", running_mean), ("running_var", running_var)],
            [("x", x), ("gamma", gamma), ("beta", beta)],
        )
    else:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required when training=False")
        running_mean = channel_param(running_mean, "running_mean", C)
        running_var = channel_param(running_var, "running_var", C)
        check_momentum(momentum, required=False)  # unused, but not nonsense
    if out is not None:
        named = (("x", x), ("gamma", gamma), ("beta", beta))
        named += (("running_mean", running_mean), ("running_var", running_var))
        out = check_out(out, view, [(name, a, False) for name, a in named])
    if not training:
        check_running_var(running_var)
    return x, view, gamma, beta, running_mean, running_var, momentum, eps, training, out, ddof


def backward_args(dy, cache, out, cache_type):
    """Validate the arguments of ``batch_norm_backward`` -> ``(dy, out)``."""
    if not isinstance(cache, cache_type):
        raise TypeError(
            f"cache must be the BatchNormCache returned by fastbn.batch_norm, "
            f"got {type(cache).__name__}"
        )
    view = cache.view
    if not (type(dy) is np.ndarray and dy.dtype is view.compute and dy.shape == view.shape):
        dy = check_same_shape(dy, "dy", view)
    check_x_sample(cache.x_flat, cache.x_sample)
    if out is not None:
        out = check_out(out, view, [("dy", dy, True), ("x", cache.x, False)])
    return dy, out
