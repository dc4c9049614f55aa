"""Recycled memory for large new outputs (``y``, ``dx``).

A large NumPy array gets fresh pages from the operating system, which zeroes each
page on first touch: on the 2-core EPYC VM fastbn was developed on, that cost as much
as the whole elementwise pass for DRAM-sized outputs (forward+backward of a
(65536, 256) float32 batch: 37 ms allocating its outputs against 24 ms with ``out=``).
A training loop asks for the same shapes every step, so fastbn keeps the memory of a
large output it allocated once the caller has dropped the array (and every view of
it), and hands that memory out again for the next output of the same size.

What is kept follows the loop (policy):

- A dropped buffer is kept only while its size is still being asked for: its size was
  requested among the last ``_WINDOW`` (64) large requests. Buffers of sizes that left
  that window are released at the next large request or drop.
- The pool holds at most as many bytes as were live at once (outputs fastbn allocated
  and the caller still held) at the busiest of those requests, the loop's own
  footprint. To keep a newer buffer within that bound, buffers of the sizes requested
  least recently go first; a buffer whose size is not more recent than theirs is not
  kept.
- And never more than ``pool_limit()`` bytes (``FASTBN_POOL_BYTES`` in the environment at
  import, else 1 GiB); ``set_pool_limit(0)`` empties and disables it (and forgets the
  request history).

So a steady loop of one shape gets its memory back every step (its outputs' bytes are
exactly what was live at once), and a loop whose sizes keep changing (40 batches of
distinct sizes) keeps about one step's outputs instead of every size it ever saw.
Outputs smaller than 1 MiB come from ``np.empty`` as usual. A recycled output's
``base`` is the object that returns its memory here; it owns no data of its own
(``flags.owndata`` is False), like any view.
"""

import collections
import math
import os
import threading

import numpy as np

MIN_BYTES = _MIN_BYTES = 1 << 20
_DEFAULT_LIMIT = 1 << 30
# Large requests remembered: a size asked for among the last _WINDOW is still in use.
_WINDOW = 64


def _limit_from_environment():
    text = os.environ.get("FASTBN_POOL_BYTES", "")
    try:
        return max(0, int(text)) if text else _DEFAULT_LIMIT
    except ValueError:
        return _DEFAULT_LIMIT


_lock = threading.RLock()  # reentrant: a lease may be collected while the lock is held
_free = {}  # nbytes -> list of (uint8 buffer, its address)
# live: bytes of leased outputs alive now; requests: large requests so far; fresh: those
# that got new memory (not recycled)
_state = {"limit": _limit_from_environment(), "held": 0, "live": 0, "requests": 0, "fresh": 0}
_last_asked = {}  # nbytes -> number of the last request of that size
_live_at = collections.deque(maxlen=_WINDOW)  # live bytes after each of the last requests


class Lease:
    """The base of a recycled output: exposes ``buffer`` (at ``address``) as a
    C-contiguous array of ``shape`` and ``dtype``, and gives the buffer back when the
    last view dies."""

    __slots__ = ("buffer", "address", "__array_interface__")

    def __init__(self, buffer, address, shape, dtype):
        self.buffer = buffer
        self.address = address
        # strides None: C-contiguous; no "descr" (a plain float dtype's typestr says all)
        self.__array_interface__ = {
            "version": 3,
            "shape": shape,
            "typestr": dtype.str,
            "strides": None,
            "data": (address, False),
        }

    def __del__(self):
        try:
            _give_back(self.buffer, self.address)
        except Exception:  # interpreter shutdown: module globals may be gone
            pass


def _in_window(nbytes):
    return _last_asked.get(nbytes, -_WINDOW) > _state["requests"] - _WINDOW


def _release(size, count=None):
    """Drop ``count`` (default: all) pooled buffers of ``size`` bytes."""
    buffers = _free.get(size, [])
    n = len(buffers) if count is None else min(count, len(buffers))
    del buffers[len(buffers) - n :]
    _state["held"] -= n * size
    if not buffers:
        _free.pop(size, None)


def _release_stale():
    """Release the buffers of sizes no longer requested (outside the window)."""
    for size in [s for s in _free if not _in_window(s)]:
        _release(size)


def _make_room(nbytes, budget):
    """Release buffers of sizes requested less recently than ``nbytes`` (least recent
    first) until ``nbytes`` more fit in ``budget``; False if they cannot."""
    mine = _last_asked.get(nbytes, -1)
    older = sorted((_last_asked.get(s, -1), s) for s in _free if s != nbytes)
    for asked, size in older:
        if _state["held"] + nbytes <= budget or asked >= mine:
            break
        while _free.get(size) and _state["held"] + nbytes > budget:
            _release(size, 1)
    return _state["held"] + nbytes <= budget


def _give_back(buffer, address):
    nbytes = buffer.nbytes
    with _lock:
        _state["live"] -= nbytes
        if _free:
            _release_stale()
        if not _in_window(nbytes):
            return
        # the budget is the most bytes live at once among the last requests; what was live
        # at the last one is a lower bound that settles the common case without the max
        held = _state["held"] + nbytes
        quick = _live_at and held <= min(_state["limit"], _live_at[-1])
        fits = quick or _make_room(nbytes, min(_state["limit"], max(_live_at, default=0)))
        if fits:
            _free.setdefault(nbytes, []).append((buffer, address))
            _state["held"] += nbytes


def _take(nbytes):
    """A pooled ``(buffer, address)`` of ``nbytes`` or None; counts the request (and its
    live bytes)."""
    with _lock:
        _state["requests"] += 1
        _last_asked[nbytes] = _state["requests"]
        _state["live"] += nbytes
        _live_at.append(_state["live"])
        buffers = _free.get(nbytes)
        if buffers:
            _state["held"] -= nbytes
            entry = buffers.pop()
            if not buffers:
                del _free[nbytes]
            return entry
        _state["fresh"] += 1
        if _free:
            _release_stale()
        if len(_last_asked) > 4 * _WINDOW:  # forget sizes long out of the window
            for size in [s for s in _last_asked if not _in_window(s)]:
                del _last_asked[size]
    return None


def empty(shape, dtype):
    """A new C-contiguous array of ``shape`` and ``dtype``, its memory recycled when it is
    1 MiB or more and the pool holds a buffer of that size."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _MIN_BYTES or _state["limit"] <= 0:
        return np.empty(shape, dtype)
    entry = _take(nbytes)
    if entry is None:
        buffer = np.empty(nbytes, np.uint8)
        entry = buffer, buffer.ctypes.data
    return np.asarray(Lease(*entry, tuple(shape), dtype))


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
            while _free.get(size) and _state["held"] > _state["limit"]:
                _release(size, 1)
        if nbytes == 0:  # off: forget the request history too
            _last_asked.clear()
            _live_at.clear()
