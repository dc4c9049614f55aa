"""fastbn against the float64 naive reference, over layouts, dtypes and modes."""

import numpy as np
import pytest

import fastbn

from _cases import LAYOUTS, TOL, f64, oracle, random_case, rel_err


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_training_forward_backward(layout, dtype):
    rng = np.random.default_rng(abs(hash(layout)) % 2**32)
    x, dy, gamma, beta, axis = random_case(rng, layout, dtype, scale=3.0, offset=2.0)
    x_before = x.copy()
    y, cache = fastbn.batch_norm(x, gamma, beta, axis=axis)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, cache)
    y_ref, dx_ref, dgamma_ref, dbeta_ref = oracle(x, dy, gamma, beta, axis)
    assert y.dtype == dtype and dx.dtype == dtype
    assert y.shape == x.shape and dx.shape == x.shape
    assert dgamma.dtype == gamma.dtype and dbeta.dtype == beta.dtype
    tol = TOL[dtype]
    assert rel_err(y, y_ref) < tol
    assert rel_err(dx, dx_ref) < tol
    assert rel_err(dgamma, dgamma_ref) < tol
    assert rel_err(dbeta, dbeta_ref) < tol
    np.testing.assert_array_equal(x, x_before)  # input untouched


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["ND", "NCHW", "NHWC", "fortran"])
def test_running_stats_and_eval(layout, dtype):
    rng = np.random.default_rng(7)
    x, dy, gamma, beta, axis = random_case(rng, layout, dtype, scale=2.0, offset=-1.0)
    C = gamma.shape[0]
    rm, rv = rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    rm_ref, rv_ref = f64(rm).copy(), f64(rv).copy()
    fastbn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, momentum=0.3, axis=axis)
    oracle(x, dy, gamma, beta, axis, running_mean=rm_ref, running_var=rv_ref, momentum=0.3)
    assert rel_err(rm, rm_ref) < TOL[dtype]
    assert rel_err(rv, rv_ref) < TOL[dtype]

    y, cache = fastbn.batch_norm(
        x, gamma, beta, training=False, running_mean=rm, running_var=rv, axis=axis
    )
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, cache)
    y_ref, dx_ref, dgamma_ref, dbeta_ref = oracle(
        x, dy, gamma, beta, axis, training=False, running_mean=f64(rm), running_var=f64(rv)
    )
    for got, want in [(y, y_ref), (dx, dx_ref), (dgamma, dgamma_ref), (dbeta, dbeta_ref)]:
        assert rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_no_affine(dtype):
    rng = np.random.default_rng(3)
    x, dy, _, _, axis = random_case(rng, "NCHW", dtype)
    y, cache = fastbn.batch_norm(x, None, None, axis=axis)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, cache)
    y_ref, dx_ref, _, _ = oracle(x, dy, None, None, axis)
    assert dgamma is None and dbeta is None
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(dx, dx_ref) < TOL[dtype]


@pytest.mark.parametrize("layout", ["ND", "NCHW", "NCHW_channels_last_memory", "fortran"])
def test_out_arguments(layout):
    rng = np.random.default_rng(11)
    x, dy, gamma, beta, axis = random_case(rng, layout, np.float32)
    y_new, cache = fastbn.batch_norm(x, gamma, beta, axis=axis)
    dx_new, _, _ = fastbn.batch_norm_backward(dy, cache)
    out = np.full_like(x, np.nan)
    y, cache = fastbn.batch_norm(x, gamma, beta, axis=axis, out=out)
    assert y is out
    np.testing.assert_array_equal(out, y_new)
    dx_out = np.full_like(x, np.nan)
    dx, _, _ = fastbn.batch_norm_backward(dy, cache, out=dx_out)
    assert dx is dx_out
    np.testing.assert_array_equal(dx_out, dx_new)


def test_output_keeps_channels_last_memory():
    rng = np.random.default_rng(5)
    x, dy, gamma, beta, axis = random_case(rng, "NCHW_channels_last_memory", np.float32)
    y, cache = fastbn.batch_norm(x, gamma, beta, axis=axis)
    dx, _, _ = fastbn.batch_norm_backward(dy, cache)
    assert y.transpose(0, 2, 3, 1).flags.c_contiguous
    assert dx.transpose(0, 2, 3, 1).flags.c_contiguous


def test_large_channel_count_rows_split():
    """C > 4096 uses column chunks; every chunk must land in the right place."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((64, 9000)).astype(np.float32) * 2 + 1
    dy = rng.standard_normal(x.shape).astype(np.float32)
    g = rng.standard_normal(9000).astype(np.float32)
    b = rng.standard_normal(9000).astype(np.float32)
    y, cache = fastbn.batch_norm(x, g, b)
    dx, dg, db = fastbn.batch_norm_backward(dy, cache)
    y_ref, dx_ref, dg_ref, db_ref = oracle(x, dy, g, b, 1)
    for got, want in [(y, y_ref), (dx, dx_ref), (dg, dg_ref), (db, db_ref)]:
        assert rel_err(got, want) < 2e-6


@pytest.mark.parametrize("shape", [(100_000, 3), (3, 2, 40_000), (70_001, 1), (2, 1, 3)])
def test_many_blocks_and_tiny_shapes(shape):
    """Shapes that hit many task blocks, ragged last blocks and a single block."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape) * 5 + 3
    dy = rng.standard_normal(shape)
    y, cache = fastbn.batch_norm(x, None, None)
    dx, _, _ = fastbn.batch_norm_backward(dy, cache)
    y_ref, dx_ref, _, _ = oracle(x, dy, None, None, 1)
    assert rel_err(y, y_ref) < 1e-12
    assert rel_err(dx, dx_ref) < 1e-11


def test_float16_is_computed_in_float32_and_returned_as_float16():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 4)).astype(np.float16)
    y, cache = fastbn.batch_norm(x, None, None)
    dx, _, _ = fastbn.batch_norm_backward(np.ones_like(x), cache)
    assert y.dtype == np.float16 and dx.dtype == np.float16
    y_ref, _, _, _ = oracle(x, np.ones_like(x), None, None, 1)
    assert rel_err(y, y_ref) < 1e-3


def test_reference_matches_its_own_float64_run():
    """The reference itself in float32 agrees with float64 on benign data."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    y32, _ = fastbn.reference.batch_norm(x, None, None)
    y64, _ = fastbn.reference.batch_norm(x.astype(np.float64), None, None)
    assert y32.dtype == np.float32
    assert rel_err(y32, y64) < 1e-5


@pytest.mark.parametrize("fuse_bytes", [0, 1 << 40])
@pytest.mark.parametrize("layout", ["NCL", "NCHW", "axis0", "axis2_of_4d", "read_only"])
def test_planes_fused_and_blocked_agree_with_reference(layout, fuse_bytes, monkeypatch):
    """Planes are processed channel by channel (fused) when a channel fits in L2, else in
    blocks: both partitions must match the oracle (running statistics and eval too)."""
    from fastbn import _plan, _view

    monkeypatch.setattr(_plan, "FUSE_BYTES", fuse_bytes)
    monkeypatch.setattr(_plan, "_plans", {})
    monkeypatch.setattr(_view, "_views", {})  # views hold their plan
    rng = np.random.default_rng(12)
    x, dy, gamma, beta, axis = random_case(rng, layout, np.float64, scale=3.0, offset=1.0)
    C = gamma.shape[0]
    rm, rv = np.zeros(C), np.ones(C)
    y, cache = fastbn.batch_norm(x, gamma, beta, axis=axis, running_mean=rm, running_var=rv)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, cache)
    rm_ref, rv_ref = np.zeros(C), np.ones(C)
    want = oracle(x, dy, gamma, beta, axis, running_mean=rm_ref, running_var=rv_ref)
    for got, exp in zip((y, dx, dgamma, dbeta, rm, rv), (*want, rm_ref, rv_ref)):
        assert rel_err(got, exp) < 1e-12
    y_eval, cache = fastbn.batch_norm(
        x, gamma, beta, axis=axis, training=False, running_mean=rm, running_var=rv
    )
    dx_eval, _, _ = fastbn.batch_norm_backward(dy, cache)
    want = oracle(x, dy, gamma, beta, axis, training=False, running_mean=rm, running_var=rv)
    assert rel_err(y_eval, want[0]) < 1e-12
    assert rel_err(dx_eval, want[1]) < 1e-12
