"""Which part of the canonical view a task covers, and how rows are swept.

A reduction task is block ``b`` of rows (outer indices) times split ``k`` of columns
(rows family) or channel ``k`` (planes family); the cut depends on the shape only
(``fastbn._plan``), so results are the same bits on any number of threads.
"""

import numpy as np

from .jit import borrowing
from .layout import BLOCK_LEN, CHANNELS, NSPLIT, OUTER, SPLIT_WIDTH
from .stream import prefetch

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


# Rows-family reductions sweep four rows at a time (accumulators loaded and stored once
# per four rows; one row at a time is store-bound, two accumulator stores per element).
# Beyond L2, the hardware prefetcher follows four interleaved streams within a page badly
# when a task's row is short: sweeps of inputs above PREFETCH_ABOVE bytes with rows of at
# most PREFETCH_ROW_BYTES also prefetch the rows PREFETCH_ROWS ahead. Measured on 2
# threads (moments pass, float32): 131072x128 1.87 -> 1.41 ms, 1e6x64 10.5 -> 7.8 ms,
# 100352x64 (channels-last 32x56x56x64) 0.60-0.63 -> 0.49-0.52 ms, 65536x256 1.78-2.77 ->
# 1.75-2.0 ms (one row at a time, the previous choice for 512 B - 4 KiB rows from memory:
# 1.9-3.3 ms); rows of 2 KiB and more lost with it (16384x1024: 1.38 -> 2.0 ms), as did
# 4096x1024 (16 MiB, 4 KiB rows: 0.38 -> 0.53 ms).
PREFETCH_ABOVE = 16 << 20
PREFETCH_ROW_BYTES = 1024
PREFETCH_ROWS = 8


# ... but on the AMD EPYC VM of 2026-12 the four-row sweeps from memory lost to sweeps of
# one row at a time (accumulators loaded and stored per row), whose streams the hardware
# prefetcher follows: one stream per input instead of four interleaved ones within a
# page. Parallel targets, float32, probe units (a copy of the same bytes), interleaved in
# one process, four-row (with the prefetch above) -> one-row: gradient sums 65536x256
# 2.60 -> 1.80, 131072x128 3.1 -> 1.2-1.4, 32768x512 2.04 -> 1.55, 100352x64 1.89 -> 1.32,
# 1e6x64 1.50 -> 0.99, but 16384x1024 (4 KiB rows) 1.56 -> 1.67; the statistics pass
# (one input) 65536x256 1.38 -> 0.81-0.99, 131072x128 1.11 -> 0.62, 32768x512 1.03 ->
# 0.74, but 100352x64 0.60 -> 0.79 and 16384x1024 0.64 -> 1.19. So inputs above
# PREFETCH_ABOVE bytes sweep one row at a time when a task's row is at most
# ONE_ROW_BYTES long, and at least MOMENTS_ONE_ROW_FROM bytes for the statistics pass
# (its shorter rows keep the four-row sweeps and the prefetch).
ONE_ROW_BYTES = 2048
MOMENTS_ONE_ROW_FROM = 512


@borrowing
def one_row_sweeps(width, itemsize, size, shortest):
    """Whether a reduction over ``width`` columns of an input of ``size`` elements of
    ``itemsize`` bytes sweeps one row at a time: the input is beyond ``PREFETCH_ABOVE``
    bytes and a row is ``shortest`` to ``ONE_ROW_BYTES`` bytes long."""
    row = width * _U(itemsize)
    big = size * _U(itemsize) > _U(PREFETCH_ABOVE)
    return big and _U(shortest) <= row and row <= _U(ONE_ROW_BYTES)


@borrowing
def prefetching(width, itemsize, size):
    """Whether a four-row sweep over ``width`` columns of an input of ``size`` elements of
    ``itemsize`` bytes prefetches the rows ``PREFETCH_ROWS`` ahead."""
    big = size * _U(itemsize) > _U(PREFETCH_ABOVE)
    return big and width * _U(itemsize) <= _U(PREFETCH_ROW_BYTES)


@borrowing
def prefetch_four_rows(a, b, i0, C, width):
    """Prefetch the lines of four rows of ``width`` elements of ``a`` and of ``b`` (may be
    ``a``), the first from flat index ``i0``, each ``C`` after the one before. A function of
    its own, called once per sweep: compiled once, not once per loop that calls it."""
    line = _U(64 // a.itemsize)
    for q in range(4):
        base = i0 + _U(q) * C
        k = _U(0)
        while k < width:
            prefetch(a, base + k)
            prefetch(b, base + k)
            k += line
