"""Recycled memory for large new outputs (``y``, ``dx``).

A large NumPy array gets fresh pages from the operating system, which zeroes each
page on first touch: on the 2-core EPYC VM fastbn was developed on, that cost as much
as the whole elementwise pass for DRAM-sized outputs (forward+backward of a
(65536, 256) float32 batch: 37 ms allocating its outputs against 24 ms with ``out=``).
A training loop asks for the same shapes every step, so fastbn keeps the memory of a
large output it allocated once the caller has dropped the array (and every view of
it), and hands that memory out again for the next output of the same size.

The pool holds at most ``pool_limit()`` bytes (``FASTBN_POOL_BYTES`` in the
environment at import, else 1 GiB); ``set_pool_limit(0)`` empties and disables it.
Outputs smaller than 1 MiB come from ``np.empty`` as usual. A recycled output's
``base`` is the object that returns its memory here; it owns no data of its own
(``flags.owndata`` is False), like any view.
"""

import math
import os
import threading

import numpy as np

MIN_BYTES = _MIN_BYTES = 1 << 20
_DEFAULT_LIMIT = 1 << 30


def _limit_from_environment():
    text = os.environ.get("FASTBN_POOL_BYTES", "")
    try:
        return max(0, int(text)) if text else _DEFAULT_LIMIT
    except ValueError:
        return _DEFAULT_LIMIT


_lock = threading.RLock()  # reentrant: a lease may be collected while the lock is held
_free = {}  # nbytes -> list of uint8 buffers
_state = {"limit": _limit_from_environment(), "held": 0}


class Lease:
    """The base of a recycled output: exposes ``buffer`` as an array of ``shape``,
    ``dtype`` and ``strides``, and gives the buffer back when the last view dies."""

    __slots__ = ("buffer", "__array_interface__")

    def __init__(self, buffer, shape, dtype, strides):
        self.buffer = buffer
        self.__array_interface__ = {
            "version": 3,
            "shape": shape,
            "typestr": dtype.str,
            "descr": dtype.descr,
            "strides": strides,
            "data": (buffer.ctypes.data, False),
        }

    def __del__(self):
        try:
            _give_back(self.buffer)
        except Exception:  # interpreter shutdown: module globals may be gone
            pass


def _give_back(buffer):
    with _lock:
        if _state["held"] + buffer.nbytes <= _state["limit"]:
            _free.setdefault(buffer.nbytes, []).append(buffer)
            _state["held"] += buffer.nbytes


def _take(nbytes):
    with _lock:
        buffers = _free.get(nbytes)
        if buffers:
            _state["held"] -= nbytes
            return buffers.pop()
    return None


def empty(shape, dtype):
    """A new C-contiguous array of ``shape`` and ``dtype``, its memory recycled when it is
    1 MiB or more and the pool holds a buffer of that size."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _MIN_BYTES or _state["limit"] <= 0:
        return np.empty(shape, dtype)
    buffer = _take(nbytes)
    if buffer is None:
        buffer = np.empty(nbytes, np.uint8)
    strides = []
    step = dtype.itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return np.asarray(Lease(buffer, tuple(shape), dtype, tuple(reversed(strides))))


def pool_limit():
    """The most bytes of dropped outputs fastbn keeps for reuse."""
    return _state["limit"]


def pool_held():
    """Bytes of dropped outputs the pool holds now."""
    return _state["held"]


def set_pool_limit(nbytes):
    """Keep at most ``nbytes`` of dropped large outputs for reuse (default 1 GiB, or
    ``FASTBN_POOL_BYTES``); 0 disables the pool. Buffers above the new limit are
    released at once."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes < 0:
        raise ValueError(f"nbytes must be an int >= 0, got {nbytes!r}")
    with _lock:
        _state["limit"] = int(nbytes)
        for size in sorted(_free, reverse=True):
            buffers = _free[size]
            while buffers and _state["held"] > _state["limit"]:
                buffers.pop()
                _state["held"] -= size
            if not buffers:
                del _free[size]
