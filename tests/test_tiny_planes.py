"""Tiny planes (``_plan.TINY_PLANE_BYTES``: at most 128 bytes, 2x2 to 4x8 float32, 2x2 to
4x4 float64) are seen by the kernels as rows of ``C * inner`` columns: statistics and gradient
sums per column, merged per channel in column order, and the per-channel coefficients
repeated over each channel's columns. Oracles: the float64 reference, the merged moments
against NumPy's two-pass mean and variance, and the same bits on 1 and 2 threads and
between the operations that share the statistics (coefficients beyond float32's range:
tests/test_relu.py, whose shapes include tiny planes)."""

import numpy as np
import pytest

import fastbn
from fastbn import _plan
from fastbn._kernels import layout

from _cases import TOL, f64, oracle, rel_err

# (shape, dtype): serial and parallel-sized, 2x2 to 4x8 planes, few rows, one unfolded
SHAPES = [
    ((6, 5, 2, 2), np.float32),
    ((256, 64, 2, 2), np.float32),
    ((64, 32, 3, 3), np.float32),
    ((5, 7, 2, 2), np.float64),
    ((4096, 8, 2, 2), np.float32),
    ((2048, 16, 3, 3), np.float32),
    ((2, 6, 2), np.float64),
    ((3, 2, 7), np.float64),  # 56-byte planes
    ((24, 8, 4, 4), np.float64),  # 128-byte planes
    ((2, 600, 4, 8), np.float32),  # few rows, 19200 columns of 32 values: folded
    ((3, 9000, 8), np.float32),  # few rows, 72000 columns of 8 values: folded
    ((2, 2100, 32), np.float32),  # few rows, 67200 columns of 32 values: not folded
]


def _case(shape, dtype, seed=0, offset=3.0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = (offset + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = (1.0 + 0.5 * rng.standard_normal(C)).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    return x, dy, gamma, beta


def test_tiny_planes_fold_into_rows_of_columns():
    plan = _plan.Plan(512, 16, 4, 4)  # (512, 16, 2, 2) float32
    ints = plan.ints
    kernel_view = (ints[layout.OUTER], ints[layout.CHANNELS], ints[layout.INNER])
    assert kernel_view == (512, 64, 1) and ints[layout.FOLD] == 4
    assert plan.fold == 4 and plan.columns == 64 and not plan.fused
    assert (plan.C, plan.inner, plan.count, plan.ones.shape) == (16, 4, 2048.0, (16,))
    np.testing.assert_array_equal(plan.counts, [512.0])  # values per column
    assert _plan.Plan(4096, 8, 4, 4).parallel  # rows of 32 columns in several blocks
    assert _plan.Plan(8, 3, 7, 8).fold == 7  # 56 bytes of float64
    assert _plan.Plan(32, 64, 32, 4).fold == 32  # 128 bytes
    # few rows: up to a number of columns that shrinks as the planes grow (FOLD_MAX_COLUMNS)
    assert _plan.Plan(2, 2048, 4, 4).fold == 4
    assert _plan.Plan(2, 131072, 8, 4).fold == 8  # planes of 8 values: any number
    assert _plan.Plan(2, 8192, 16, 4).fold == 16 and _plan.Plan(3, 8192, 16, 8).fold == 16
    assert _plan.Plan(2, 1024, 32, 4).fold == 32 and _plan.Plan(2, 600, 32, 4).fold == 32
    assert _plan.Plan(3, 9000, 8, 4).fold == 8  # as SHAPES has them
    assert _plan.Plan(15, 65536, 16, 4).fold == 1 and _plan.Plan(16, 65536, 16, 4).fold == 16
    # 256-byte planes, rows, few rows of many columns and a single outer index are not
    unfolded = [(8, 3, 32, 8), (32, 16, 64, 4), (100, 37, 1, 8), (8, 3, 1, 4)]
    for shape in unfolded + [(2, 2048, 32, 4), (2, 2100, 32, 4), (2, 32768, 16, 4), (1, 6, 2, 8)]:
        plan = _plan.Plan(*shape)
        assert plan.fold == 1 and plan.columns == plan.C


@pytest.mark.parametrize("shape,dtype", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_forward_and_backward_match_the_float64_reference(shape, dtype, training, activation):
    x, dy, gamma, beta = _case(shape, dtype)
    C = shape[1]
    rng = np.random.default_rng(1)
    running_mean = rng.standard_normal(C).astype(dtype)
    running_var = rng.uniform(0.5, 2.0, C).astype(dtype)
    rm, rv = running_mean.copy(), running_var.copy()
    kw = dict(training=training, running_mean=rm, running_var=rv, momentum=0.1)
    y, cache = fastbn.batch_norm(x, gamma, beta, activation=activation, **kw)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, cache)
    ref_rm, ref_rv = np.array(running_mean, np.float64), np.array(running_var, np.float64)
    ref_kw = dict(training=training, running_mean=ref_rm, running_var=ref_rv, momentum=0.1)
    if activation is None:
        want = oracle(x, dy, gamma, beta, 1, **ref_kw)
    else:  # the ReLU's gradient masks dy where the float64 pre-activation is not positive
        pre, _ = fastbn.reference.batch_norm(f64(x), f64(gamma), f64(beta), axis=1, **ref_kw)
        # the float64 reference updated ref_rm and ref_rv; the oracle's own update is moot
        unused = dict(running_mean=ref_rm.copy(), running_var=ref_rv.copy())
        ref_kw.update(unused)
        want = oracle(x, f64(dy) * (pre > 0), gamma, beta, 1, **ref_kw)
        want = (np.maximum(want[0], 0),) + want[1:]
    tol = TOL[dtype]
    for got, expected in zip((y, dx, dgamma, dbeta, rm, rv), want + (ref_rm, ref_rv)):
        assert got.dtype == dtype
        assert rel_err(got, expected) < 20 * tol


@pytest.mark.parametrize("shape,dtype", SHAPES, ids=str)
def test_merged_moments_equal_numpy_two_pass(shape, dtype):
    """Statistics of far-off data (1e4 + N(0, 4)): Chan's merge of the columns keeps
    the variance's digits; ``fastbn.moments`` and the forward's cache agree bit for bit."""
    x, _, _, _ = _case(shape, dtype, seed=2, offset=1e4)
    axes = (0,) + tuple(range(2, x.ndim))
    mean, var = f64(x).mean(axis=axes), f64(x).var(axis=axes)
    _, cache = fastbn.batch_norm(x, training=True)
    assert rel_err(cache.mean, mean) < 1e-15
    var_tol = 1e-12 if dtype == np.float64 else 1e-9  # float64 sums of exact float32 data
    np.testing.assert_allclose(cache.stats[2], var, rtol=var_tol)
    m = fastbn.moments(x)
    assert m.mean.tobytes() == cache.mean.tobytes()
    assert m.var().tobytes() == cache.stats[2].tobytes()


def test_parallel_fold_gives_the_same_bits_on_one_and_two_threads():
    x, dy, gamma, beta = _case((4096, 8, 2, 2), np.float32, seed=3)
    results = []
    for threads in (1, 2):
        with fastbn.num_threads(threads):
            for _ in range(3):  # serial and parallel targets (fastbn._choice) alike
                y, cache = fastbn.batch_norm(x, gamma, beta, training=True, activation="relu")
                dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, cache)
                results.append(b"".join(a.tobytes() for a in (y, dx, dgamma, dbeta)))
    assert len(set(results)) == 1


def test_given_sums_and_stats_give_the_local_bits():
    """``grad_sums`` folds its columns as backward does: backward with the local sums
    given is backward without them, and ``stats=moments(x)`` is the forward without."""
    x, dy, gamma, beta = _case((64, 32, 3, 3), np.float32, seed=4)
    y, cache = fastbn.batch_norm(x, gamma, beta, training=True)
    y2, cache2 = fastbn.batch_norm(x, gamma, beta, training=True, stats=fastbn.moments(x))
    assert y.tobytes() == y2.tobytes()
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, cache)
    sums = fastbn.grad_sums(dy, cache)
    dx2, dgamma2, dbeta2 = fastbn.batch_norm_backward(dy, cache, sums=sums)
    for a, b in ((dx, dx2), (dgamma, dgamma2), (dbeta, dbeta2)):
        assert a.tobytes() == b.tobytes()
    centred = f64(x) - cache.mean[:, None, None]
    assert rel_err(sums[0], f64(dy).sum(axis=(0, 2, 3))) < 1e-12
    assert rel_err(sums[1], (f64(dy) * centred).sum(axis=(0, 2, 3))) < 1e-12
