"""One Python entry per operation: pick the serial or parallel target of the plan, give
the kernels what they read, and redo the rare float32 pass whose coefficients exceed
float32's range in float64."""

import numpy as np

from . import _activation, _choice, _plan
from ._kernels import layout, ops
from ._threading import parallel_call, parallel_usable

# stand-ins for absent running statistics, by the dtype char of x
_STAND_IN = {"f": np.zeros(1, np.float32), "d": np.zeros(1, np.float64)}
# stand-ins for the forward coefficients that only a ReLU-fused backward reads
_NO_FWORK = {c: np.zeros((layout.WORK_ROWS, 1), c) for c in "fd"}


# the serial targets by relu, then (operation, fused): _call's lookup for serial plans
_SERIAL = {
    relu: {(name, fused): targets[False, fused, relu] for name, targets in ops.TARGETS.items()
           for fused in (False, True)}
    for relu in (False, True)
}  # fmt: skip


def _call(plan, name, fused, relu, args):
    """Run operation ``name`` on the tuple ``args`` in the target the plan needs
    (``ops.TARGETS``): serial for small inputs, else serial or parallel as
    ``fastbn._choice`` finds faster; ``relu``: the targets with the ReLU loops (compiled
    only when a call needs them)."""
    if not plan.parallel:
        return _SERIAL[relu][name, fused](*args)
    targets = ops.TARGETS[name]
    if not parallel_usable():
        return targets[False, fused, relu](*args)
    key = (name, fused, relu)
    choice = plan.choices.get(key)
    if choice is None:
        choice = plan.choices[key] = _choice.Choice()
    serial, parallel = targets[False, fused, relu], targets[True, fused, relu]
    return _choice.run(choice, serial, parallel, parallel_call, args)


def _param(p, default):
    """A per-channel parameter as kernels read it: the array itself when it has the
    storage dtype (and is contiguous and writable, the types the kernels are compiled
    for), else a float64 copy (exact); ``default`` when None. (``==``: an unpickled array's
    dtype equals the storage dtype without being NumPy's own object for it; a float64 copy
    of it would compile the kernels again, for float64 parameters.)"""
    if p is None:
        return default
    if p.dtype is default.dtype or p.dtype == default.dtype:
        flags = p.flags
        if flags.c_contiguous and flags.writeable:
            return p
    return np.array(p, np.float64)


def params(plan, gamma, beta):
    """``gamma`` and ``beta`` as the kernels read them (ones and zeros when None)."""
    return _param(gamma, plan.ones), _param(beta, plan.zeros)


_FLOAT32, _FLOAT64 = np.dtype(np.float32), np.dtype(np.float64)


def _kernel_running(a):
    """``a`` itself when kernels can update it (native float32/float64), else a float64
    copy to be written back (float16, byte-swapped)."""
    if a is None or a.dtype is _FLOAT32 or a.dtype is _FLOAT64:
        return a
    if a.dtype.char in "fd" and a.dtype.isnative:
        return a
    return a.astype(np.float64)


def _running_args(x, rm, rv, momentum, ddof, n):
    """The ``running`` tuple of the forward_train kernels: ``(running_mean, running_var,
    momentum, update_mean, update_var, ddof, n)`` for arrays the kernels can update."""
    momentum = 0.0 if momentum is None else float(momentum)
    if rm is not None and rv is not None:
        return (rm, rv, momentum, True, True, float(ddof), n)
    # an absent running array is replaced by a same-dtype stand-in that is not written,
    # so that the common cases share one compiled signature
    stand_in = rv if rm is None else rm
    if stand_in is None:
        stand_in = _STAND_IN[x.dtype.char]
    pair = (stand_in if rm is None else rm, stand_in if rv is None else rv)
    return pair + (momentum, rm is not None, rv is not None, float(ddof), n)


def train(plan, x, y, gamma, beta, eps, stats, have_stats, running, relu):
    """The forward_train kernel into ``stats`` and ``y`` (``y`` redone in float64 when
    its coefficients do not fit float32), for kernel-ready ``gamma``/``beta`` (``params``),
    ``running`` as ``_running_args`` makes it and a bool ``relu``; returns ``(finite,
    fwork)`` (see ``forward_train``)."""
    args = (plan.ints, plan.counts, x, y, gamma, beta, eps, stats, have_stats)
    args += (_plan.STREAM_BYTES, running, int(relu))
    if plan.parallel:
        returned = _call(plan, "forward_train", plan.fused, relu, args)
    else:
        returned = _SERIAL[relu]["forward_train", plan.fused](*args)
    if relu:
        finite, fits, fwork = returned
    else:
        (finite, fits), fwork = returned, None
    if not fits:
        _affine_float64(plan, y, x, stats[0], stats[3] * gamma, beta, relu=relu)
    return finite, fwork


def evaluate(plan, x, y, gamma, beta, eps, stats, relu):
    """The forward_eval kernel with ``stats[0]``, ``stats[2]`` (mean, var) given, for
    kernel-ready ``gamma``/``beta`` (``params``) and a bool ``relu``; returns ``fwork``
    (see ``forward_eval``)."""
    args = (plan.ints, x, y, gamma, beta, eps, stats, _plan.STREAM_BYTES, int(relu))
    if plan.parallel:
        returned = _call(plan, "forward_eval", False, relu, args)
    else:
        returned = _SERIAL[relu]["forward_eval", False](*args)
    fits, fwork = returned if relu else (returned, None)
    if not fits:
        _affine_float64(plan, y, x, stats[0], stats[3] * gamma, beta, relu=relu)
    return fwork


def forward_train(
    plan, x, y, gamma, beta, eps, running_mean, running_var, momentum, ddof=1, relu=False,
    stats=None,
):  # fmt: skip
    """Normalize flat ``x`` into flat ``y`` with batch statistics, or (``stats=(mean, m2,
    count)``) with given ones; update the running statistics in place, with the batch
    variance of ``ddof`` (1: unbiased, 0: biased). ``relu``: then ``max(0, y)``.

    ``gamma``/``beta``: from ``params``. Returns the float64 ``(4, C)`` array of
    mean, m2, biased var, invstd, whether every variance is finite, and (``relu``) the
    coefficients of the elementwise pass (``work``, storage dtype), which the ReLU-fused
    backward reads for its mask, else None.
    """
    result = np.empty((4, plan.C))
    if stats is None:
        n, have_stats = plan.count, False
    else:
        result[0], result[1], n, have_stats = stats[0], stats[1], float(stats[2]), True
    rm, rv = _kernel_running(running_mean), _kernel_running(running_var)
    running = _running_args(x, rm, rv, momentum, ddof, n)
    relu = bool(relu)
    finite, fwork = train(plan, x, y, gamma, beta, eps, result, have_stats, running, relu)
    if rm is not running_mean:
        running_mean[...] = rm
    if rv is not running_var:
        running_var[...] = rv
    return result, finite, fwork


def forward_quick(plan, x, y, gamma, beta, eps, running_mean, running_var, momentum, ddof, relu):
    """``forward_train`` with ``ddof``, or ``forward_eval`` when ``ddof`` is None (then
    ``momentum`` is unused), for the caller's ``gamma`` and ``beta`` (converted here by
    ``params``) and running arrays that are None or native float32/float64 (what
    ``fastbn._checks.quick_view`` passes), ``relu`` a bool. Returns ``(stats, finite,
    fwork, kernel_gamma, kernel_beta)``: ``stats``, ``finite`` and ``fwork`` as
    ``forward_train`` returns them (``finite`` True in eval mode), gamma and beta as the
    kernels read them."""
    kernel_gamma = _param(gamma, plan.ones)
    kernel_beta = _param(beta, plan.zeros)
    stats = np.empty((4, plan.C))
    if ddof is None:
        stats[0], stats[2] = running_mean, running_var
        fwork = evaluate(plan, x, y, kernel_gamma, kernel_beta, eps, stats, relu)
        return stats, True, fwork, kernel_gamma, kernel_beta
    running = _running_args(x, running_mean, running_var, momentum, ddof, plan.count)
    finite, fwork = train(plan, x, y, kernel_gamma, kernel_beta, eps, stats, False, running, relu)
    return stats, finite, fwork, kernel_gamma, kernel_beta


def forward_eval(plan, x, y, gamma, beta, eps, mean, var, relu=False):
    """Normalize flat ``x`` into flat ``y`` with given ``mean``/``var`` (``relu``: then
    ``max(0, y)``); returns the ``(4, C)`` statistics array (mean, unused m2, var, invstd)
    and, with ``relu``, the coefficients of the elementwise pass (else None; see
    ``forward_train``)."""
    stats = np.empty((4, plan.C))
    stats[0], stats[2] = mean, var
    return stats, evaluate(plan, x, y, gamma, beta, eps, stats, bool(relu))


def moments(plan, x):
    """Per-channel float64 ``(mean, m2)`` of flat ``x`` (the statistics pass alone)."""
    stats = np.empty((4, plan.C))  # the layout the operation writes (rows 2-3 scratch)
    _call(plan, "moments", False, False, (plan.ints, plan.counts, x, stats))
    return stats[0], stats[1]


def grad_sums(plan, dy, x, mean):
    """Float64 ``(2, C)``: ``sum(dy)`` and ``sum(dy * (x - mean))`` per channel."""
    sums = np.empty((2, plan.C))
    args = (plan.ints, dy, x, mean, sums, _NO_FWORK[x.dtype.char], 0)
    _call(plan, "grad_sums", False, False, args)
    return sums


def backward(plan, dy, x, dx, stats, gamma, training, n=None, sums=None, fwork=None):
    """Write flat ``dx``, with the forward's float64 ``(4, C)`` statistics ``stats`` (mean
    and invstd in rows 0 and 3); return float64 ``(dgamma, dbeta)`` (before any dtype
    cast), computed with ``sums`` when given (with ``n`` values per channel, e.g. summed
    over processes), else with the gradient sums of ``dy``. ``fwork``: the forward's
    coefficients of a ReLU-fused forward (``fastbn._activation``); ``dy`` is then masked
    where the forward's pre-activation was not positive."""
    have_sums = sums is not None
    grads = np.empty((4, plan.C))  # dgamma, dbeta, then the gradient sums
    if have_sums:
        grads[2:] = sums
    n = plan.count if n is None else float(n)
    gamma = _param(gamma, plan.ones)
    training = bool(training)
    grads = _backward(plan, dy, x, dx, stats, gamma, n, training, grads, have_sums, fwork)
    return grads[0], grads[1]


def backward_quick(plan, dy, x, dx, stats, gamma, training, fwork):
    """``backward`` without given sums, for a cache's ``stats`` and ``gamma`` (None or the
    snapshot, already as kernels read it) and ``training`` a bool: returns the float64
    ``(4, C)`` array whose rows 0 and 1 are ``(dgamma, dbeta)``."""
    if gamma is None:
        gamma = plan.ones
    grads = np.empty((4, plan.C))
    return _backward(plan, dy, x, dx, stats, gamma, plan.count, training, grads, False, fwork)


def _backward(plan, dy, x, dx, stats, gamma, n, training, grads, have_sums, fwork):
    """The backward kernel (see ``backward``) into ``grads`` (float64 ``(4, C)``: dgamma,
    dbeta, and the gradient sums, given when ``have_sums``); redoes ``dx`` in float64 when
    its coefficients do not fit float32. Returns ``grads``."""
    relu = fwork is not None
    args = (plan.ints, dy, x, dx, stats, gamma, n, training, grads, have_sums)
    args += (_plan.STREAM_BYTES, fwork if relu else _NO_FWORK[x.dtype.char], int(relu))
    fused = plan.fused and not have_sums
    if plan.parallel:
        fits = _call(plan, "backward", fused, relu, args)
    else:
        fits = _SERIAL[relu]["backward", fused](*args)
    if fits:
        return grads
    if relu:  # redo as the composition, whose float64 path follows
        dy = _activation.masked_dy(plan, dy, x, fwork)
        return _backward(plan, dy, x, dx, stats, gamma, n, training, grads, have_sums, None)
    return _redo_backward(plan, dy, x, dx, stats, gamma, n, training, grads)


def _redo_backward(plan, dy, x, dx, stats, gamma, n, training, grads):
    """``dx`` in float64 after a backward kernel (without ReLU) reported coefficients
    beyond float32's range; ``grads`` as the kernel wrote them. Returns ``grads``."""
    mean, invstd = stats[0], stats[3]
    g = gamma * invstd
    if training:  # the coefficients of fused.grad_params
        p, q = -g * invstd * (grads[0] / n), -g * (grads[1] / n)
        _affine_float64(plan, dx, x, mean, p, q, dy, g)
    else:
        zeros = np.zeros(plan.C)
        _affine_float64(plan, dx, dy, zeros, g, zeros)
    return grads


def _affine_float64(plan, out, x, m, p, q, dy=None, g=None, relu=False):
    """``out = (x - m) * p + q`` (``+ dy * g``) in NumPy float64, per channel of the flat
    canonical buffers: the elementwise pass for the rare float32 case whose coefficients
    exceed float32's range (``gamma * invstd`` above 3.4e38), which the kernels report.
    ``relu``: then ``out = np.maximum(out, 0)``, as the fused kernels do."""
    shape = (plan.outer, plan.C, plan.inner)

    def per_channel(a):
        return np.asarray(a, np.float64).reshape(1, plan.C, 1)

    result = (x.reshape(shape).astype(np.float64) - per_channel(m)) * per_channel(p)
    result += per_channel(q)
    if dy is not None:
        result += dy.reshape(shape) * per_channel(g)
    out.reshape(shape)[...] = result
    if relu:
        np.maximum(out, 0, out=out)
