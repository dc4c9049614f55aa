"""Named rows of the two small int/float arrays the kernels share with ``fastbn._plan``.

``plan`` (int64, made by ``fastbn._plan.Plan``) describes the canonical ``(outer, C,
inner)`` shape of the flat buffers and how the work is cut into tasks. ``work`` (the
storage dtype, ``(WORK_ROWS, C + spare)``, made by ``coefficients.working``) holds the
per-channel coefficients of the elementwise pass (its spare columns repeat the channels:
``coefficients.spare_columns``).
"""

import numpy as np

# -- plan ---------------------------------------------------------------------------------
(
    OUTER,  # canonical shape
    CHANNELS,
    INNER,
    BLOCK_LEN,  # outer indices per block of the reductions
    NBLOCKS,
    NSPLIT,  # column chunks per block (rows family), or C (planes family)
    SPLIT_WIDTH,
    NTASKS,  # NBLOCKS * NSPLIT reduction tasks
    PARALLEL,  # 1: run the parallel target
    FUSED,  # 1: planes whose channel fits in L2, one task per channel (see ``fused``)
    AFFINE_BLOCK,  # outer indices (whole rows, or rows of planes) per elementwise task
    AFFINE_TASKS,
    AFFINE_CHANNELS,  # channels per elementwise task (planes family; C for rows)
    FOLD,  # 1, or inner for tiny planes seen as rows of CHANNELS = C * inner columns
) = range(14)
PLAN_SIZE = 14

# -- work: per-channel coefficients of ``(x - m) * p + q (+ (dy - d) * g)`` ------------------
(
    W_MEAN,  # m: the mean, rounded to the storage dtype
    W_SCALE,  # p
    W_OFFSET,  # q, with the rounding remainders of m and d folded in
    W_DY_SCALE,  # g
    W_DY_MEAN,  # d: the mean of dy for dx (0 otherwise), rounded
    W_CLAMPED,  # 1 where a finite coefficient does not fit the storage dtype
) = range(6)
WORK_ROWS = 6

_U = np.uint64
