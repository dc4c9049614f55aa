"""Batch norm fused with a ReLU (``activation="relu"``) against its composition.

The oracle is fastbn's own unfused batch norm followed by NumPy's ReLU: forward
``np.maximum(y_bn, 0)``, backward batch norm's backward of ``dy * (y_bn > 0)``. The fused
``y`` must equal it bit for bit (NaN payloads and signed zeros included). The gradients
must agree to what a different order of the same float64 sums allows (``sum_error``):
the fused and the plain gradient sums are separate loops, which LLVM's vectorizer may
reassociate differently (it did on Zen 4, in the planes family: dbeta 7 ulp apart, both
as close to an extended-precision oracle). Both are also checked against central finite
differences in float64.
"""

import zlib

import numpy as np
import pytest

import fastbn
from fastbn import _plan
from fastbn._kernels.layout import W_MEAN, W_OFFSET, W_SCALE

from _cases import DRIVER_SHAPES, FAMILIES, LAYOUTS, f64, random_case, relayout

DTYPES = [np.float32, np.float64]


def _running(C, dtype, rng):
    return rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2.0, C).astype(dtype)


def _call(x, gamma, beta, axis, training, running, dy, *, activation, out=False):
    """Forward and backward; returns (y, dx, dgamma, dbeta, running_mean, running_var)."""
    rm, rv = (None, None) if running is None else (running[0].copy(), running[1].copy())
    y_out = np.empty_like(x) if out else None
    y, cache = fastbn.batch_norm(
        x, gamma, beta, axis=axis, training=training, running_mean=rm, running_var=rv,
        out=y_out, activation=activation,
    )  # fmt: skip
    if out:
        assert y is y_out
    if activation is None:  # the composition: NumPy's ReLU after batch norm
        y_bn = y
        y = np.maximum(y_bn, 0)
        dy = dy * (y_bn > 0)
    dx_out = np.empty_like(x) if out else None
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, cache, out=dx_out)
    return y, dx, dgamma, dbeta, rm, rv


def ulps(got, want):
    """The largest difference in units in the last place of ``want``'s dtype (NaN where
    both are NaN counts as equal; a NaN on one side only is infinitely far)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype
    if got.size == 0:
        return 0.0
    nan_got, nan_want = np.isnan(got), np.isnan(want)
    if np.any(nan_got != nan_want):
        return np.inf
    ok = ~nan_got
    a, b = f64(got[ok]), f64(want[ok])
    spacing = np.spacing(np.maximum(np.abs(got[ok]), np.abs(want[ok]))).astype(np.float64)
    return float(np.max(np.abs(a - b) / spacing, initial=0.0))


def sum_error(got, want, axis, terms):
    """The largest ``|got - want|`` over ``4 eps`` times a scale that any order of the
    float64 sums behind them rounds within: per channel, ``sum(|terms|)`` for a sum
    (``got`` of shape (C,)), and the largest ``|want|`` of the channel for ``dx``, whose
    coefficients come from such sums (``terms`` unused). Equal NaNs count as equal.
    A wrong mask moves a sum by a whole ``|dy|`` and ``dx`` by a fraction of its scale:
    hundreds of units or more here."""
    eps = np.finfo(np.asarray(want).dtype).eps
    got, want = f64(got), f64(want)
    assert got.shape == want.shape
    nan_got, nan_want = np.isnan(got), np.isnan(want)
    if np.any(nan_got != nan_want):
        return np.inf
    if got.ndim == 1:
        others = tuple(i for i in range(terms.ndim) if i != axis % terms.ndim)
        scale = np.nansum(np.abs(f64(terms)), axis=others)
    else:
        others = tuple(i for i in range(want.ndim) if i != axis % want.ndim)
        scale = np.nanmax(np.abs(want), axis=others, keepdims=True, initial=0.0)
    diff = np.where(nan_want, 0.0, np.abs(got - want))
    unit = 4 * eps * np.maximum(scale, np.finfo(np.float64).tiny)
    with np.errstate(over="ignore"):
        return float(np.max(diff / unit, initial=0.0))


def _sum_terms(x, axis, masked_dy, running=None):
    """The terms of ``dbeta`` and of ``dgamma``: ``dy * (y > 0)`` and that times ``xhat``
    (NumPy, float64; ``running``: eval's ``(running_mean, running_var)``)."""
    x64 = f64(x)
    others = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    if running is None:
        mean = x64.mean(axis=others, keepdims=True)
        var = ((x64 - mean) ** 2).mean(axis=others, keepdims=True)
    else:
        shape = [1] * x.ndim
        shape[axis] = -1
        mean, var = (f64(a).reshape(shape) for a in running)
    xhat = (x64 - mean) / np.sqrt(var + 1e-5)
    return f64(masked_dy), f64(masked_dy) * xhat


def assert_gradients_agree(fused, plain, x, axis, masked_dy, running=None):
    """``(dx, dgamma, dbeta)`` of the fused call against the composition's."""
    terms_dbeta, terms_dgamma = _sum_terms(x, axis, masked_dy, running)
    assert sum_error(fused[0], plain[0], axis, None) <= 1  # dx
    assert sum_error(fused[1], plain[1], axis, terms_dgamma) <= 1
    assert sum_error(fused[2], plain[2], axis, terms_dbeta) <= 1


def assert_fused_equals_composition(x, gamma, beta, axis, training, running, dy, out=False):
    fused = _call(x, gamma, beta, axis, training, running, dy, activation="relu", out=out)
    plain = _call(x, gamma, beta, axis, training, running, dy, activation=None, out=out)
    assert fused[0].tobytes() == plain[0].tobytes()  # y: bit for bit
    stats = None if training else running
    assert_gradients_agree(fused[1:4], plain[1:4], x, axis, dy * (fused[0] > 0), stats)
    if fastbn.batch_norm(x, axis=axis)[1].plan.inner == 1:
        # rows: the fused sums are written in the plain loop's order (gradsums), so the
        # gradients are the composition's bits but for the elementwise pass's rounding
        for got, want in zip(fused[1:4], plain[1:4]):
            assert ulps(got, want) <= 2
    for got, want in zip(fused[4:], plain[4:]):  # running statistics: the same update
        if want is not None:
            assert got.tobytes() == want.tobytes()
    return fused


# -- every layout, dtype and mode of the core suite ------------------------------------------


@pytest.mark.parametrize("out", [False, True], ids=["new", "out"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layouts(layout, dtype, training, out):
    rng = np.random.default_rng(zlib.crc32(layout.encode()))
    x, dy, gamma, beta, axis = random_case(rng, layout, dtype, scale=2.0, offset=0.5)
    x_before, dy_before = x.copy(), dy.copy()
    C = x.shape[axis]
    running = _running(C, dtype, rng)
    y = assert_fused_equals_composition(x, gamma, beta, axis, training, running, dy, out)[0]
    assert 0.2 < np.mean(y > 0) < 0.8  # the mask is not trivial
    assert x.tobytes() == x_before.tobytes() and dy.tobytes() == dy_before.tobytes()


def _family_cases():
    for name, (shape, axis) in FAMILIES.items():
        yield pytest.param(shape, axis, None, id=name)
    for shape, axis, how in DRIVER_SHAPES:
        yield pytest.param(shape, axis, how, id=f"driver-{'x'.join(map(str, shape))}")
    # planes whose channel does not fit FUSE_BYTES: the two-pass planes path
    yield pytest.param((4, 3, 40000), 1, None, id="planes-two-pass")


@pytest.mark.parametrize("streamed", [False, True], ids=["cached", "streamed"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis,how", list(_family_cases()))
def test_families_and_streaming(shape, axis, how, dtype, training, streamed, monkeypatch):
    """Rows and planes, serial and parallel drivers, the fused-planes and two-pass paths,
    each with ordinary and streaming stores (the threshold lowered to 0 bytes)."""
    monkeypatch.setattr(_plan, "STREAM_BYTES", 0 if streamed else 1 << 62)
    rng = np.random.default_rng(sum(shape))
    C = shape[axis]
    x = relayout((0.3 + rng.standard_normal(shape)).astype(dtype), how)
    dy = relayout(rng.standard_normal(shape).astype(dtype), how)
    gamma = (1 + 0.5 * rng.standard_normal(C)).astype(dtype)
    gamma[0] = -gamma[0]  # a negative scale flips which side is masked
    beta = rng.standard_normal(C).astype(dtype)
    assert_fused_equals_composition(x, gamma, beta, axis, training, _running(C, dtype, rng), dy)


def test_the_two_planes_paths_are_both_reached():
    """The family cases above cover a fused-planes and a two-pass planes plan."""
    assert _plan.plan_for(4, 5, 20000, 4).fused
    assert not _plan.plan_for(4, 3, 40000, 4).fused
    assert _plan.plan_for(4, 3, 40000, 4).parallel


@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("shape", [(300, 77), (7, 3, 301), (129, 5000)])
def test_streamed_into_unaligned_out(shape, offset, monkeypatch):
    """``out=`` views 4 or 12 bytes past a line boundary: heads, lines and tails."""
    monkeypatch.setattr(_plan, "STREAM_BYTES", 0)
    rng = np.random.default_rng(9)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y_bn, cache = fastbn.batch_norm(x, None, None)
    want = fastbn.batch_norm_backward(dy * (y_bn > 0), cache)[0]
    buffer = np.zeros(2 * x.size + 64, np.float32)
    out = buffer[offset : offset + x.size].reshape(shape)
    dx_out = buffer[x.size + 32 + offset : 2 * x.size + 32 + offset].reshape(shape)
    y, cache = fastbn.batch_norm(x, None, None, out=out, activation="relu")
    dx = fastbn.batch_norm_backward(dy, cache, out=dx_out)[0]
    np.testing.assert_array_equal(y, np.maximum(y_bn, 0))
    assert sum_error(dx, want, 1, None) <= 1
    assert not buffer[:offset].any() and not buffer[x.size + offset : x.size + 32 + offset].any()


def test_backward_out_may_be_dy():
    rng = np.random.default_rng(3)
    x, dy, gamma, beta, axis = random_case(rng, "NCHW", np.float32)
    y_bn, cache = fastbn.batch_norm(x, gamma, beta, axis=axis)
    want = fastbn.batch_norm_backward(dy * (y_bn > 0), cache)
    masked_dy = dy * (y_bn > 0)
    _, cache = fastbn.batch_norm(x, gamma, beta, axis=axis, activation="relu")
    got = fastbn.batch_norm_backward(dy, cache, out=dy)
    assert got[0] is dy
    assert_gradients_agree(got, want, x, axis, masked_dy)


# -- the mask is the forward's y > 0, exactly -------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["ND", "NCHW", "NHWC", "wide_rows"])
def test_mask_is_forward_y_positive(layout, dtype):
    """Inputs whose pre-activations crowd around 0 (an offset of 1e4 on x, beta putting
    the kink at the mean): in training, dbeta for dy = 1 counts each channel's y > 0;
    in eval, dx != 0 exactly where y > 0."""
    rng = np.random.default_rng(5)
    x, _, gamma, _, axis = random_case(rng, layout, dtype, scale=0.05, offset=1e4)
    beta = np.zeros_like(gamma)
    ones = np.ones_like(x)
    reduce = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    y, cache = fastbn.batch_norm(x, gamma, beta, axis=axis, activation="relu")
    dbeta = fastbn.batch_norm_backward(ones, cache)[2]
    np.testing.assert_array_equal(dbeta, np.sum(y > 0, axis=reduce).astype(dtype))
    C = x.shape[axis]
    rm = np.full(C, 1e4, dtype)
    rv = np.full(C, 0.0025, dtype)
    y, cache = fastbn.batch_norm(
        x, gamma, beta, axis=axis, training=False, running_mean=rm, running_var=rv,
        activation="relu",
    )  # fmt: skip
    dx = fastbn.batch_norm_backward(ones, cache)[0]
    np.testing.assert_array_equal(dx != 0, y > 0)
    assert 0.1 < np.mean(y > 0) < 0.9


@pytest.mark.parametrize("dtype", DTYPES)
def test_signed_zero_and_nan_as_np_maximum(dtype):
    """``np.maximum(-0.0, 0)`` is +0.0 and ``np.maximum(nan, 0)`` the same NaN: the fused
    pass returns those bits. Eval mode with ``x == running_mean`` and ``beta = -0.0`` makes
    ``y_bn`` exactly -0.0 where gamma < 0 (``0 * p + -0.0``)."""
    C = 4
    rm = np.array([1.0, 2.0, -3.0, 0.5], dtype)
    rv = np.ones(C, dtype)
    gamma = np.array([-1.0, -2.0, 1.0, -0.5], dtype)
    beta = np.full(C, -0.0, dtype)
    x = np.tile(rm, (6, 1))
    x[1] += 1
    x[2] -= 1
    x[3, 0] = np.nan
    x[4, 1] = -np.nan
    x[5, 2] = np.inf
    kw = dict(training=False, running_mean=rm, running_var=rv)
    y_bn, cache_bn = fastbn.batch_norm(x, gamma, beta, **kw)
    y, cache = fastbn.batch_norm(x, gamma, beta, **kw, activation="relu")
    assert np.signbit(y_bn[0, [0, 1, 3]]).all()  # the case is real: -0.0 before the ReLU
    assert y.tobytes() == np.maximum(y_bn, 0).tobytes()
    assert not np.signbit(y[0]).any() and np.isnan(y[3, 0]) and np.isnan(y[4, 1])
    dy = np.ones_like(x)
    dx = fastbn.batch_norm_backward(dy, cache)[0]
    want = fastbn.batch_norm_backward(dy * (y_bn > 0), cache_bn)[0]
    np.testing.assert_array_equal(dx, want)
    assert dx[3, 0] == 0 and dx[4, 1] == 0  # a NaN x in eval: masked, no NaN in dx


# -- NaN policy, extreme coefficients ---------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_channel_in_training(dtype):
    """A NaN in channel 1: its y is NaN (NaN stays NaN through the ReLU), its pre-activation
    is NaN so every dy is masked: dbeta 0, dgamma and dx NaN (x - NaN mean); the other
    channels get exactly the bits of the clean input."""
    rng = np.random.default_rng(2)
    x, dy, gamma, beta, axis = random_case(rng, "NCHW", dtype)
    bad = x.copy()
    bad[2, 1, 3, 4] = np.nan
    y, cache = fastbn.batch_norm(bad, gamma, beta, activation="relu")
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, cache)
    assert np.isnan(y[:, 1]).all() and np.isnan(dx[:, 1]).all() and np.isnan(dgamma[1])
    assert dbeta[1] == 0
    y0, cache0 = fastbn.batch_norm(x, gamma, beta, activation="relu")
    dx0, dgamma0, dbeta0 = fastbn.batch_norm_backward(dy, cache0)
    keep = [0, 2, 3, 4, 5, 6]
    for got, want in ((y, y0), (dx, dx0)):
        assert got[:, keep].tobytes() == want[:, keep].tobytes()
    for got, want in ((dgamma, dgamma0), (dbeta, dbeta0)):
        assert got[keep].tobytes() == want[keep].tobytes()
    assert_fused_equals_composition(bad, gamma, beta, axis, True, None, dy)


def test_nan_in_dy_stays_nan():
    """``dy * (y > 0)`` keeps a NaN dy even where masked: its channel's dx, dgamma, dbeta
    are NaN, as the composition's."""
    rng = np.random.default_rng(4)
    x, dy, gamma, beta, axis = random_case(rng, "ND", np.float32)
    y, cache = fastbn.batch_norm(x, gamma, beta, activation="relu")
    masked_at = np.argwhere(y[:, 2] == 0)[0, 0]
    dy[masked_at, 2] = np.nan
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, cache)
    assert np.isnan(dx[:, 2]).all() and np.isnan(dgamma[2]) and np.isnan(dbeta[2])
    assert np.isfinite(dx[:, [0, 1, 3]]).all()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(512, 6), (64, 6, 40), (4, 6, 70000), (512, 6, 2, 2)])
def test_coefficients_beyond_float32(shape, training):
    """gamma * invstd above 3.4e38: the forward redoes its pass in float64 (so must the
    ReLU) and backward takes its mask from that pass's output."""
    rng = np.random.default_rng(11)
    C = shape[1]
    x = rng.standard_normal(shape)
    x[:, 0] *= 1e-4
    x = x.astype(np.float32)
    dy = (1e-6 * rng.standard_normal(shape)).astype(np.float32)
    gamma = np.ones(C, np.float32)
    gamma[0] = 1e36
    beta = rng.standard_normal(C).astype(np.float32)
    red = (0,) + tuple(range(2, x.ndim))
    running = None
    if not training:
        running = tuple(f(f64(x), axis=red).astype(np.float32) for f in (np.mean, np.var))
    y = assert_fused_equals_composition(x, gamma, beta, 1, training, running, dy)[0]
    assert np.abs(y[:, 0]).max() > 1e35 and np.isfinite(y).all()


@pytest.mark.parametrize(
    "shape", [(512, 6), (64, 6, 40), (64, 6, 2, 2)], ids=["rows", "planes", "tiny_planes"]
)
def test_backward_coefficients_beyond_float32(shape):
    """Forward coefficients that fit float32 but a backward one that does not (channel 0:
    variance 1e-10, gamma 1e32, so gamma * invstd = 1e37 but gamma * invstd**2 * dgamma / n
    is beyond 3.4e38): backward redoes ``dx`` as the composition, in float64."""
    rng = np.random.default_rng(12)
    C = shape[1]
    x = rng.standard_normal(shape)
    x[:, 0] *= 1e-5
    x = x.astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    gamma = np.ones(C, np.float32)
    gamma[0] = 1e32
    beta = rng.standard_normal(C).astype(np.float32)
    eps = 1e-12
    y_bn, cache = fastbn.batch_norm(x, gamma, beta, eps=eps)
    want = fastbn.batch_norm_backward(dy * (y_bn > 0), cache)
    invstd = cache.invstd[0]
    p = gamma[0] * invstd**2 * abs(want[1][0]) / (x.size / C)  # dx = ... + (x - mean) * p
    assert gamma[0] * invstd < 3e38 < p  # the case is real
    y, cache = fastbn.batch_norm(x, gamma, beta, eps=eps, activation="relu")
    got = fastbn.batch_norm_backward(dy, cache)
    assert y.tobytes() == np.maximum(y_bn, 0).tobytes()
    assert np.isfinite(got[0]).all()
    for g, w in zip(got, want):
        assert ulps(g, w) <= 2


# -- layer, gradients, errors -----------------------------------------------------------------


def test_layer_matches_functional_and_trains():
    rng = np.random.default_rng(6)
    x, dy, _, _, _ = random_case(rng, "NCHW", np.float64)
    bn = fastbn.BatchNorm(7, dtype=np.float64, activation="relu")
    plain = fastbn.BatchNorm(7, dtype=np.float64)
    assert repr(bn).endswith("activation='relu')") and "activation" not in repr(plain)
    for layer in (bn, plain):
        layer.gamma[...] = 1 + 0.3 * np.arange(7)
        layer.beta[...] = np.linspace(-1, 1, 7)
    y = bn(x)
    y_bn = plain(x)
    assert y.tobytes() == np.maximum(y_bn, 0).tobytes()
    dx, dx_plain = bn.backward(dy), plain.backward(dy * (y_bn > 0))
    fused, composed = (dx, bn.dgamma, bn.dbeta), (dx_plain, plain.dgamma, plain.dbeta)
    assert_gradients_agree(fused, composed, x, 1, dy * (y_bn > 0))
    for key, value in plain.state_dict().items():
        np.testing.assert_array_equal(bn.state_dict()[key], value)
    bn.eval(), plain.eval()
    assert bn(x).tobytes() == np.maximum(plain(x), 0).tobytes()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,axis", [((9, 3), 1), ((4, 3, 5), 1), ((3, 2, 2, 4), -1)])
def test_central_differences(shape, axis, training):
    """float64 gradients of ``sum(w * relu(bn(x)))`` against central differences; inputs
    drawn until no pre-activation lies within 1e-4 of the kink (where differences fail)."""
    rng = np.random.default_rng(42)
    C = shape[axis]
    rm, rv = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    kw = dict(axis=axis, training=training, activation="relu")
    if not training:
        kw.update(running_mean=rm, running_var=rv)
    for _ in range(100):
        x = rng.standard_normal(shape) * 2 + 1
        gamma, beta = rng.standard_normal(C), rng.standard_normal(C)
        pre, _ = fastbn.batch_norm(x, gamma, beta, **{**kw, "activation": None})
        if np.min(np.abs(pre)) > 1e-4:
            break
    w = rng.standard_normal(shape)
    _, cache = fastbn.batch_norm(x, gamma, beta, **kw)
    analytic = fastbn.batch_norm_backward(w, cache)
    assert 0 < np.mean(pre > 0) < 1

    def loss():
        return float(np.sum(w * fastbn.batch_norm(x, gamma, beta, **kw)[0]))

    h = 1e-6
    for grad, arr in zip(analytic, (x, gamma, beta)):
        num = np.empty_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + h
            up = loss()
            arr[i] = old - h
            down = loss()
            arr[i] = old
            num[i] = (up - down) / (2 * h)
        err = np.max(np.abs(grad - num)) / max(np.max(np.abs(num)), 1e-12)
        assert err < 1e-6, err


def test_default_is_plain_batch_norm():
    rng = np.random.default_rng(8)
    x, dy, gamma, beta, axis = random_case(rng, "NCL", np.float32)
    y1, c1 = fastbn.batch_norm(x, gamma, beta, axis=axis)
    y2, c2 = fastbn.batch_norm(x, gamma, beta, axis=axis, activation=None)
    assert y1.tobytes() == y2.tobytes() and (y1 < 0).any()
    assert c1.activation is None and c2.activation is None and c2.beta is None
    for a, b in zip(fastbn.batch_norm_backward(dy, c1), fastbn.batch_norm_backward(dy, c2)):
        assert a.tobytes() == b.tobytes()


def test_cache_stays_o_of_c():
    """The ReLU cache adds a copy of beta (C values) and the forward's per-channel
    coefficients, nothing of x's size."""
    x = np.random.default_rng(0).standard_normal((1000, 8))
    beta = np.zeros(8)
    _, cache = fastbn.batch_norm(x, np.ones(8), beta, activation="relu")
    assert cache.beta.shape == (8,) and not np.shares_memory(cache.beta, beta)
    sizes = [getattr(cache, s).size for s in ("gamma", "beta", "stats")]
    assert max(sizes) <= 4 * 8
    rows, cols = cache.fwork.shape  # C columns and spare ones (at most one row group)
    assert rows <= 8 and cols <= 8 + 256 and cache.fwork.dtype == x.dtype


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "checked"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["ND", "NCHW", "NHWC", "wide_rows"])
def test_cached_coefficients_are_the_rebuilt_ones(layout, dtype, training, quick):
    """The cache keeps the coefficients the forward's elementwise pass read; they equal,
    bit for bit, those rebuilt from the cached statistics by ``coefficients.working`` with
    the forward's inputs (mean, invstd * gamma, beta), and backward gives the same bits
    from either."""
    from fastbn._kernels import coefficients

    rng = np.random.default_rng(21)
    x, dy, gamma, beta, axis = random_case(rng, layout, dtype)
    C = x.shape[axis]
    running = _running(C, dtype, rng)
    kw = dict(axis=axis, training=training, activation="relu")
    kw.update(running_mean=running[0].copy(), running_var=running[1].copy())
    if not quick:  # a strided view: the checked path of batch_norm (not _quick)
        gamma = np.repeat(gamma, 2)[::2]
    y, cache = fastbn.batch_norm(x, gamma, beta, **kw)
    kept = cache.fwork
    assert kept is not None and kept.dtype == x.dtype
    plan = cache.plan
    scale = cache.stats[3] * (plan.ones if cache.gamma is None else cache.gamma)
    mean, beta_used = cache.stats[0], plan.zeros if cache.beta is None else cache.beta
    rebuilt, _ = coefficients.working(
        plan.ones, mean, scale, beta_used, scale, mean, 1.0, False, plan.fold
    )
    # every row, per channel; the rows family's streamed lines also read the coefficient
    # rows past C (the periodic extension), the planes family never does
    assert kept[:, :C].tobytes() == rebuilt[:, :C].tobytes()
    if cache.plan.inner == 1:
        read = [W_MEAN, W_SCALE, W_OFFSET]
        assert kept[read].tobytes() == rebuilt[read].tobytes()
    got = fastbn.batch_norm_backward(dy, cache)
    cache.fwork = rebuilt  # backward from the rebuilt coefficients
    want = fastbn.batch_norm_backward(dy, cache)
    for g, w in zip(got, want):
        assert g.tobytes() == w.tobytes()


@pytest.mark.parametrize("big", [None, "mean", "scale", "offset", "dy_mean"])
def test_working_reports_the_channels_it_flags(big):
    """``coefficients.working`` returns ``clamped`` True exactly when some channel's
    ``W_CLAMPED`` flag is set (a float32 coefficient beyond 3.4e38; the elementwise pass
    is then redone in float64), as a sweep of the flags (``any_clamped``) finds."""
    from fastbn._kernels import coefficients
    from fastbn._kernels.layout import W_CLAMPED

    rng = np.random.default_rng(3)
    C = 37
    m, p, q, g = (rng.standard_normal(C) for _ in range(4))
    dsum = rng.standard_normal(C)
    channel = 11
    if big == "mean":
        m[channel] = 1e39
    elif big == "scale":
        p[channel] = -5e38
    elif big == "offset":
        q[channel] = 4e38
    elif big == "dy_mean":
        dsum[channel] = 1e40
    work, clamped = coefficients.working(np.ones(1, np.float32), m, p, q, g, dsum, 8.0, True, 1)
    flagged = np.flatnonzero(work[W_CLAMPED, :C])
    assert clamped == coefficients.any_clamped(work, C) == (big is not None)
    assert list(flagged) == ([] if big is None else [channel])
    work64, clamped64 = coefficients.working(np.ones(1), m, p, q, g, dsum, 8.0, True, 1)
    assert not clamped64 and not work64[W_CLAMPED, :C].any()  # float64 storage holds them


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fold", [2, 4, 9])
def test_folded_working_repeats_each_channel_over_its_columns(fold, dtype):
    """``working(..., fold)`` (a folded plan: tiny planes as rows) writes channel ``c``'s
    coefficients and flag into columns ``c * fold`` to ``c * fold + fold - 1``, bit for bit
    those of ``working`` over the per-column arrays ``np.repeat(a, fold)``, the spare
    columns of the coefficient rows included (the periodic extension past the last
    column; the flags have none)."""
    from fastbn._kernels import coefficients
    from fastbn._kernels.layout import W_CLAMPED

    rng = np.random.default_rng(4)
    C = 13
    m, p, q, g = (rng.standard_normal(C) for _ in range(4))
    dsum = rng.standard_normal(C)
    if dtype == np.float32:
        p[5] = 1e39  # a clamped channel: its flag is repeated too
    out = np.ones(1, dtype)
    work, clamped = coefficients.working(out, m, p, q, g, dsum, 8.0, True, fold)
    columns = [np.repeat(a, fold) for a in (m, p, q, g, dsum)]
    want, want_clamped = coefficients.working(out, *columns, 8.0, True, 1)
    assert work.shape == want.shape and work.shape[1] > C * fold
    assert work[:W_CLAMPED].tobytes() == want[:W_CLAMPED].tobytes()
    assert work[W_CLAMPED, : C * fold].tobytes() == want[W_CLAMPED, : C * fold].tobytes()
    assert clamped == want_clamped == (dtype == np.float32)


@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((48, 3000), np.float64),  # column chunks of 1024
        ((37, 1500), np.float64),  # a chunk of 1024 and one of 476
        ((45, 2100), np.float32),  # chunks of 1024 and 52
    ],
)
def test_wide_rows_relu_equal_the_composition(shape, dtype):
    """Rows split into column chunks, four rows at a time and a remainder of rows (not a
    multiple of four): the ReLU rows loops give the composition's gradients bit for bit."""
    rng = np.random.default_rng(shape[1])
    x = (0.5 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = (1 + 0.3 * rng.standard_normal(shape[1])).astype(dtype)
    beta = rng.standard_normal(shape[1]).astype(dtype)
    y, cache = fastbn.batch_norm(x, gamma, beta)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy * (y > 0), cache)
    y_relu, cache_relu = fastbn.batch_norm(x, gamma, beta, activation="relu")
    dx_relu, dgamma_relu, dbeta_relu = fastbn.batch_norm_backward(dy, cache_relu)
    np.testing.assert_array_equal(y_relu, np.maximum(y, 0))
    for got, want in ((dx_relu, dx), (dgamma_relu, dgamma), (dbeta_relu, dbeta)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(100, 100), (64, 256), (128, 16), (33, 16), (7, 3), (50, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_small_rows_training_backward_is_the_composition_bit_for_bit(shape, dtype):
    """Serial rows plans mask ``dy`` once into a scratch array that the plain passes read
    (``ops._masked_rows``): every output is then the composition's, bit for bit, with
    ``dy`` holding NaN, inf and signed zeros, row counts not a multiple of the row
    groups, and pre-activations exactly 0 (beta 0 and x at the mean)."""
    assert not _plan.Plan(*shape, 1, np.dtype(dtype).itemsize).parallel
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    x[:2] = 1.0  # two equal rows: with the others, pre-activations of all signs
    dy = rng.standard_normal(shape).astype(dtype)
    dy.flat[::7] = -0.0
    dy.flat[3::11] = 0.0
    dy.flat[5] = np.nan
    dy.flat[-1] = np.inf
    C = shape[1]
    gamma = rng.uniform(0.5, 2.0, C).astype(dtype)
    beta = np.zeros(C, dtype)
    beta[::2] = rng.standard_normal(len(beta[::2])).astype(dtype)
    running = _running(C, dtype, rng)
    fused = _call(x, gamma, beta, 1, True, running, dy, activation="relu")
    with np.errstate(invalid="ignore"):  # the composition's inf * 0 (NaN, as fused)
        plain = _call(x, gamma, beta, 1, True, running, dy, activation=None)
    for got, want in zip(fused, plain):
        assert got.tobytes() == want.tobytes()
