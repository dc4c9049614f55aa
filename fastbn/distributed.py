"""``SyncBatchNorm``: batch normalization over a batch split across MPI processes.

Each process holds a part of the batch. A training forward computes the local moments
(``fastbn.moments``), gathers every rank's with one ``Iallgather`` and merges them in rank
order with Chan's formula (``fastbn.Moments.merge``): every rank normalizes with the same
bits, the statistics of the whole batch, exact for uneven and empty parts. A training
backward gathers every rank's gradient sums (``fastbn.grad_sums``) and adds them in rank
order, then computes the local part of ``dx``. ``dgamma`` and ``dbeta`` are each rank's
own part (their sum over ranks is the whole batch's), like every other parameter
gradient of a data-parallel step, so one ``Allreduce`` over all gradients suffices. Eval
mode (running statistics) and ``collect_stats`` forwards do not communicate.

mpi4py is imported only when a layer is made (``pip install 'fastbn[mpi]'``).

Never a hang, never a wrong merge: every gathered buffer starts with a header (a sequence
number, the operation, C, the dtypes and whether the rank failed). A rank whose local
work raises still takes part with a failure flag, then re-raises; the others raise
``SyncError`` naming it. Ranks that disagree on C, dtypes or the operation all raise the
same ``ValueError``, and so does a global batch of one value per channel. A rank waits at
most ``timeout`` seconds for the others (a rank in eval mode does not communicate, so a
train/eval disagreement shows up as that wait), then raises ``SyncError``; after that
the communicator is in an undefined state and the job should end (an uncaught exception
does that, and ``mpiexec`` then exits non-zero).
"""

import time

import numpy as np

from .functional import batch_norm, batch_norm_backward
from .layer import BatchNorm
from .moments import Moments, grad_sums, moments

__all__ = ["SyncBatchNorm", "SyncError"]

_MAGIC = 20261201.0
_FORWARD, _BACKWARD, _COLLECT = 1.0, 2.0, 3.0
_KINDS = {_FORWARD: "forward", _BACKWARD: "backward", _COLLECT: "collect_stats exit"}
_DTYPES = {"e": 1.0, "f": 2.0, "d": 3.0}
_HEADER = 7  # magic, sequence, kind, C, x dtype, parameter dtype, failed
_FIELDS = ("magic", "sequence number", "operation", "channels", "x dtype", "dtype")
_dups = {}  # user communicator handle -> the private duplicate that layers share


def _describe(field, value):
    """A header value in words, for error messages."""
    if field == "operation":
        return _KINDS.get(value, value)
    if field in ("x dtype", "dtype"):
        names = {code: np.dtype(char).name for char, code in _DTYPES.items()}
        return names.get(value, "none")
    return int(value)


class SyncError(RuntimeError):
    """Another rank failed, or did not take part within the timeout."""


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError(
            "fastbn.distributed.SyncBatchNorm needs mpi4py: pip install 'fastbn[mpi]' "
            "(and an MPI runtime, e.g. pip install mpich)"
        ) from e
    return MPI


def _wait(request, timeout, what):
    """Complete ``request`` or raise ``SyncError`` after ``timeout`` seconds."""
    start = time.monotonic()
    spins = 0
    while not request.Test():
        spins += 1
        if spins > 2000:  # others are late: poll gently
            if time.monotonic() - start > timeout:
                raise SyncError(
                    f"SyncBatchNorm {what}: other ranks did not take part within {timeout} s "
                    f"(a rank failed outside SyncBatchNorm, or ranks disagree on train/eval "
                    f"mode: eval mode does not communicate)"
                )
            time.sleep(2e-4)


class SyncBatchNorm(BatchNorm):
    """``fastbn.BatchNorm`` whose training statistics are those of the batch over all ranks.

    Parameters
    ----------
    num_features : int
        C, the same on every rank.
    comm : mpi4py ``MPI.Comm`` or None
        The processes that share each batch; None means ``MPI.COMM_WORLD``. The layer
        communicates on a private duplicate, so its messages never meet the caller's.
    timeout : float
        Seconds to wait for the other ranks in one collective before ``SyncError``.
    **kwargs
        ``BatchNorm``'s keywords (``eps``, ``momentum``, ``affine``,
        ``track_running_stats``, ``axis``, ``dtype``).

    Every rank calls ``forward`` and ``backward`` of the layer in the same order (in
    training mode). Local batches may differ in size, or be empty (a rank with an empty
    ``x`` still takes part and gets an empty ``y``); the whole batch needs more than one
    value per channel. The running statistics are updated from the merged statistics
    and hold the same bits on every rank.
    """

    def __init__(self, num_features, *, comm=None, timeout=600.0, **kwargs):
        MPI = _mpi()
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Comm):
            raise TypeError(f"comm must be an mpi4py MPI.Comm, got {type(comm).__name__}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout != timeout:
            raise TypeError(f"timeout must be a number of seconds, got {timeout!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        super().__init__(num_features, **kwargs)
        if self.activation is not None:
            raise ValueError(
                f"SyncBatchNorm does not fuse activation={self.activation!r} (its statistics "
                f"come from every rank); use activation=None and apply the ReLU after it"
            )
        self.comm = comm
        self.timeout = float(timeout)
        self._private = None  # the duplicate of comm, after the first handshake
        self._sequence = 0
        self._synced = False  # whether the last forward's statistics were merged

    # -- the collective ---------------------------------------------------------
    def _header(self, kind, x_dtype, failed):
        code = _DTYPES.get(np.dtype(x_dtype).char, 0.0) if x_dtype is not None else 0.0
        head = [_MAGIC, float(self._sequence), kind, float(self.num_features), code]
        return np.array(head + [_DTYPES[self.dtype.char], 1.0 if failed else 0.0])

    def _gather(self, comm, send, what):
        recv = np.empty(comm.Get_size() * send.size)
        _wait(comm.Iallgather(send, recv), self.timeout, what)
        return recv.reshape(comm.Get_size(), send.size)

    def _check_headers(self, rows, what):
        failed = np.flatnonzero(rows[:, _HEADER - 1] != 0.0)
        if failed.size:
            raise SyncError(
                f"SyncBatchNorm {what}: rank(s) {failed.tolist()} raised an error there "
                f"(see their output); no rank proceeds"
            )
        for i, field in enumerate(_FIELDS):
            column = rows[:, i]
            if np.any(column != column[0]):
                values = [_describe(field, v) for v in column]
                raise ValueError(
                    f"SyncBatchNorm: ranks disagree on the {field}: {values} (rank order)"
                )

    def _exchange(self, kind, payload, x_dtype, failed=False):
        """Gather ``payload`` (float64, ``2C + 1`` values) from every rank -> ``(P, 2C+1)``."""
        what = _KINDS[kind]
        header = self._header(kind, x_dtype, failed)
        if self._private is None:  # first call: agree on the sizes, on the caller's comm
            rows = self._gather(self.comm, header, what)
            self._check_headers(rows, what)
            key = self.comm.py2f()
            if key not in _dups:
                _dups[key] = self.comm.Dup()
            self._private = _dups[key]
        rows = self._gather(self._private, np.concatenate((header, payload)), what)
        self._sequence += 1
        self._check_headers(rows, what)
        return rows[:, _HEADER:]

    def _fail(self, kind, x_dtype):
        """Take part in the collective with the failure flag (the caller re-raises)."""
        payload = np.zeros(2 * self.num_features + 1)
        try:
            self._exchange(kind, payload, x_dtype, failed=True)
        except (SyncError, ValueError):
            pass

    # -- compute ----------------------------------------------------------------
    def forward(self, x, *, out=None):
        """Normalize the local ``x`` with the statistics of every rank's batch (training),
        or the running statistics (eval, no communication)."""
        if self._collected is not None or not self.training:
            self._synced = False
            return super().forward(x, out=out)
        self._synced = False
        x_dtype = getattr(x, "dtype", None)
        try:
            self._check_channels(x)
            local = moments(x, self.axis)
        except Exception:
            self._fail(_FORWARD, x_dtype)
            raise
        rows = self._exchange(_FORWARD, local.to_array(), x_dtype)
        merged = Moments.merge(Moments.from_array(r) for r in rows)
        if merged.count > 1 and rows.shape[0] == 1:
            merged = local  # one rank: BatchNorm's bits exactly
        momentum = self.momentum
        update = self.track_running_stats
        if update and momentum is None:
            momentum = 1.0 / (self.num_batches_tracked + 1)
        y, cache = batch_norm(
            x,
            self.gamma,
            self.beta,
            training=True,
            running_mean=self.running_mean if update else None,
            running_var=self.running_var if update else None,
            momentum=momentum if momentum is not None else 0.0,
            eps=self.eps,
            axis=self.axis,
            out=out,
            stats=merged,
        )
        self._cache = cache
        self._synced = True
        if update:
            self.num_batches_tracked += 1
        return y

    __call__ = forward

    def backward(self, dy, *, out=None):
        """``dx`` of the local part; ``dgamma``/``dbeta`` of the local part (sum them over
        ranks with the other gradients)."""
        if not self._synced:
            return super().backward(dy, out=out)
        cache = self._cache
        try:
            local = grad_sums(dy, cache)
        except Exception:
            self._fail(_BACKWARD, cache.view.dtype)
            raise
        rows = self._exchange(_BACKWARD, np.append(local.ravel(), 0.0), cache.view.dtype)
        total = rows[0, :-1].copy()
        for row in rows[1:]:  # rank order: the same bits on every rank
            total += row[:-1]
        dx, _, _ = batch_norm_backward(dy, cache, out=out, sums=total.reshape(2, -1))
        if self.affine:
            self.dgamma = (local[1] * cache.invstd).astype(self.gamma.dtype)
            self.dbeta = local[0].astype(self.beta.dtype)
        return dx

    def _total_moments(self, parts, ok):
        """Every rank's moments from ``collect_stats``, merged in rank order."""
        if not ok:
            self._fail(_COLLECT, None)
            return None
        local = Moments.merge(parts) if parts else Moments.empty(self.num_features)
        rows = self._exchange(_COLLECT, local.to_array(), None)
        return Moments.merge(Moments.from_array(r) for r in rows)

    def __repr__(self):
        return "Sync" + super().__repr__()
