"""Accuracy where naive formulas lose digits: large offsets in float32."""

import numpy as np
import pytest

import fastbn
from fastbn import reference


@pytest.mark.parametrize("shape", [(65536, 64), (4096, 1024), (64, 16, 32, 32)])
def test_large_offset_float32(shape):
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    C = shape[1]
    rm, rv = np.zeros(C, np.float32), np.zeros(C, np.float32)
    y, cache = fastbn.batch_norm(x, None, None, running_mean=rm, running_var=rv, momentum=1.0)
    x64 = x.astype(np.float64)
    axes = tuple(i for i in range(x.ndim) if i != 1)
    n = x.size // C
    var64 = x64.var(axis=axes)
    # the biased batch variance, recovered from the (unbiased) running_var
    var_rel = np.max(np.abs(rv.astype(np.float64) * (n - 1) / n - var64) / var64)
    assert var_rel <= 1e-6
    assert np.max(np.abs(cache.mean - x64.mean(axis=axes))) <= 1e-9 * 1e4
    y64, _ = fastbn.reference.batch_norm(x64, None, None)
    assert np.max(np.abs(y.astype(np.float64) - y64)) <= 2e-6


def test_naive_reference_loses_digits_where_fastbn_does_not():
    """The oracle is only trustworthy in float64: show the float32 naive loss."""
    rng = np.random.default_rng(1)
    x = (1e4 + rng.standard_normal((65536, 4))).astype(np.float32)
    y64, _ = fastbn.reference.batch_norm(x.astype(np.float64), None, None)
    y32_naive, _ = fastbn.reference.batch_norm(x, None, None)
    y_fast, _ = fastbn.batch_norm(x, None, None)
    err_fast = np.max(np.abs(y_fast - y64))
    err_naive = np.max(np.abs(y32_naive - y64))
    assert err_fast <= 2e-6
    assert err_naive > 10 * err_fast


def test_float64_huge_offset():
    rng = np.random.default_rng(2)
    x = 1e8 + rng.standard_normal((10000, 3))
    y, cache = fastbn.batch_norm(x, None, None)
    exact = np.var(x - 1e8, axis=0)
    assert np.max(np.abs(1.0 / cache.invstd**2 - 1e-5 - exact) / exact) < 1e-8


@pytest.mark.parametrize(
    "shape",
    [(512, 6), (64, 6, 40), (4, 6, 70000), (256, 6, 3, 3)],
    ids=["rows", "planes-fused", "planes-two-pass", "nchw"],
)
@pytest.mark.parametrize("training", [True, False])
def test_float32_coefficients_beyond_float32_range(shape, training):
    """gamma * invstd above 3.4e38 (gamma 1e36, variance 1e-8, eps 1e-10): the float32
    elementwise coefficients cannot hold it, so the kernels report it and the pass is
    redone in float64. y and dx stay finite and match the float64 reference; the other
    channels are unaffected."""
    rng = np.random.default_rng(11)
    C = shape[1]
    x = rng.standard_normal(shape)
    x[:, 0] *= 1e-4  # tiny variance in channel 0
    x = x.astype(np.float32)
    dy = (1e-6 * rng.standard_normal(shape)).astype(np.float32)
    gamma = np.ones(C, np.float32)
    gamma[0] = 1e36
    beta = np.zeros(C, np.float32)
    eps = 1e-10
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    g64, b64 = gamma.astype(np.float64), beta.astype(np.float64)
    if training:
        kw = {}
    else:
        kw = {
            "running_mean": x64.mean(axis=(0,) + tuple(range(2, x.ndim))),
            "running_var": x64.var(axis=(0,) + tuple(range(2, x.ndim))),
        }
    y_ref, cache_ref = reference.batch_norm(x64, g64, b64, training=training, eps=eps, **kw)
    dx_ref, _, _ = reference.batch_norm_backward(dy64, cache_ref)
    kw32 = {k: v.astype(np.float32) for k, v in kw.items()}
    y, cache = fastbn.batch_norm(x, gamma, beta, training=training, eps=eps, **kw32)
    dx, _, _ = fastbn.batch_norm_backward(dy, cache)
    assert np.abs(y_ref[:, 0]).max() > 1e35  # the case is real: channel 0's y is huge...
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))  # ...and still finite
    for got, want in ((y, y_ref), (dx, dx_ref)):
        scale = np.abs(want).max(axis=tuple(i for i in range(want.ndim) if i != 1))
        err = np.abs(got - want).max(axis=tuple(i for i in range(want.ndim) if i != 1))
        np.testing.assert_array_less(err, 1e-5 * scale)


@pytest.mark.parametrize("shape", [(4096, 64), (1024, 1024), (16, 64, 20, 20), (64, 16, 8)])
@pytest.mark.parametrize("dy_offset", [1e2, 1e4])
def test_float32_dx_with_offset_gradients(shape, dy_offset):
    """dy = offset + noise: dx = dy * g + (x - mean) * p + q cancels the offset between
    the first and last terms. float32 dx keeps float32 accuracy (relative to max |dx|)
    because dy is centred on its float32-rounded channel mean before scaling; the
    uncentred float32 formula loses 3e-6 (offset 1e2) to 3e-4 (1e4)."""
    rng = np.random.default_rng(5)
    C = shape[1]
    x = rng.standard_normal(shape).astype(np.float32)
    dy = (dy_offset + rng.standard_normal(shape)).astype(np.float32)
    gamma = (1 + 0.5 * rng.standard_normal(C)).astype(np.float32)
    beta = rng.standard_normal(C).astype(np.float32)
    _, cache = fastbn.batch_norm(x, gamma, beta)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, cache)
    _, cache_ref = reference.batch_norm(
        x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64)
    )
    dx_ref, dgamma_ref, dbeta_ref = reference.batch_norm_backward(dy.astype(np.float64), cache_ref)
    assert np.abs(dx - dx_ref).max() < 5e-7 * np.abs(dx_ref).max()
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-6)
