"""fastbn.compat.cs231n against the assignment's documented formulas, written here:
batch mean, biased variance, ``eps`` from ``bn_param`` (1e-5), ``running = momentum *
running + (1 - momentum) * batch`` (momentum 0.9), running arrays created as zeros of
``x``'s dtype and stored back into ``bn_param``. Errors are normwise."""

import numpy as np
import pytest

from fastbn.compat import cs231n

TOL = 1e-12


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b))
    return np.max(np.abs(a - b)) / (scale if scale else 1.0)


def rows_of(x):
    """(N, D) as it is; (N, C, H, W) as (N*H*W, C), the assignment's spatial view."""
    return x if x.ndim == 2 else x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])


def from_rows(r, shape):
    if len(shape) == 2:
        return r
    N, C, H, W = shape
    return r.reshape(N, H, W, C).transpose(0, 3, 1, 2)


def formula_forward(x, gamma, beta, param):
    """The documented forward; returns (out, running_mean, running_var, stats)."""
    r = rows_of(x)
    eps, m = param.get("eps", 1e-5), param.get("momentum", 0.9)
    rm = param.get("running_mean", np.zeros(r.shape[1], x.dtype))
    rv = param.get("running_var", np.zeros(r.shape[1], x.dtype))
    if param["mode"] == "train":
        mu = r.mean(axis=0)
        var = ((r - mu) ** 2).mean(axis=0)
        rm, rv = m * rm + (1 - m) * mu, m * rv + (1 - m) * var
    else:
        mu, var = rm, rv
    xhat = (r - mu) / np.sqrt(var + eps)
    return from_rows(gamma * xhat + beta, x.shape), rm, rv, (xhat, var + eps)


def formula_backward(dout, gamma, stats, training=True):
    xhat, var_eps = stats
    d = rows_of(dout)
    n = d.shape[0]
    dbeta, dgamma = d.sum(axis=0), (d * xhat).sum(axis=0)
    if training:
        dx = gamma / np.sqrt(var_eps) * (d - dbeta / n - xhat * dgamma / n)
    else:
        dx = d * gamma / np.sqrt(var_eps)
    return from_rows(dx, dout.shape), dgamma, dbeta


CASES = [
    ((100, 100), cs231n.batchnorm_forward, cs231n.batchnorm_backward),
    ((9, 4), cs231n.batchnorm_forward, cs231n.batchnorm_backward_alt),
    ((4, 3, 5, 6), cs231n.spatial_batchnorm_forward, cs231n.spatial_batchnorm_backward),
]


@pytest.mark.parametrize("shape,forward,backward", CASES)
def test_steps_match_the_formulas(shape, forward, backward):
    rng = np.random.default_rng(0)
    C = shape[1]
    gamma, beta = rng.uniform(0.5, 2, C), rng.standard_normal(C)
    param, oracle = {"mode": "train"}, {"mode": "train"}
    for step in range(3):
        x = rng.standard_normal(shape) * 2 + step
        out, cache = forward(x, gamma, beta, param)
        ref, oracle["running_mean"], oracle["running_var"], stats = formula_forward(
            x, gamma, beta, oracle
        )
        assert out.shape == shape and rel(out, ref) < TOL
        assert rel(param["running_mean"], oracle["running_mean"]) < TOL
        assert rel(param["running_var"], oracle["running_var"]) < TOL
        dout = rng.standard_normal(shape)
        dx, dgamma, dbeta = backward(dout, cache)
        dx_ref, dgamma_ref, dbeta_ref = formula_backward(dout, gamma, stats)
        assert dx.shape == shape
        assert max(rel(dx, dx_ref), rel(dgamma, dgamma_ref), rel(dbeta, dbeta_ref)) < TOL
        gamma, beta = gamma - 0.1 * dgamma, beta - 0.1 * dbeta
    param["mode"] = oracle["mode"] = "test"
    x = rng.standard_normal(shape)
    out, cache = forward(x, gamma, beta, param)
    ref, _, _, stats = formula_forward(x, gamma, beta, oracle)
    assert rel(out, ref) < TOL
    dout = rng.standard_normal(shape)  # test-mode gradient: running stats are constants
    assert rel(backward(dout, cache)[0], formula_backward(dout, gamma, stats, False)[0]) < TOL


def test_backward_alt_gives_the_same_result():
    rng = np.random.default_rng(1)
    x, dout = rng.standard_normal((50, 8)), rng.standard_normal((50, 8))
    _, cache = cs231n.batchnorm_forward(x, np.ones(8), np.zeros(8), {"mode": "train"})
    for a, b in zip(
        cs231n.batchnorm_backward(dout, cache), cs231n.batchnorm_backward_alt(dout, cache)
    ):
        np.testing.assert_array_equal(a, b)


def test_running_arrays_created_stored_and_replaced():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    param = {"mode": "test"}
    out, _ = cs231n.batchnorm_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32), param)
    for key in ("running_mean", "running_var"):  # created by a test-mode call too
        assert param[key].dtype == np.float32 and not param[key].any()
    assert rel(out, x / np.sqrt(np.float32(1e-5))) < 1e-6
    param["mode"] = "train"
    kept = param["running_mean"]
    cs231n.batchnorm_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32), param)
    assert not kept.any() and param["running_mean"] is not kept  # replaced, not in place
    assert param["running_mean"].dtype == np.float32
    assert rel(param["running_mean"], 0.1 * x.mean(axis=0)) < 1e-7


def test_momentum_and_eps_come_from_bn_param():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((20, 5)) * 1e-3
    rm, rv = rng.standard_normal(5), rng.uniform(1, 2, 5)
    param = {"mode": "train", "momentum": 1.0, "running_mean": rm, "running_var": rv}
    cs231n.batchnorm_forward(x, np.ones(5), np.zeros(5), param)
    np.testing.assert_array_equal(param["running_mean"], rm)  # momentum 1 keeps the old
    np.testing.assert_array_equal(param["running_var"], rv)
    param = {"mode": "train", "momentum": 0, "eps": 1e-7}
    out, _ = cs231n.batchnorm_forward(x, np.ones(5), np.zeros(5), param)
    assert rel(param["running_mean"], x.mean(axis=0)) < TOL  # 0 replaces
    assert rel(param["running_var"], x.var(axis=0)) < TOL
    assert rel(out, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-7)) < TOL
    assert rel(out, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)) > 0.1  # eps is visible


def test_a_batch_of_one_sample_trains():
    beta = np.array([0.5, -1.0, 2.0])
    param = {"mode": "train"}
    out, cache = cs231n.batchnorm_forward(np.array([[3.0, 1.0, 4.0]]), np.ones(3), beta, param)
    np.testing.assert_array_equal(out, beta[None, :])
    np.testing.assert_array_equal(param["running_var"], np.zeros(3))
    dx, dgamma, dbeta = cs231n.batchnorm_backward(np.array([[1.0, 2.0, 3.0]]), cache)
    np.testing.assert_array_equal(dgamma, np.zeros(3))
    np.testing.assert_array_equal(dbeta, [1.0, 2.0, 3.0])
    assert np.all(np.abs(dx) <= 1e-15 * 3.0 / np.sqrt(1e-5))


def test_bad_mode_and_shapes_raise_naming_them_and_store_nothing():
    x = np.ones((4, 3))
    for mode in ("eval", "Train", None, 1):
        param = {"mode": mode}
        with pytest.raises(ValueError, match=f"mode {mode!r}"):
            cs231n.batchnorm_forward(x, np.ones(3), np.zeros(3), param)
        assert set(param) == {"mode"}
    with pytest.raises(ValueError, match="no 'mode'"):
        cs231n.batchnorm_forward(x, np.ones(3), np.zeros(3), {})
    param = {"mode": "train"}
    with pytest.raises(ValueError, match="gamma must have shape \\(3,\\)"):
        cs231n.batchnorm_forward(x, np.ones(4), np.zeros(3), param)
    with pytest.raises(ValueError, match="beta must have shape \\(3,\\)"):
        cs231n.batchnorm_forward(x, np.ones(3), np.zeros(2), param)
    with pytest.raises(ValueError, match="running_mean must have shape \\(3,\\)"):
        cs231n.batchnorm_forward(x, np.ones(3), np.zeros(3), {**param, "running_mean": np.ones(2)})
    with pytest.raises(ValueError, match="x must have shape \\(N, C, H, W\\)"):
        cs231n.spatial_batchnorm_forward(x, np.ones(3), np.zeros(3), param)
    with pytest.raises(ValueError, match="x must have shape \\(N, D\\)"):
        cs231n.batchnorm_forward(np.ones((2, 3, 1, 1)), np.ones(3), np.zeros(3), param)
    with pytest.raises(ValueError, match="bn_param\\['momentum'\\] must be in"):
        cs231n.batchnorm_forward(x, np.ones(3), np.zeros(3), {**param, "momentum": 1.1})
    with pytest.raises(TypeError, match="bn_param must be a dict"):
        cs231n.batchnorm_forward(x, np.ones(3), np.zeros(3), "train")
    assert param == {"mode": "train"}
    _, cache = cs231n.batchnorm_forward(x + np.arange(3), np.ones(3), np.zeros(3), param)
    with pytest.raises(ValueError, match="dout must have the shape"):
        cs231n.batchnorm_backward(np.ones((3, 3)), cache)
    with pytest.raises(TypeError, match="cache must be"):
        cs231n.batchnorm_backward(np.ones((4, 3)), (x, None))


def test_inputs_are_not_modified_and_the_cache_is_small():
    rng = np.random.default_rng(3)
    x, dout = rng.standard_normal((4, 3, 5, 5)), rng.standard_normal((4, 3, 5, 5))
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    rm, rv = rng.standard_normal(3), rng.uniform(1, 2, 3)
    arrays = (x, dout, gamma, beta, rm, rv)
    copies = [a.copy() for a in arrays]
    param = {"mode": "train", "running_mean": rm, "running_var": rv}
    _, cache = cs231n.spatial_batchnorm_forward(x, gamma, beta, param)
    cs231n.spatial_batchnorm_backward(dout, cache)
    for a, c in zip(arrays, copies):
        np.testing.assert_array_equal(a, c)
    assert cache.bn.x is x and cache.bn.mean.size == 3 and cache.bn.invstd.size == 3
