"""Which part of the canonical view a task covers, and how rows are swept.

A reduction task is block ``b`` of rows (outer indices) times split ``k`` of columns
(rows family) or channel ``k`` (planes family); the cut depends on the shape only
(``fastbn._plan``), so results are the same bits on any number of threads.
"""

import numpy as np

from .jit import borrowing
from .layout import BLOCK_LEN, CHANNELS, NSPLIT, OUTER, SPLIT_WIDTH

_U = np.uint64


@borrowing
def task(plan, t):
    """Block index and unsigned ranges ``[lo, hi)`` (rows/outer), ``[c0, c1)`` (channels)."""
    nsplit = plan[NSPLIT]
    block_len = plan[BLOCK_LEN]
    b = t // nsplit
    k = t - b * nsplit
    width = plan[SPLIT_WIDTH]
    lo = _U(b * block_len)
    hi = _U(min(plan[OUTER], (b + 1) * block_len))
    c0 = _U(k * width)
    c1 = _U(min(plan[CHANNELS], (k + 1) * width))
    return b, lo, hi, c0, c1


# Inputs up to this many bytes are read from cache, where no prefetcher is involved
CACHED_BYTES = 1 << 20


@borrowing
def four_row_sweeps(C, itemsize, small_rows, size):
    """Whether the per-column reductions of the rows family sweep four rows at a time
    (accumulators loaded and stored once per four rows) or one, for ``size`` elements
    of ``itemsize`` bytes in rows of ``C``.

    One row at a time is store-bound (two accumulator stores per element): in cache, four
    rows are always faster. From memory, four rows read at once are four streams within a
    page when a row is between 512 B and 4 KiB, which the hardware prefetcher follows
    badly (README, performance notes); rows of a page or more and, for ``small_rows``,
    rows of at most 256 B still do better four at a time.
    """
    row_bytes = C * _U(itemsize)
    if size * _U(itemsize) <= _U(CACHED_BYTES):
        return True
    return row_bytes >= _U(4096) or (small_rows and row_bytes <= _U(256))
