"""Statistics that merge: per-channel count, mean and sum of squared deviations.

``fastbn.moments(x)`` runs the statistics pass of ``batch_norm``'s training forward
and returns a ``Moments``; ``Moments.merge`` combines the moments of disjoint parts of
a data set with Chan's formula, so the statistics of a whole batch split over processes
(``fastbn.distributed.SyncBatchNorm``) or of a data set seen in many batches
(``BatchNorm.collect_stats``) are exact, not averages of per-part variances.
``grad_sums`` gives the per-channel sums that backward needs, which add up over parts.

>>> import numpy as np, fastbn
>>> x = np.arange(12.0).reshape(6, 2)
>>> m = fastbn.Moments.merge([fastbn.moments(x[:2]), fastbn.moments(x[2:])])
>>> m.count, m.mean.tolist(), m.var(ddof=1).tolist()
(6, [5.0, 6.0], [14.0, 14.0])
"""

import operator

import numpy as np

from . import _checks, _launch

__all__ = ["Moments", "moments", "grad_sums"]

_MAX_COUNT = 2**53  # counts are exact in float64 (``to_array``) up to here


def _as_count(count, name="count"):
    if isinstance(count, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        count = operator.index(count)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(count).__name__}") from None
    if not 0 <= count <= _MAX_COUNT:
        raise ValueError(f"{name} must be in [0, 2**53], got {count}")
    return int(count)


def _as_channels(a, name):
    if not isinstance(a, np.ndarray) or isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name} must have shape (C,), got shape {a.shape}")
    a = np.array(a, dtype=np.float64)  # a private copy
    a.flags.writeable = False
    return a


class Moments:
    """Per-channel moments of a set of ``count`` values per channel.

    Attributes
    ----------
    count : int
        Values per channel (the same for every channel: batch-norm statistics reduce
        over every axis but the channel axis).
    mean : float64 ndarray of shape ``(C,)``, read-only
    m2 : float64 ndarray of shape ``(C,)``, read-only
        Sum of squared deviations from ``mean``.

    Empty moments (``count == 0``) have a NaN ``mean`` and ``m2 == 0``; they are the
    identity of ``merge``. A channel with a NaN or inf value has NaN ``mean`` and ``m2``.
    Instances are immutable: ``merge`` returns a new one.
    """

    __slots__ = ("count", "mean", "m2")

    def __init__(self, count, mean, m2):
        count = _as_count(count)
        mean = _as_channels(mean, "mean")
        m2 = _as_channels(m2, "m2")
        if mean.shape != m2.shape:
            raise ValueError(f"mean and m2 must have the same shape, got {mean.shape}, {m2.shape}")
        object.__setattr__(self, "count", count)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "m2", m2)

    def __setattr__(self, name, value):
        raise AttributeError("Moments are immutable; merge returns new ones")

    def __reduce__(self):  # pickling (e.g. mpi4py's lower-case collectives)
        return (Moments, (self.count, self.mean, self.m2))

    @property
    def C(self):
        """Number of channels."""
        return self.mean.shape[0]

    @classmethod
    def empty(cls, C):
        """Moments of no values: the identity of ``merge``."""
        return cls(0, np.full(C, np.nan), np.zeros(C))

    @classmethod
    def merge(cls, parts):
        """Moments of the union of disjoint parts, by Chan's pairwise formula applied left
        to right in the order given (same order, same bits). Empty parts are skipped;
        when all are empty the result is empty (a single non-empty part is returned
        as it is). ``parts`` is an iterable of ``Moments``
        with the same number of channels (at least one)."""
        parts = list(parts)
        if not parts:
            raise ValueError("Moments.merge needs at least one Moments, got none")
        for i, p in enumerate(parts):
            if not isinstance(p, Moments):
                raise TypeError(f"Moments.merge: part {i} is a {type(p).__name__}, not Moments")
            if p.C != parts[0].C:
                raise ValueError(
                    f"Moments.merge: part {i} has {p.C} channels, part 0 has {parts[0].C}"
                )
        full = [p for p in parts if p.count]
        if len(full) == 1:
            return full[0]
        n, mean, m2 = 0, None, None
        for p in full:
            if n == 0:
                n, mean, m2 = p.count, p.mean.copy(), p.m2.copy()
                continue
            tot = n + p.count
            delta = p.mean - mean
            mean += delta * (p.count / tot)
            m2 += p.m2 + delta * delta * (n * p.count / tot)
            n = tot
        if n == 0:
            return cls.empty(parts[0].C)
        return cls(n, mean, m2)

    def var(self, ddof=0):
        """``m2 / (count - ddof)``, float64 ``(C,)``: ``ddof=0`` the biased variance (what
        batch norm normalizes with), ``ddof=1`` the unbiased one. NaN when
        ``count <= ddof``. (``batch_norm(..., stats=m)`` computes the variance from
        ``m.m2`` in its kernels, as without ``stats``, which may differ from this by an
        ulp.)"""
        if isinstance(ddof, (bool, np.bool_)) or ddof not in (0, 1):
            raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
        if self.count <= ddof:
            return np.full(self.C, np.nan)
        return self.m2 / float(self.count - ddof)

    def to_array(self):
        """One float64 buffer of ``2C + 1`` values, ``[count, mean..., m2...]``, e.g. for
        an MPI collective; ``from_array`` inverts it exactly."""
        return np.concatenate(([float(self.count)], self.mean, self.m2))

    @classmethod
    def from_array(cls, buf):
        """The ``Moments`` of a ``to_array`` buffer: 1-D, odd length ``2C + 1``, ``buf[0]``
        a non-negative integer value."""
        if not isinstance(buf, np.ndarray):
            raise TypeError(f"buf must be a numpy.ndarray, got {type(buf).__name__}")
        if buf.ndim != 1 or buf.size % 2 != 1:
            raise ValueError(f"buf must be 1-D with an odd length 2C+1, got shape {buf.shape}")
        count = float(buf[0])
        if not (count >= 0 and count == np.floor(count) and count <= _MAX_COUNT):
            raise ValueError(f"buf[0] (the count) must be a non-negative integer, got {count}")
        C = (buf.size - 1) // 2
        return cls(int(count), buf[1 : 1 + C], buf[1 + C :])

    def __repr__(self):
        return f"Moments(count={self.count}, C={self.C})"


def moments(x, axis=1):
    """Per-channel moments of ``x`` over every axis but ``axis``, in one pass.

    ``x``: ndarray, float16/float32/float64, ndim >= 2, any memory layout (as
    ``batch_norm``). Returns a ``Moments`` with ``count`` values per channel (the
    product of the other axes) and float64 ``mean``/``m2`` of shape ``(C,)``, computed
    by ``batch_norm``'s own statistics pass: ``mean`` and ``var(0)`` are the bits that
    ``batch_norm(x, ..., training=True)`` normalizes with. Empty ``x`` gives empty
    moments. ``x`` is not modified.
    """
    x, view = _checks.view_of(x, axis)
    C, n = view.C, view.per_channel
    if n == 0:
        return Moments.empty(C)
    if C == 0:
        return Moments(n, np.empty(0), np.empty(0))
    mean, m2 = _launch.moments(view.plan, view.flat(x))
    return Moments(n, mean, m2)


def grad_sums(dy, cache):
    """The local per-channel sums that batch-norm backward needs, float64 ``(2, C)``:
    row 0 ``sum(dy)``, row 1 ``sum(dy * (x - mean))`` (``x`` and ``mean`` of the forward
    call that made ``cache``). Sums of parts add up: the sums of a batch split over
    processes are the sum of each process's (``batch_norm_backward(dy, cache,
    sums=total)`` then gives each process's part of ``dx``). ``dy`` has the shape of
    ``x`` and a float dtype; it is not modified."""
    from ._stats import local_sums
    from .functional import BatchNormCache

    if not isinstance(cache, BatchNormCache):
        raise TypeError(
            f"cache must be the BatchNormCache returned by fastbn.batch_norm, "
            f"got {type(cache).__name__}"
        )
    view, plan = cache.view, cache.plan
    dy = _checks.check_same_shape(dy, "dy", view)
    _checks.check_x_sample(cache.x_flat, cache.x_sample)
    return local_sums(plan, view.flat(dy), cache)
