"""``BatchNormalization``: the batch-norm layer of "Deep Learning from Scratch"
(O'Reilly Japan, ``common/layers.py``), computed with fastbn's kernels.

Replace ``from common.layers import BatchNormalization`` (or the ``*`` import it comes
with) by ``from fastbn.compat.dlfs import BatchNormalization``; nothing else changes.

The book's conventions, all kept:

- ``BatchNormalization(gamma, beta, momentum=0.9, running_mean=None, running_var=None)``;
  ``forward(x, train_flg=True)``, ``backward(dout)``; attributes ``gamma``, ``beta``,
  ``momentum``, ``running_mean``, ``running_var``, ``input_shape``, ``batch_size``,
  ``dgamma``, ``dbeta``.
- ``gamma`` and ``beta`` are the caller's arrays (the network's ``params`` dict, which
  its optimizer updates in place): read at every call, never copied at construction.
- Inputs of more than 2 dimensions are reshaped to ``(N, -1)``: one statistic per
  activation (not per channel); ``backward`` returns the input's shape.
- ``eps = 10e-7`` (that is 1e-6), added to the biased batch variance.
- ``running = momentum * running + (1 - momentum) * batch``, with the biased batch
  variance. The running arrays start as float64 zeros sized at the first forward (a
  test-mode forward too) and are replaced by new arrays at every training forward:
  the arrays passed to the constructor, or a reference kept to an old one, never change.
- A batch of one sample trains: its output is ``beta`` and ``dx`` is 0 (up to the
  rounding of ``gamma * dout / sqrt(eps)``, about 1e-16 of it).
- ``backward`` after a test-mode forward differentiates the last *training* forward
  (the book's backward reads what its last training forward stored) and returns the
  shape of the last forward's input.
- Output dtypes are those of the book's formulas: ``gamma * xhat + beta`` promotes
  ``x`` with ``gamma`` and ``beta`` (and with the float64 running arrays in test mode),
  so a float32 ``x`` gives a float64 output there, as in the book.

Unlike the book, nothing of size ``N x D`` is kept between forward and backward (the
book keeps ``xc``, ``xn`` and ``std``-normalized copies): only fastbn's O(D) cache,
which refers to ``x`` itself, so ``x`` must not be modified in between (fastbn checks a
sample of it). ``momentum`` outside [0, 1], and arrays of the wrong type or shape,
raise ``TypeError`` / ``ValueError`` naming the argument before anything changes.
"""

import math

import numpy as np

from ..functional import batch_norm
from . import _common

__all__ = ["BatchNormalization", "EPS"]

EPS = 10e-7  # the book's constant, as the book writes it: 1e-6


class BatchNormalization:
    """Batch normalization of ``(N, D)`` activations, the book's layer (see the module).

    Parameters
    ----------
    gamma, beta : ndarray of shape ``(D,)``, float
        Scale and shift, by reference: the layer reads ``self.gamma`` and ``self.beta``
        at every call, so in-place updates by an optimizer are seen.
    momentum : float in [0, 1]
        Weight of the old running value.
    running_mean, running_var : ndarray of shape ``(D,)`` or None
        Initial running statistics; None: float64 zeros at the first forward.
    """

    def __init__(self, gamma, beta, momentum=0.9, running_mean=None, running_var=None):
        _common.check_momentum(momentum)
        self.gamma = gamma
        self.beta = beta
        self.momentum = momentum
        self.input_shape = None
        self.running_mean = running_mean
        self.running_var = running_var
        self.batch_size = None
        self.dgamma = None
        self.dbeta = None
        self._cache = None  # of the last training forward, as the book's xc, xn, std

    def forward(self, x, train_flg=True):
        """Normalize ``x`` (``(N, D)``, or ``(N, ...)`` flattened to ``(N, -1)``).

        Training (``train_flg`` true): batch mean and biased variance over the ``N``
        rows; the running statistics are replaced by their update. Test: the running
        statistics. Returns ``gamma * xhat + beta`` with the shape of ``x``.
        """
        if not isinstance(x, np.ndarray):
            raise TypeError(f"x must be a numpy.ndarray, got {type(x).__name__}")
        shape = x.shape
        rows = x.reshape(shape[0], math.prod(shape[1:])) if x.ndim > 2 else x
        if x.ndim < 2:
            raise ValueError(
                f"x must have shape (N, D) or (N, ...) to flatten, got {_common.describe(x)}"
            )
        running_mean, running_var = self.running_mean, self.running_var
        if running_mean is None or running_var is None:  # the book's first-call zeros
            D = rows.shape[1]
            running_mean = np.zeros(D) if running_mean is None else running_mean
            running_var = np.zeros(D) if running_var is None else running_var
        y, cache, running_mean, running_var = _common.forward(
            rows,
            self.gamma,
            self.beta,
            bool(train_flg),
            running_mean,
            running_var,
            self.momentum,
            EPS,
        )
        # only a call that succeeded changes the layer
        self.running_mean, self.running_var = running_mean, running_var
        self.input_shape = shape
        if train_flg:
            self.batch_size = rows.shape[0]
            self._cache = cache
        return y.reshape(shape)

    def backward(self, dout):
        """Gradient w.r.t. the last training forward's input, for ``dout`` of that
        forward's output shape (``(N, ...)`` is flattened to ``(N, -1)``).

        Sets ``self.dgamma`` and ``self.dbeta`` (shape ``(D,)``) and returns ``dx`` in
        the shape of the last forward's input. ``self.gamma`` is read now, as the book
        does: a ``gamma`` changed since the forward call is the one ``dx`` uses.
        """
        cache = self._cache
        if cache is None:
            raise RuntimeError("BatchNormalization.backward called before a training forward")
        if not isinstance(dout, np.ndarray):
            raise TypeError(f"dout must be a numpy.ndarray, got {type(dout).__name__}")
        rows = dout.reshape(dout.shape[0], math.prod(dout.shape[1:])) if dout.ndim > 2 else dout
        if rows.shape != cache.shape:
            raise ValueError(
                f"dout must have the shape of the last training forward's output, "
                f"{cache.shape} (after flattening to (N, -1)), got {_common.describe(dout)}"
            )
        if math.prod(self.input_shape) != rows.size:
            raise ValueError(
                f"dout has {rows.size} values but the last forward's input had shape "
                f"{self.input_shape}: the book's backward returns that shape"
            )
        gamma = self.gamma
        if gamma is not None and cache.bn.gamma is not None and not _same(cache.bn.gamma, gamma):
            cache = self._regamma(cache, gamma)
        dx, dgamma, dbeta = _common.backward(rows, cache)
        self.dgamma, self.dbeta = dgamma, dbeta
        return dx.reshape(self.input_shape)

    def _regamma(self, cache, gamma):
        """The training cache redone with the current ``gamma`` (the rare case of a gamma
        changed between forward and backward): statistics of the same ``x``, so the same
        bits; the running statistics are not touched."""
        _, bn = batch_norm(cache.bn.x, gamma, None, training=True, eps=EPS, running_var_ddof=0)
        return _common.Cache(bn, cache.x_dtype, gamma.dtype, cache.shape)

    def __repr__(self):
        D = None if self.gamma is None else getattr(self.gamma, "shape", None)
        return f"BatchNormalization(gamma shape={D}, momentum={self.momentum}) [fastbn]"


def _same(snapshot, gamma):
    """True when ``gamma`` still holds the values the forward call used (O(D); a NaN
    compares unequal, which only costs the recomputation)."""
    if not isinstance(gamma, np.ndarray) or gamma.shape != snapshot.shape:
        return False
    return bool((snapshot == gamma).all())
