"""Accuracy where naive formulas lose digits: large offsets in float32."""

import numpy as np
import pytest

import fastbn


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
