"""The one table of test inputs: memory relayouts, layouts, shapes, tolerances, and the
float64 oracle. Test modules import from here instead of defining their own.

- ``relayout(a, how)``: the same values in another memory layout (``RELAYOUTS`` names them).
- ``LAYOUTS``: the core suite, one case per layout family, swept by the oracle tests.
- ``ODD_LAYOUTS``: odd-but-valid arrays that must give the answer of a contiguous copy.
- ``FAMILIES`` and ``DRIVER_SHAPES``: shapes that reach each kernel family and driver.
- ``TOL`` (against the float64 reference) and ``TOL_REORDERED`` (against another
  summation order of the same computation), per dtype.
"""

import numpy as np

import fastbn

# -- memory relayouts: same shape and values, another memory layout ------------------------


def memory_order(a, order):
    """``a`` with memory in the axis order ``order`` (``(0, 2, 3, 1)``: NCHW values in NHWC
    memory, like torch.channels_last)."""
    return np.ascontiguousarray(a.transpose(order)).transpose(np.argsort(order))


def reversed_axes(a, axes=None):
    """``a`` stored backwards along ``axes`` (all of them when None): negative strides."""
    axes = range(a.ndim) if axes is None else axes
    idx = tuple(slice(None, None, -1) if i in axes else slice(None) for i in range(a.ndim))
    return np.ascontiguousarray(a[idx])[idx]


def every_other(a):
    """A strided view of a buffer twice as long along the last axis."""
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    big[..., ::2] = a
    return big[..., ::2]


def read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def byteswapped(a):
    return a.astype(a.dtype.newbyteorder(">" if a.dtype.byteorder in "=<" else "<"))


def broadcast_rows(a):
    """Zero stride along the first axis: every sample is the first one."""
    return np.broadcast_to(a[:1], a.shape)


def permuted(a, seed):
    """Memory in a random axis order drawn from ``seed``."""
    return memory_order(a, np.random.default_rng(seed).permutation(a.ndim))


RELAYOUTS = {
    "contiguous": lambda a: a.copy(),  # C order
    "fortran": np.asfortranarray,
    "channels_last": lambda a: memory_order(a, (0, 2, 3, 1)),
    "odd_order": lambda a: memory_order(a, (2, 1, 3, 0)),  # memory order (H, C, W, N)
    "reverse": lambda a: reversed_axes(a, (0, 2)),  # first and last of a 3-d array
    "reverse_all": reversed_axes,
    "every_other": every_other,
    "read_only": read_only,
    "byteswapped": byteswapped,
    "broadcast_rows": broadcast_rows,
}


def relayout(a, how, *, seed=0):
    """``a`` itself for ``how=None``, ``permuted(a, seed)`` for ``"permuted"``, else
    ``RELAYOUTS[how](a)``."""
    if how is None:
        return a
    if how == "permuted":
        return permuted(a, seed)
    return RELAYOUTS[how](a)


# -- layouts: (shape, channel axis, relayout) -----------------------------------------------

LAYOUTS = {
    "ND": ((67, 13), 1, None),
    "NCL": ((9, 6, 23), 1, None),
    "NCHW": ((5, 7, 6, 9), 1, None),
    "NCHW_2x2": ((16, 8, 2, 2), 1, None),  # tiny planes (fastbn._plan.TINY_PLANE_BYTES)
    "NHWC": ((5, 6, 9, 7), -1, None),
    "NCHW_channels_last_memory": ((5, 7, 6, 9), 1, "channels_last"),
    "axis0": ((11, 8, 5), 0, None),
    "axis2_of_4d": ((3, 4, 6, 5), 2, None),
    "fortran": ((31, 9, 4), 1, "fortran"),
    "negative_strides": ((17, 5, 8), 1, "reverse"),
    "strided_view": ((40, 12), 1, "every_other"),
    "read_only": ((23, 6, 5), 1, "read_only"),
    "wide_rows": ((9, 5000), 1, None),
}

# name: (shape, axis, relayout, same canonical order as the contiguous copy: then the
# kernels sum in the same order and the bits must be equal; channels innermost in memory
# changes the order)
ODD_LAYOUTS = {
    "fortran_2d": ((40, 7), 1, "fortran", True),
    "fortran_4d": ((3, 4, 5, 6), 1, "fortran", True),
    "negative_strides": ((9, 4, 7), 1, "reverse_all", True),
    "every_other_column": ((20, 5), 1, "every_other", True),
    "every_other_inner": ((6, 3, 10), 1, "every_other", True),
    "transposed_4d_nhwc_memory": ((4, 5, 3, 6), 1, "channels_last", False),
    "transposed_4d_odd_order": ((4, 5, 3, 6), 1, "odd_order", True),
    "read_only": ((12, 4, 3), 1, "read_only", True),
    "byteswapped": ((16, 5), 1, "byteswapped", True),
    "byteswapped_nchw": ((4, 3, 5, 2), 1, "byteswapped", True),
    "channels_last_axis_neg1": ((4, 3, 5, 6), -1, "fortran", True),
    "axis0": ((5, 11, 2), 0, "reverse_all", True),
    "one_channel": ((50, 1), 1, "fortran", True),
    "one_channel_nchw": ((4, 1, 3, 3), 1, "channels_last", False),
    "many_channels_n2": ((2, 70001), 1, "fortran", True),
    "n_times_inner_2_rows": ((2, 6), 1, "reverse_all", True),
    "n_times_inner_2_planes": ((1, 6, 2), 1, "fortran", True),
    "n_times_inner_2_axis0": ((6, 2), 0, "fortran", True),
}

# -- shapes that reach each kernel family and driver: (shape, channel axis[, relayout]) ----

# the two kernel families, small (serial) and large (parallel)
FAMILIES = {
    "rows_small": ((37, 5), 1),
    "rows_parallel": ((40000, 5), 1),
    "planes_small": ((3, 5, 7), 1),
    "planes_parallel": ((4, 5, 20000), 1),
    "channels_last": ((6, 7, 5), -1),
    # tiny planes, seen by the kernels as rows of C * inner columns (_plan.TINY_PLANE_BYTES)
    "tiny_planes_small": ((6, 5, 2, 2), 1),
    "tiny_planes_parallel": ((4096, 8, 2, 2), 1),
}

# both families' parallel drivers (several tasks, above the serial threshold), plus one
# small shape on the serial kernels
DRIVER_SHAPES = [
    ((4, 8, 1024), 1, None),  # planes, 8 channels x 1 block
    ((1040, 64), 1, None),  # rows, 2 blocks of rows
    ((8, 5000), 1, None),  # rows wider than the split width: 5 column chunks
    ((40, 16, 16, 8), -1, None),  # channels-last, rows, 2 blocks
    ((16, 3, 40, 40), 1, "channels_last"),  # NCHW with NHWC memory: rows, 2 blocks
    ((24, 5), 1, None),  # small: serial kernels
    ((2048, 16, 3, 3), 1, None),  # tiny planes folded into rows of 144 columns, 2 blocks
]

# -- random inputs, the float64 oracle and tolerances ---------------------------------------


def random_case(rng, layout, dtype, *, scale=1.0, offset=0.0):
    shape, axis, how = LAYOUTS[layout]
    C = shape[axis]
    x = (offset + scale * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = (1.0 + 0.5 * rng.standard_normal(C)).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    return relayout(x, how), relayout(dy, how), gamma, beta, axis


def f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def oracle(x, dy, gamma, beta, axis, **kw):
    """The reference computed in float64: (y, dx, dgamma, dbeta)."""
    y, cache = fastbn.reference.batch_norm(f64(x), f64(gamma), f64(beta), axis=axis, **kw)
    dx, dgamma, dbeta = fastbn.reference.batch_norm_backward(f64(dy), cache)
    return y, dx, dgamma, dbeta


def rel_err(a, b):
    """max |a - b| / max |b| (0 when both are all zeros)."""
    a, b = f64(a), f64(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = np.max(np.abs(b)) if b.size else 0.0
    diff = np.max(np.abs(a - b)) if b.size else 0.0
    return diff / scale if scale > 0 else diff


# rel_err of fastbn's results against the float64 reference
TOL = {np.float32: 2e-6, np.float64: 1e-12}
# rel_err of two fastbn results that sum in different orders (another memory layout)
TOL_REORDERED = {np.float32: 1e-6, np.float64: 1e-13}
