"""fastbn.compat.dlfs.BatchNormalization against the book's documented formulas, and the
functional option the drop-ins need (``running_var_ddof``).

The oracle is written here from the formulas of "Deep Learning from Scratch"
(``common/layers.py``): batch mean, biased variance, ``eps = 1e-6``, ``running = m *
running + (1 - m) * batch``, and the closed-form gradient ``dx = gamma / std * (dout -
mean(dout) - xn * mean(dout * xn))``. Errors are normwise: ``max|a - b| / max|b|``.
"""

import numpy as np
import pytest

import fastbn
from fastbn.compat.dlfs import BatchNormalization

TOL = 1e-12


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b))
    return np.max(np.abs(a - b)) / (scale if scale else 1.0)


class Formulas:
    """The book's layer as formulas: forward (train/test), running update, gradients."""

    def __init__(self, momentum=0.9, eps=1e-6):
        self.m, self.eps = momentum, eps
        self.rm = self.rv = None

    def forward(self, x, gamma, beta, train=True):
        rows = x.reshape(x.shape[0], -1)
        if self.rm is None:
            self.rm, self.rv = np.zeros(rows.shape[1]), np.zeros(rows.shape[1])
        if train:
            mu = rows.mean(axis=0)
            var = ((rows - mu) ** 2).mean(axis=0)
            self.xn = (rows - mu) / np.sqrt(var + self.eps)
            self.std = np.sqrt(var + self.eps)
            self.rm = self.m * self.rm + (1 - self.m) * mu
            self.rv = self.m * self.rv + (1 - self.m) * var
            xn = self.xn
        else:
            xn = (rows - self.rm) / np.sqrt(self.rv + self.eps)
        self.shape = x.shape
        return (gamma * xn + beta).reshape(x.shape)

    def backward(self, dout, gamma):
        d = dout.reshape(dout.shape[0], -1)
        dbeta = d.sum(axis=0)
        dgamma = (d * self.xn).sum(axis=0)
        n = d.shape[0]
        dx = gamma / self.std * (d - dbeta / n - self.xn * dgamma / n)
        return dx.reshape(self.shape), dgamma, dbeta


@pytest.mark.parametrize("shape", [(100, 100), (7, 3), (6, 2, 3, 4), (5, 4, 3)])
def test_training_steps_match_the_formulas(shape):
    """Three SGD steps (gamma and beta updated in place in a params dict, as the book's
    optimizer does), then a test-mode forward: y, running stats, dx, dgamma, dbeta."""
    rng = np.random.default_rng(0)
    D = int(np.prod(shape[1:]))
    params = {"gamma": rng.uniform(0.5, 2, D), "beta": rng.standard_normal(D)}
    layer = BatchNormalization(params["gamma"], params["beta"])
    oracle = Formulas()
    for _ in range(3):
        x = rng.standard_normal(shape) * 3 + 2
        y = layer.forward(x, train_flg=True)
        assert y.shape == shape and y.dtype == np.float64
        assert rel(y, oracle.forward(x, params["gamma"], params["beta"])) < TOL
        assert rel(layer.running_mean, oracle.rm) < TOL
        assert rel(layer.running_var, oracle.rv) < TOL
        dout = rng.standard_normal(shape)
        dx = layer.backward(dout)
        dx_ref, dgamma_ref, dbeta_ref = oracle.backward(dout, params["gamma"])
        assert dx.shape == shape
        assert rel(dx, dx_ref) < TOL
        assert rel(layer.dgamma, dgamma_ref) < TOL
        assert rel(layer.dbeta, dbeta_ref) < TOL
        params["gamma"] -= 0.1 * layer.dgamma  # in place, as the book's SGD
        params["beta"] -= 0.1 * layer.dbeta
    x = rng.standard_normal(shape)
    y = layer.forward(x, train_flg=False)
    assert rel(y, oracle.forward(x, params["gamma"], params["beta"], train=False)) < TOL


def test_statistics_are_per_activation_for_4d_inputs():
    """(N, C, H, W) is flattened to (N, C*H*W): one mean per activation, not per channel."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 2, 3, 3)) + np.arange(18).reshape(1, 2, 3, 3)
    layer = BatchNormalization(np.ones(18), np.zeros(18), momentum=0.0)
    y = layer.forward(x)
    assert layer.running_mean.shape == (18,)
    assert rel(layer.running_mean, x.reshape(8, 18).mean(axis=0)) < TOL
    assert rel(y.reshape(8, 18).mean(axis=0), np.zeros(18)) < TOL  # every activation centred
    per_channel = (x - x.mean(axis=(0, 2, 3), keepdims=True)) / x.std(axis=(0, 2, 3), keepdims=True)
    assert rel(y, per_channel) > 1e-3  # not what the per-channel layers compute
    assert layer.backward(np.ones_like(y)).shape == (8, 2, 3, 3)


def test_eps_is_the_books_1e_minus_6():
    """At a variance of 1e-6, eps = 1e-6 and 1e-5 give visibly different outputs."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 4)) * 1e-3
    layer = BatchNormalization(np.ones(4), np.zeros(4))
    y = layer.forward(x)
    assert rel(y, Formulas(eps=1e-6).forward(x, 1.0, 0.0)) < TOL
    assert rel(y, Formulas(eps=1e-5).forward(x, 1.0, 0.0)) > 0.1


def test_running_stats_start_as_float64_zeros_at_the_first_forward():
    layer = BatchNormalization(np.ones(6, np.float32), np.zeros(6, np.float32))
    assert layer.running_mean is None and layer.running_var is None
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    y = layer.forward(x, train_flg=False)  # a test-mode forward creates them too
    for r in (layer.running_mean, layer.running_var):
        assert r.dtype == np.float64 and r.shape == (6,) and not r.any()
    assert y.dtype == np.float64  # gamma * xn + beta with float64 running arrays, as the book
    # the oracle in float64 (NumPy 1.x would keep float32 / numpy-float64-scalar float32)
    assert rel(y, x.astype(np.float64) / np.sqrt(1e-6)) < 1e-12
    layer = BatchNormalization(np.ones(6, np.float32), np.zeros(6, np.float32))
    y = layer.forward(x)  # training: float32 output, float64 running arrays
    assert y.dtype == np.float32 and layer.running_mean.dtype == np.float64
    assert rel(layer.running_mean, 0.1 * x.astype(np.float64).mean(axis=0)) < 1e-7


def test_running_arrays_are_replaced_not_updated_in_place():
    rm0, rv0 = np.full(3, 2.0), np.full(3, 5.0)
    layer = BatchNormalization(np.ones(3), np.zeros(3), 0.5, rm0, rv0)
    x = np.array([[1.0, 2.0, 3.0], [3.0, 6.0, 9.0]])
    layer.forward(x)
    assert rm0.tolist() == [2.0] * 3 and rv0.tolist() == [5.0] * 3  # the caller's arrays
    kept = layer.running_mean
    layer.forward(x)
    assert kept is not layer.running_mean
    np.testing.assert_array_equal(kept, 0.5 * rm0 + 0.5 * x.mean(axis=0))
    np.testing.assert_allclose(layer.running_var, 0.25 * rv0 + 0.75 * x.var(axis=0), rtol=1e-15)


def test_gamma_and_beta_are_read_by_reference():
    rng = np.random.default_rng(3)
    gamma, beta = np.ones(4), np.zeros(4)
    layer = BatchNormalization(gamma, beta)
    x = rng.standard_normal((10, 4))
    gamma[:] = [1.0, 2.0, 3.0, 4.0]  # after construction, in place
    beta += 1.0
    assert rel(layer.forward(x), Formulas().forward(x, gamma, beta)) < TOL
    layer.gamma = np.full(4, -1.0)  # reassigned
    assert rel(layer.forward(x), Formulas().forward(x, -1.0, beta)) < TOL


def test_backward_reads_gamma_at_backward_time():
    """The book's backward multiplies by ``self.gamma`` as it is then."""
    rng = np.random.default_rng(4)
    gamma = rng.uniform(1, 2, 5)
    layer = BatchNormalization(gamma, np.zeros(5))
    oracle = Formulas()
    x, dout = rng.standard_normal((9, 5)), rng.standard_normal((9, 5))
    layer.forward(x)
    oracle.forward(x, gamma, 0.0)
    running = layer.running_mean.copy(), layer.running_var.copy()
    gamma *= -3.0
    dx = layer.backward(dout)
    dx_ref, dgamma_ref, _ = oracle.backward(dout, gamma)
    assert rel(dx, dx_ref) < TOL and rel(layer.dgamma, dgamma_ref) < TOL
    np.testing.assert_array_equal(layer.running_mean, running[0])  # not updated again
    np.testing.assert_array_equal(layer.running_var, running[1])


def test_a_batch_of_one_sample_trains():
    rng = np.random.default_rng(5)
    gamma, beta = rng.uniform(1, 2, 7), rng.standard_normal(7)
    layer = BatchNormalization(gamma, beta)
    x = rng.standard_normal((1, 7))
    y = layer.forward(x)
    np.testing.assert_array_equal(y, beta[None, :])
    np.testing.assert_array_equal(layer.running_mean, (1 - 0.9) * x[0])
    np.testing.assert_array_equal(layer.running_var, np.zeros(7))
    dout = rng.standard_normal((1, 7))
    dx = layer.backward(dout)
    np.testing.assert_array_equal(layer.dgamma, np.zeros(7))
    np.testing.assert_array_equal(layer.dbeta, dout[0])
    # 0 in exact arithmetic; fastbn's dx = dout * g - g * mean(dout) leaves the rounding
    # of the product g * dout, g = gamma / sqrt(1e-6)
    assert np.all(np.abs(dx) <= 1e-15 * np.abs(gamma * dout) / np.sqrt(1e-6))


def test_backward_after_a_test_forward_uses_the_last_training_batch():
    rng = np.random.default_rng(6)
    layer = BatchNormalization(np.full(3, 2.0), np.zeros(3))
    with pytest.raises(RuntimeError, match="before a training forward"):
        layer.backward(np.ones((4, 3)))
    oracle = Formulas()
    x = rng.standard_normal((4, 3))
    layer.forward(x)
    oracle.forward(x, 2.0, 0.0)
    layer.forward(rng.standard_normal((4, 3)), train_flg=False)
    dout = rng.standard_normal((4, 3))
    assert rel(layer.backward(dout), oracle.backward(dout, 2.0)[0]) < TOL


@pytest.mark.parametrize("m", [0.9, 0.99, 0.5, 0.1])
def test_old_weight_momentum_through_momentum_one_minus_m(m):
    """fastbn is called with ``momentum = 1 - m``. The bits are not the formula's: the
    kernel evaluates the blend as ``running + (1 - m) * (batch - running)`` (fastmath
    reassociation, one fused multiply-add), not ``m * running + (1 - m) * batch``.
    Measured (D = 2000): 51-92% of the values have the formula's bits; the others differ
    by at most 2 units in the last place of the larger term (at most 2 of the result when
    the terms have one sign; more relative to a result that cancels)."""
    rng = np.random.default_rng(7)
    D = 2000
    for rm0 in (rng.standard_normal(D), rng.uniform(2, 4, D)):
        layer = BatchNormalization(np.ones(D), np.zeros(D), m, rm0, rng.uniform(0.5, 2, D))
        rv0 = layer.running_var
        # small integers, 64 rows: batch mean and variance are exact in any summation
        # order, so only the blend rounds
        x = rng.integers(-8, 24, (64, D)).astype(np.float64)
        layer.forward(x)
        mu, var = x.mean(axis=0), x.var(axis=0)
        for got, old, batch in ((layer.running_mean, rm0, mu), (layer.running_var, rv0, var)):
            ref = m * old + (1 - m) * batch
            larger = np.maximum(np.abs(m * old), np.abs((1 - m) * batch))
            ulps = np.abs(got - ref) / np.spacing(larger)
            assert ulps.max() <= 2, (m, ulps.max())


def test_inputs_are_not_modified_and_nothing_of_size_n_by_d_is_kept():
    rng = np.random.default_rng(8)
    x, dout = rng.standard_normal((64, 32)), rng.standard_normal((64, 32))
    gamma, beta = rng.standard_normal(32), rng.standard_normal(32)
    copies = [a.copy() for a in (x, dout, gamma, beta)]
    layer = BatchNormalization(gamma, beta)
    layer.forward(x)
    layer.backward(dout)
    for a, c in zip((x, dout, gamma, beta), copies):
        np.testing.assert_array_equal(a, c)
    cache = layer._cache.bn
    held = [v for v in vars(layer).values() if isinstance(v, np.ndarray)]
    held += [getattr(cache, s) for s in ("mean", "invstd", "gamma")]
    assert all(a.size <= 32 for a in held)
    assert cache.x is x  # the only N x D reference: the input itself, not a copy


def test_bad_arguments_raise_naming_them_and_change_nothing():
    layer = BatchNormalization(np.ones(3), np.zeros(3))
    with pytest.raises(TypeError, match="x must be a numpy.ndarray"):
        layer.forward([[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="x must have shape"):
        layer.forward(np.ones(3))
    with pytest.raises(ValueError, match="gamma must have shape \\(4,\\)"):
        layer.forward(np.ones((2, 4)))
    assert layer.running_mean is None and layer.input_shape is None
    with pytest.raises(ValueError, match="momentum must be in \\[0, 1\\]"):
        BatchNormalization(np.ones(3), np.zeros(3), momentum=1.5)
    with pytest.raises(TypeError, match="momentum must be a float"):
        BatchNormalization(np.ones(3), np.zeros(3), momentum="0.9")
    x = np.random.default_rng(9).standard_normal((5, 3))
    layer.forward(x)
    state = (layer.running_mean, layer.running_var, layer.input_shape, layer._cache)
    layer.momentum = -0.1
    with pytest.raises(ValueError, match="momentum"):
        layer.forward(x)
    with pytest.raises(ValueError, match="dout must have the shape"):
        layer.backward(np.ones((4, 3)))
    with pytest.raises(TypeError, match="dout must have dtype"):
        layer.backward(np.ones((5, 3), int))
    assert (layer.running_mean, layer.running_var, layer.input_shape, layer._cache) == state


def test_float32_throughout_stays_float32():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    gamma, beta = np.ones(6, np.float32), np.zeros(6, np.float32)
    layer = BatchNormalization(gamma, beta)
    y = layer.forward(x)
    dx = layer.backward(np.ones_like(y))
    assert y.dtype == dx.dtype == layer.dgamma.dtype == layer.dbeta.dtype == np.float32
    assert rel(y, Formulas().forward(x.astype(np.float64), 1.0, 0.0)) < 1e-6


# -- the functional option ---------------------------------------------------------


@pytest.mark.parametrize("shape,axis", [((30, 5), 1), ((4, 3, 6), 1), ((2, 5, 3, 3), 1)])
def test_running_var_ddof_0_is_the_biased_variance(shape, axis):
    rng = np.random.default_rng(11)
    x = rng.standard_normal(shape) * 2 + 1
    C = shape[axis]
    rm, rv = np.zeros(C), np.ones(C)
    axes = tuple(i for i in range(len(shape)) if i != axis)
    fastbn.batch_norm(x, None, None, running_mean=rm, running_var=rv, momentum=0.25,
                      running_var_ddof=0, axis=axis)  # fmt: skip
    assert rel(rv, 0.75 + 0.25 * x.var(axis=axes)) < TOL
    rv1 = np.ones(C)
    fastbn.batch_norm(x, None, None, running_var=rv1, momentum=0.25, axis=axis)
    n = x.size // C
    assert rel(rv1, 0.75 + 0.25 * x.var(axis=axes) * n / (n - 1)) < TOL  # default unchanged


def test_running_var_ddof_validation_and_single_values():
    x1 = np.arange(3.0).reshape(1, 3)
    y, cache = fastbn.batch_norm(x1, np.ones(3), np.full(3, 0.5), running_var_ddof=0)
    np.testing.assert_array_equal(y, np.full((1, 3), 0.5))
    with pytest.raises(ValueError, match="single value per channel.*running_var_ddof=0"):
        fastbn.batch_norm(x1, None, None)
    with pytest.raises(ValueError, match="at least 1 value"):
        fastbn.batch_norm(np.ones((0, 3)), None, None, running_var_ddof=0)
    for bad, error in ((2, ValueError), (-1, ValueError), (True, TypeError), (0.0, TypeError)):
        with pytest.raises(error, match="running_var_ddof"):
            fastbn.batch_norm(np.ones((4, 3)), None, None, running_var_ddof=bad)
    rm = np.zeros(3)
    with pytest.raises(ValueError, match="running_var_ddof"):
        fastbn.batch_norm(np.ones((4, 3)), None, None, running_mean=rm, running_var_ddof=5)
    assert not rm.any()


def test_mixed_dtypes_follow_the_books_promotion():
    """float32 activations with the book's float64 parameters: ``gamma * xn + beta`` is
    float64 (computed here in float64 from the float32 values); ``dbeta = dout.sum()``
    keeps ``dout``'s dtype, ``dgamma = sum(xn * dout)`` promotes ``x`` and ``dout``."""
    rng = np.random.default_rng(12)
    x = (rng.standard_normal((30, 4)) * 2 + 1).astype(np.float32)
    gamma, beta = rng.uniform(1, 2, 4), rng.standard_normal(4)
    layer = BatchNormalization(gamma, beta)
    oracle = Formulas()
    y = layer.forward(x)
    assert y.dtype == np.float64
    assert rel(y, oracle.forward(x.astype(np.float64), gamma, beta)) < TOL
    dout = rng.standard_normal((30, 4)).astype(np.float32)
    dx = layer.backward(dout)
    assert dx.dtype == np.float64 and layer.dbeta.dtype == layer.dgamma.dtype == np.float32
    dx_ref, dgamma_ref, _ = oracle.backward(dout.astype(np.float64), gamma)
    assert rel(dx, dx_ref) < TOL and rel(layer.dgamma, dgamma_ref) < 1e-6
