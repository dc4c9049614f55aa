"""The work partition: how a canonical shape ``(outer, C, inner)`` is cut into tasks.

The partition depends only on the shape and the element size, never on the thread
count, so the reduction order (and hence every bit of the result) is the same on 1
thread or 16 and from run to run. ``Plan.ints`` is what the kernels read (rows named in
``fastbn._kernels.layout``).
"""

import glob

import numpy as np

from ._kernels import layout as L

# Elements per task: big enough to amortize a task, small enough for 2+ threads.
_TASK_ELEMENTS = 1 << 16
# Row chunks wider than this are split into column chunks (rows family). From memory
# the chunks are _MAX_SPLIT_WIDTH wide (they were _SPLIT_WIDTH wide until 2026-12-03:
# parallel passes, probe units, float32 statistics / gradient sums, 1024 -> 4096
# columns: 1024x16384 0.72-0.75 -> 0.67-0.68 / 1.37-1.59 -> 1.22-1.45, 2048x8192 0.75 ->
# 0.66 / 1.35 -> 1.20, 512x32768 0.83 -> 0.73 / 1.45 -> 1.37; float64 512x16384 0.77 ->
# 0.73 / 1.61 -> 1.45, 1024x8192 0.89 -> 0.78 / 1.37 -> 1.26; a whole 16384-column row
# was no faster than 4096 columns).
_MAX_SPLIT_WIDTH = 4096
_SPLIT_WIDTH = 1024
# ... and so are rows wider than _SPLIT_WIDTH of inputs below this many bytes, which sit
# in cache: a sweep of such rows keeps three float64 rows of the chunk's width (shift
# and two sums) as accumulators, 96 KiB for 4096 columns, past L1 (48 KiB), and
# stalls on them. Moments pass, serial, float32: (64, 4096) 78 -> 41 us, (32, 4096)
# 36 -> 25 us, (128, 2048) 55 -> 44 us. From memory the chunks' rows lie on more pages
# (prefetch and TLB) and the split measured even or worse: (4096, 4096) 3.37 -> 3.67 ms.
_SPLIT_BELOW_BYTES = 16 << 20
# Row blocks each have a row of float64 partial sums per channel; fresh multi-MiB
# partial buffers page-fault on every call, so blocks grow until there are at most
# _MAX_BLOCKS of them and a buffer holds at most _MAX_PARTIALS values (README,
# performance notes). Wide rows still give many tasks through their column splits.
_MAX_BLOCKS = 64
_MAX_PARTIALS = 1 << 15
# Below this many elements a parallel region costs more than it saves: at 32K float32
# elements (NCHW (32, 16, 8, 8)) the parallel forward kernel was 10.9 us against 12.1 us
# serial, but whole calls on 2 threads took 18.9 us against 16.9 us on one (waking the
# threads, timing both modes); at 64K, 24.4 us against 26.8 us.
SERIAL_BELOW = 1 << 16
# Planes of one channel up to this many bytes are processed by one task that reads them
# from memory once per pass and again from its core's L2 cache.
FUSE_BYTES = 512 << 10
# ... except for inputs below SERIAL_BELOW elements (in cache anyway) with planes of
# SHORT_PLANE_BYTES to LONG_PLANE_BYTES: a channel's planes, one every C * inner elements,
# are written far slower than the same planes in memory order (serial elementwise pass,
# float32 (32, 16, 64): 5.5 us channel by channel against 3.4 us in memory order), so such
# inputs take the two-pass path, whose elementwise tasks run their planes in memory order.
# Tinier planes (2x2: 16 bytes in float32) stayed fused: a loop per plane cost more than
# the order saved there ((512, 16, 4): 16.9 us fused, 20.3 us in memory order). Since
# 2026-12-04 planes of up to TINY_PLANE_BYTES are folded into rows (below) unless the
# input has too few rows; only those keep this rule.
SHORT_PLANE_BYTES = 64
LONG_PLANE_BYTES = 1024
# Planes of at most TINY_PLANE_BYTES (2x2 to 4x8 float32, 2x2 to 4x4 float64) are not
# swept plane by plane at all: the memory of (outer, C, inner) is that of rows of
# C * inner columns, and the rows family runs on those columns, the statistics and
# gradient sums of a channel's inner columns then merged (Chan's formula, in column order)
# and its coefficients repeated over them (``Plan.fold``). Fused planes of 16 bytes spent
# their time in per-plane loops of 4 elements. Layer, float32, planes -> folded rows
# (2026-12-04): (256, 64, 2, 2) forward 92 -> 21.5 us, forward+backward 202 -> 54;
# (128, 32, 4, 4) 40 -> 22-24 / 93 -> 55-58; (256, 16, 32) 67-72 -> 45-56 / 134-153 ->
# 104-125; 256-byte planes lost ((32, 16, 8, 8): 14.3 -> 16.8 / 32.5 -> 37.1).
# A folded call also makes float64 arrays of C * inner columns (the statistics' partial
# sums, the mean repeated for the gradient sums) and the storage-dtype coefficients of
# every column, which cost more than the data when there are few rows and very many
# columns. Inputs of fewer than FOLD_MIN_ROWS rows fold only up to FOLD_MAX_COLUMNS[k]
# columns for planes of up to FOLD_INNER[k] values. Measured 2026-12-04, functional
# forward+backward, planes -> folded, float32: (2, 131072, 8) 34.6 -> 22.8 ms, (2,
# 262144, 2, 2) 68.6 -> 25.8 ms, (2, 8192, 16) 2.20 -> 1.22 ms, (2, 65536, 16) 17.7 ->
# 25.9 (lost: 1M columns), (2, 1024, 32) 320 -> 252 us, (2, 4096, 32) 1.26 -> 1.43 ms
# (lost: 131072 columns), (4, 8192, 32) 3.08 -> 4.22; float64 (2, 8192, 4, 4) 2.34 ->
# 1.69 ms. A single outer index (one sample) is not folded: its planes are the whole
# input.
TINY_PLANE_BYTES = 128
FOLD_MIN_ROWS = 16
FOLD_INNER = (8, 16, 32)
FOLD_MAX_COLUMNS = (1 << 62, 262144, 32768)


def _last_level_cache_bytes(default=32 << 20):
    """The size of the largest CPU cache Linux reports (sysfs), else ``default``."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            continue
    return max(sizes) if sizes else default


# Outputs of at least this many bytes are written with streaming stores: an output that
# big cannot stay in the last-level cache next to its input anyway, and smaller ones,
# which ordinary stores leave in cache for the next call, measured faster without (on a
# 32 MiB L3). At most _MAX_STREAM_BYTES: the last-level cache that Linux reports is the
# whole socket's, shared with every other process and, in a VM, with other guests; a
# 2-core VM on an Emerald Rapids host reports 300 MiB, and half of it kept outputs of
# 16-64 MiB off streaming stores: (4096, 1024) float32 forward+backward with out= 8.7 ms
# with ordinary stores against 5.8 ms streamed, (16384, 1024) 21.5 against 18.2 ms,
# forward (65536, 256) 11.6 against 7.6 ms.
_MAX_STREAM_BYTES = 16 << 20


def stream_threshold(last_level_cache_bytes):
    """The ``STREAM_BYTES`` of a processor reporting this last-level cache size."""
    return min(last_level_cache_bytes // 2, _MAX_STREAM_BYTES)


STREAM_BYTES = stream_threshold(_last_level_cache_bytes())


def _balanced(outer, block_len):
    """Rows per block for ``outer`` rows cut into as many blocks as ``block_len`` gives,
    all of the same length but the last, which is shorter by less than one row per
    block: a parallel-sized input a little larger than one task got a full block and a
    remainder (``(129, 509)``: 128 rows and 1), which left the second thread nearly
    idle. Parallel kernels alone, float32, 2 threads, equal blocks against the old
    ones (2026-12-03): (200, 512) forward 27.5-33.7 against 32.1-34.9 us, backward
    37.4-39.1 against 41.8-42.0; (129, 509) backward 26.4-37.4 against 39.1-39.7.

    An input that fits one task keeps one (serial only). Cut in two, (128, 512) float32
    ran its parallel kernels faster alone (backward 26.6 -> 22.5 us) but slower in
    ``python -m fastbn bench``, next to torch's threads: forward 43-255 us against 30-31
    us as one serial task, forward+backward 99-131 against 75-90 (three runs each)."""
    return -(-outer // max(1, -(-outer // block_len)))


class Plan:
    """How one canonical shape of ``itemsize``-byte elements is cut into tasks.

    Reductions: block ``b`` of ``block_len`` outer indices times split ``k`` of
    ``split_width`` columns (rows family) or channel ``k`` (planes). The elementwise
    pass keeps no per-column state: its tasks are ``affine_block`` whole rows, or
    ``affine_block`` outer indices times ``affine_channels`` channels of planes (one
    channel, all outer indices, in a fused plan: its task is the channel).
    ``counts[b]``: values per channel in block ``b`` (float64).

    Tiny planes (``TINY_PLANE_BYTES``) get the rows plan of ``(outer, C * inner)``:
    ``fold`` is then ``inner`` (else 1) and the kernels' channels (``ints[CHANNELS]``,
    ``columns``) are the ``C * inner`` columns, ``counts`` per column; ``C``, ``inner``,
    ``count`` and the per-channel arrays stay the canonical view's.
    """

    __slots__ = ("outer", "C", "inner", "ints", "counts", "count", "parallel", "fused")
    __slots__ += ("ones", "zeros", "choices", "fold", "columns")

    def __init__(self, outer, C, inner, itemsize):
        self.outer, self.C, self.inner = outer, C, inner
        small = outer * C * inner < SERIAL_BELOW
        short = SHORT_PLANE_BYTES <= inner * itemsize < LONG_PLANE_BYTES
        # tiny planes: the kernels see rows of C * inner columns (see TINY_PLANE_BYTES)
        tiny = 1 < inner and inner * itemsize <= TINY_PLANE_BYTES
        rows = outer >= FOLD_MIN_ROWS or (outer > 1 and _few_rows_fold(C, inner))
        self.fold = inner if tiny and rows else 1
        # the kernels' channels: per-column arrays (coefficients, ``work``) have this many
        self.columns = C * self.fold
        fused = inner > 1 and outer * inner * itemsize <= FUSE_BYTES and not (small and short)
        self.fused = fused and self.fold == 1
        if self.fold > 1:
            C, inner = self.columns, 1
        if inner == 1:
            cached = outer * C * itemsize < _SPLIT_BELOW_BYTES
            if cached and C > _SPLIT_WIDTH:
                split_width = _SPLIT_WIDTH
            else:
                split_width = min(C, _MAX_SPLIT_WIDTH)
            nsplit = -(-C // split_width) if C else 0
            max_blocks = max(1, min(_MAX_BLOCKS, _MAX_PARTIALS // max(C, 1)))
            block_len = max(4, _TASK_ELEMENTS // max(split_width, 1), -(-outer // max_blocks))
            affine_block, affine_channels = max(1, _TASK_ELEMENTS // max(C, 1)), max(C, 1)
            if outer * C >= SERIAL_BELOW:
                # inputs the parallel targets may run: blocks (and elementwise tasks) of
                # equal rows (see _balanced)
                block_len = _balanced(outer, block_len)
                affine_block = _balanced(outer, affine_block)
        else:
            split_width = 1
            nsplit = C
            block_len = max(1, outer) if self.fused else max(1, _TASK_ELEMENTS // inner)
            if self.fused:  # a fused task is a channel, its elementwise part too
                affine_block, affine_channels = max(1, outer), 1
            else:  # about _TASK_ELEMENTS per task, its planes in memory order
                planes = max(1, _TASK_ELEMENTS // inner)
                affine_block, affine_channels = max(1, planes // max(C, 1)), max(1, min(C, planes))
        nblocks = max(1, -(-outer // block_len))
        ntasks = nblocks * nsplit
        affine_tasks = max(1, -(-outer // affine_block)) * max(1, -(-C // affine_channels))
        self.parallel = ntasks > 1 and outer * C * inner >= SERIAL_BELOW
        ints = np.zeros(L.PLAN_SIZE, np.int64)
        ints[L.OUTER], ints[L.CHANNELS], ints[L.INNER] = outer, C, inner
        ints[L.BLOCK_LEN], ints[L.NBLOCKS], ints[L.NSPLIT] = block_len, nblocks, nsplit
        ints[L.SPLIT_WIDTH], ints[L.NTASKS] = split_width, ntasks
        ints[L.PARALLEL], ints[L.FUSED] = self.parallel, self.fused
        ints[L.AFFINE_BLOCK], ints[L.AFFINE_TASKS] = affine_block, affine_tasks
        ints[L.AFFINE_CHANNELS] = affine_channels
        ints[L.FOLD] = self.fold
        self.ints = ints
        # values per channel (per column of a folded plan) in each block
        counts = np.full(nblocks, float(block_len * inner))
        counts[-1] = float((outer - (nblocks - 1) * block_len) * inner)
        self.counts = counts
        self.count = float(outer * self.inner)  # values per channel
        self.choices = {}  # serial or parallel, per operation (fastbn._choice)
        storage = np.float32 if itemsize == 4 else np.float64
        self.ones = np.ones(self.C, storage)  # gamma when there is none
        self.zeros = np.zeros(self.C, storage)  # beta when there is none


def _few_rows_fold(C, inner):
    """Whether an input of fewer than ``FOLD_MIN_ROWS`` rows and tiny planes of ``inner``
    values is folded (see ``FOLD_MAX_COLUMNS``)."""
    for most_inner, most_columns in zip(FOLD_INNER, FOLD_MAX_COLUMNS):
        if inner <= most_inner:
            return C * inner <= most_columns
    return False


_plans = {}


def plan_for(outer, C, inner, itemsize):
    """The (cached) ``Plan`` of a canonical shape."""
    key = (outer, C, inner, itemsize)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) > 256:
            _plans.clear()
        plan = _plans[key] = Plan(outer, C, inner, itemsize)
    return plan
