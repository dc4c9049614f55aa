"""Rows reductions of inputs beyond ``PREFETCH_ABOVE`` bytes sweep their rows otherwise
than in cache (``fastbn/_kernels/partition.py``): one row at a time (gradient sums with
rows of up to ``ONE_ROW_BYTES``, the statistics pass from ``MOMENTS_ONE_ROW_FROM``), or
four rows with the rows ahead prefetched (the statistics pass's shorter rows), four rows
without beyond. Each of these gets the float64 oracle's values, the same bits on one
thread and on two, and ReLU equal to the composition."""

import numpy as np
import pytest

import fastbn
from fastbn import _choice
from fastbn._kernels import partition

EPS = 1e-5


def _big_case(dtype, C):
    """Just past the threshold, an odd number of rows (a remainder after the four-row
    sweeps), an offset common to the data (3) and unit gradients around it."""
    itemsize = np.dtype(dtype).itemsize
    n = partition.PREFETCH_ABOVE // (C * itemsize) + 37
    rng = np.random.default_rng(11)
    x = (3.0 + rng.standard_normal((n, C))).astype(dtype)
    dy = rng.standard_normal((n, C)).astype(dtype)
    gamma = np.linspace(0.5, 1.5, C).astype(dtype)
    beta = np.linspace(-1.0, 1.0, C).astype(dtype)
    assert x.nbytes > partition.PREFETCH_ABOVE
    return x, dy, gamma, beta


# rows of 256 B (gradient sums one row at a time, statistics four rows and the prefetch),
# 1 KiB and 2 KiB (both one row at a time: 512 B <= row <= ONE_ROW_BYTES), 4 KiB (both
# four rows, no prefetch), and rows wider than ``fastbn._plan._MAX_SPLIT_WIDTH`` (column
# chunks of 4096 and a partial one, four rows each)
_SWEEPS = [(np.float32, 64), (np.float32, 256), (np.float64, 128), (np.float32, 512)]
_SWEEPS += [(np.float32, 1024), (np.float32, 9000)]


def test_the_cases_cover_each_sweep():
    rows = {np.dtype(d).itemsize * C for d, C in _SWEEPS}
    assert min(rows) < partition.MOMENTS_ONE_ROW_FROM
    assert partition.ONE_ROW_BYTES in rows
    assert max(rows) > partition.ONE_ROW_BYTES
    assert any(partition.MOMENTS_ONE_ROW_FROM <= r < partition.ONE_ROW_BYTES for r in rows)
    assert min(rows) <= partition.PREFETCH_ROW_BYTES


def _oracle(x, dy, gamma, beta):
    """Batch norm forward and backward in float64 NumPy, written out."""
    x64, dy64, g64 = x.astype(np.float64), dy.astype(np.float64), gamma.astype(np.float64)
    n = x64.shape[0]
    mean = x64.mean(axis=0)
    var = ((x64 - mean) ** 2).mean(axis=0)
    invstd = 1.0 / np.sqrt(var + EPS)
    xhat = (x64 - mean) * invstd
    y = g64 * xhat + beta.astype(np.float64)
    dbeta = dy64.sum(axis=0)
    dgamma = (dy64 * xhat).sum(axis=0)
    dx = g64 * invstd / n * (n * dy64 - dbeta - xhat * dgamma)
    return mean, var, y, dx, dgamma, dbeta


def _run(x, dy, gamma, beta, activation=None):
    y, cache = fastbn.batch_norm(x, gamma, beta, activation=activation)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, cache)
    return y, cache, dx, dgamma, dbeta


@pytest.mark.parametrize("dtype, C", _SWEEPS)
def test_memory_sweeps_match_the_oracle_and_thread_counts(dtype, C):
    x, dy, gamma, beta = _big_case(dtype, C)
    with _choice.delay(0):  # the first call of a plan runs the parallel target
        y, cache, dx, dgamma, dbeta = _run(x, dy, gamma, beta)
    mean, var, y64, dx64, dgamma64, dbeta64 = _oracle(x, dy, gamma, beta)
    np.testing.assert_allclose(cache.mean, mean, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(1.0 / cache.invstd**2 - EPS, var, rtol=1e-9)
    loose = 1e-10 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(y, y64, rtol=loose, atol=loose)
    np.testing.assert_allclose(dx, dx64, rtol=loose, atol=loose * np.abs(dx64).max())
    scale = loose * np.sqrt(x.shape[0])
    np.testing.assert_allclose(dgamma, dgamma64, rtol=loose, atol=scale)
    np.testing.assert_allclose(dbeta, dbeta64, rtol=loose, atol=scale)
    with fastbn.num_threads(1):
        y1, cache1, dx1, dgamma1, dbeta1 = _run(x, dy, gamma, beta)
    pairs = [(y, y1), (cache.mean, cache1.mean), (cache.invstd, cache1.invstd), (dx, dx1)]
    for a, b in pairs + [(dgamma, dgamma1), (dbeta, dbeta1)]:
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype, C", _SWEEPS)
def test_memory_relu_sweeps_equal_the_composition(dtype, C):
    """Each sweep with ReLU; one row at a time, the rows are masked four at a time and
    summed in the plain loop's order (a remainder of rows after the groups of four)."""
    x, dy, gamma, beta = _big_case(dtype, C)
    y, cache, dx, dgamma, dbeta = _run(x, dy, gamma, beta)
    y_relu, _, dx_relu, dgamma_relu, dbeta_relu = _run(x, dy, gamma, beta, activation="relu")
    np.testing.assert_array_equal(y_relu, np.maximum(y, 0))
    masked = dy * (y > 0)
    dx_comp, dgamma_comp, dbeta_comp = fastbn.batch_norm_backward(masked, cache)
    np.testing.assert_array_equal(dx_relu, dx_comp)
    np.testing.assert_array_equal(dgamma_relu, dgamma_comp)
    np.testing.assert_array_equal(dbeta_relu, dbeta_comp)
