"""Shared test inputs: layouts, random cases and the float64 oracle."""

import numpy as np

import fastbn

# name -> (shape, axis, memory transform). The transform returns an array with the
# same values and a different memory layout.
LAYOUTS = {
    "ND": ((67, 13), 1, None),
    "NCL": ((9, 6, 23), 1, None),
    "NCHW": ((5, 7, 6, 9), 1, None),
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


def relayout(x, how):
    if how is None:
        return x
    if how == "channels_last":  # NCHW values with NHWC memory, like torch.channels_last
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    if how == "fortran":
        return np.asfortranarray(x)
    if how == "reverse":
        return np.ascontiguousarray(x[::-1, :, ::-1])[::-1, :, ::-1]
    if how == "every_other":  # a strided view of a bigger buffer
        big = np.zeros((x.shape[0], 2 * x.shape[1]), x.dtype)
        big[:, ::2] = x
        return big[:, ::2]
    if how == "read_only":
        x = x.copy()
        x.flags.writeable = False
        return x
    raise ValueError(how)


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


TOL = {np.float32: 2e-6, np.float64: 1e-12}
