"""Adversarial inputs: every bad argument gets a clear error and changes nothing; every
odd-but-valid array gives the answer of a plain contiguous copy; extreme values give
exact numbers or NaN where NaN belongs, never garbage.

Each case asserts an exact outcome: the exception type and a fragment of its message
(and that no array was modified), or numbers checked against the float64 reference
(``fastbn.reference``), against a contiguous copy, or against exact values.
"""

import re

import numpy as np
import pytest

import fastbn

from _cases import (
    FAMILIES,
    ODD_LAYOUTS,
    TOL,
    TOL_REORDERED,
    broadcast_rows,
    f64,
    oracle,
    read_only,
    rel_err,
    relayout,
)

C = 3
F32 = np.float32


def _rng(seed=0):
    return np.random.default_rng(seed)


def _x(shape=(8, C), dtype=F32, seed=0, scale=2.0, offset=1.0):
    return (offset + scale * _rng(seed).standard_normal(shape)).astype(dtype)


def _params(n=C, dtype=F32, seed=1):
    rng = _rng(seed)
    gamma = (1.0 + 0.5 * rng.standard_normal(n)).astype(dtype)
    beta = rng.standard_normal(n).astype(dtype)
    return gamma, beta


def _running(n=C, dtype=F32):
    return np.zeros(n, dtype), np.ones(n, dtype)


# -- 1. bad arguments: exception type, message fragment, nothing modified ---------------
#
# A case returns ``(call, watched)``: ``call()`` must raise; every ndarray in ``watched``
# must be bitwise unchanged afterwards (no partial update of running stats or out).


def fwd(x=None, gamma="default", beta="default", **kw):
    x = _x() if x is None else x
    g, b = _params()
    gamma = g if isinstance(gamma, str) else gamma
    beta = b if isinstance(beta, str) else beta
    arrays = [x, gamma, beta, *kw.values()]
    return (lambda: fastbn.batch_norm(x, gamma, beta, **kw)), arrays


def bwd(dy=None, x=None, out=None, modify_x=None, cache=None):
    x = _x() if x is None else x
    gamma, beta = _params()
    y, real_cache = fastbn.batch_norm(x, gamma, beta)
    dy = _x(seed=5) if dy is None else dy
    if modify_x is not None:
        modify_x(x)
    cache = real_cache if cache is None else cache(x, gamma, beta)
    return (lambda: fastbn.batch_norm_backward(dy, cache, out=out)), [dy, x, out]


def _overlapping_pair(shape=(8, C)):
    buf = np.zeros((shape[0] + 1,) + shape[1:], F32)
    buf[...] = _x((shape[0] + 1,) + shape[1:])
    return buf[1:], buf[:-1]  # x, out: same buffer shifted by one row


def _x_and_out_overlapping():
    x, out = _overlapping_pair()
    return fwd(x=x, out=out)


def _out_overlapping_beta():
    out = np.zeros((8, C), F32)
    return fwd(beta=out[0], out=out)


def _running_mean_view_of_x():
    x = _x()
    return fwd(x=x, running_mean=x[0], running_var=np.ones(C, F32))


def _running_stats_overlap():
    buf = np.zeros(C + 1, F32)
    return fwd(running_mean=buf[:C], running_var=buf[1:])


def _running_stats_same():
    rm = np.zeros(C, F32)
    return fwd(running_mean=rm, running_var=rm)


def _backward_out_overlaps_dy():
    dy = np.zeros((9, C), F32)
    dy[...] = _x((9, C), seed=4)
    return bwd(dy=dy[1:], out=dy[:-1])


def _backward_out_is_x():
    x = _x()
    return bwd(x=x, out=x)


def _x_modified_in_place(modify):
    return bwd(modify_x=modify)


def _relu_in_place(x):
    np.maximum(x, 0, out=x)


def _next_batch(x):
    x[...] = _x(seed=9)


def _scale_in_place(x):
    x *= 2


def _layer_wrong_channels():
    bn = fastbn.BatchNorm(C)
    return (lambda: bn(_x((8, C + 2)))), [bn.gamma, bn.running_mean, bn.running_var]


def _relu_cache_then_x_scaled():
    x = _x()
    gamma, beta = _params()
    _, cache = fastbn.batch_norm(x, gamma, beta, activation="relu")
    x *= 2
    dy = _x(seed=5)
    return (lambda: fastbn.batch_norm_backward(dy, cache)), [dy, x]


def _bad_activation_with_outputs(activation):
    """A bad activation with out= and running statistics: none of them is written."""
    rm, rv = _running()
    return fwd(activation=activation, out=np.zeros((8, C), F32), running_mean=rm, running_var=rv)


def _cache_from_reference():
    return bwd(cache=lambda x, g, b: fastbn.reference.batch_norm(x, g, b)[1])


ERRORS = [
    # x: type and dtype
    ("x_list", lambda: fwd(x=_x().tolist()), TypeError, "x must be a numpy.ndarray, got list"),
    ("x_python_float", lambda: fwd(x=1.5), TypeError, "x must be a numpy.ndarray, got float"),
    ("x_numpy_scalar", lambda: fwd(x=F32(1.5)), TypeError, "got float32"),
    (
        "x_int64",
        lambda: fwd(x=np.arange(24).reshape(8, C)),
        TypeError,
        "x must have dtype float16, float32 or float64, got array of shape (8, 3) and dtype int64",
    ),
    ("x_bool", lambda: fwd(x=np.ones((8, C), bool)), TypeError, "dtype bool"),
    ("x_complex", lambda: fwd(x=_x().astype(np.complex64)), TypeError, "dtype complex64"),
    ("x_object", lambda: fwd(x=_x().astype(object)), TypeError, "dtype object"),
    ("x_uint8", lambda: fwd(x=np.ones((8, C), np.uint8)), TypeError, "dtype uint8"),
    (
        "x_masked",
        lambda: fwd(x=np.ma.masked_greater(_x(), 1.0)),
        TypeError,
        "x is a masked array",
    ),
    # x: rank, axis
    (
        "x_0d",
        lambda: fwd(x=np.array(1.0, F32)),
        ValueError,
        "x must have at least 2 dimensions (batch and channel), got array of shape ()",
    ),
    (
        "x_1d",
        lambda: fwd(x=_x((8,))),
        ValueError,
        "x must have at least 2 dimensions (batch and channel), got array of shape (8,)",
    ),
    (
        "axis_too_big",
        lambda: fwd(axis=2),
        ValueError,
        "axis 2 is out of range for an input with 2 dimensions (expected -2 <= axis < 2)",
    ),
    ("axis_too_negative", lambda: fwd(axis=-3), ValueError, "axis -3 is out of range"),
    ("axis_float", lambda: fwd(axis=1.0), TypeError, "axis must be an int, got float"),
    ("axis_bool", lambda: fwd(axis=True), TypeError, "axis must be an int, got bool"),
    # per-channel parameters
    (
        "gamma_wrong_length",
        lambda: fwd(gamma=np.ones(4, F32)),
        ValueError,
        "gamma must have shape (3,) to match the 3 channels of x, got array of shape (4,)",
    ),
    (
        "gamma_2d",
        lambda: fwd(gamma=np.ones((C, 1), F32)),
        ValueError,
        "gamma must have shape (3,) to match the 3 channels of x, got array of shape (3, 1)",
    ),
    (
        "gamma_int",
        lambda: fwd(gamma=np.ones(C, np.int32)),
        TypeError,
        "gamma must have dtype float16, float32 or float64, got array of shape (3,) "
        "and dtype int32",
    ),
    ("beta_list", lambda: fwd(beta=[0.0] * C), TypeError, "beta must be a numpy.ndarray"),
    (
        "beta_wrong_length",
        lambda: fwd(beta=np.zeros(2, F32)),
        ValueError,
        "beta must have shape (3,)",
    ),
    (
        "running_mean_wrong_length",
        lambda: fwd(running_mean=np.zeros(C + 1, F32), running_var=np.ones(C, F32)),
        ValueError,
        "running_mean must have shape (3,) to match the 3 channels of x, got array of shape (4,)",
    ),
    (
        "running_var_int",
        lambda: fwd(running_mean=np.zeros(C, F32), running_var=np.ones(C, np.int64)),
        TypeError,
        "running_var must have dtype float16, float32 or float64 (it is updated in place)",
    ),
    (
        "running_mean_read_only",
        lambda: fwd(running_mean=read_only(np.zeros(C, F32)), running_var=np.ones(C, F32)),
        ValueError,
        "running_mean is read-only",
    ),
    (
        "eval_without_running_stats",
        lambda: fwd(training=False),
        ValueError,
        "running_mean and running_var are required when training=False",
    ),
    (
        "eval_running_var_negative",
        lambda: fwd(
            training=False,
            running_mean=np.zeros(C, F32),
            running_var=np.array([1.0, -0.5, np.nan], F32),
        ),
        ValueError,
        "running_var must be >= 0, got negative values at channels [1] (e.g. -0.5)",
    ),
    (
        "eval_running_mean_wrong_dtype",
        lambda: fwd(training=False, running_mean=np.zeros(C, complex), running_var=np.ones(C, F32)),
        TypeError,
        "running_mean must have dtype float16, float32 or float64",
    ),
    # scalars
    ("eps_zero", lambda: fwd(eps=0.0), ValueError, "eps must be a positive finite float, got 0.0"),
    ("eps_negative", lambda: fwd(eps=-1e-5), ValueError, "got -1e-05"),
    ("eps_nan", lambda: fwd(eps=float("nan")), ValueError, "got nan"),
    ("eps_inf", lambda: fwd(eps=float("inf")), ValueError, "got inf"),
    ("eps_string", lambda: fwd(eps="1e-5"), TypeError, "eps must be a positive float, got str"),
    (
        "momentum_negative",
        lambda: fwd(momentum=-0.1, running_mean=np.zeros(C, F32), running_var=np.ones(C, F32)),
        ValueError,
        "momentum must be in [0, 1], got -0.1",
    ),
    (
        "momentum_above_one",
        lambda: fwd(momentum=1.5, running_mean=np.zeros(C, F32), running_var=np.ones(C, F32)),
        ValueError,
        "momentum must be in [0, 1], got 1.5",
    ),
    ("momentum_nan_without_stats", lambda: fwd(momentum=float("nan")), ValueError, "got nan"),
    ("momentum_string", lambda: fwd(momentum="0.1"), TypeError, "momentum must be a float"),
    (
        "momentum_none_with_stats",
        lambda: fwd(momentum=None, running_mean=np.zeros(C, F32), running_var=np.ones(C, F32)),
        ValueError,
        "momentum=None (cumulative average) needs a batch count",
    ),
    ("training_string", lambda: fwd(training="no"), TypeError, "training must be a bool, got str"),
    # batch size
    (
        "empty_batch_training",
        lambda: fwd(x=np.zeros((0, C), F32)),
        ValueError,
        "Expected more than 1 value per channel when training, got an empty batch: "
        "x has shape (0, 3)",
    ),
    (
        "one_value_per_channel",
        lambda: fwd(x=_x((1, C)), running_mean=np.zeros(C, F32), running_var=np.ones(C, F32)),
        ValueError,
        "got a single value per channel: x has shape (1, 3) with channel axis 1",
    ),
    (
        "one_value_per_channel_nchw",
        lambda: fwd(x=_x((1, C, 1, 1))),
        ValueError,
        "got a single value per channel: x has shape (1, 3, 1, 1)",
    ),
    # out=
    ("out_list", lambda: fwd(out=[0.0] * 24), TypeError, "out must be a numpy.ndarray, got list"),
    (
        "out_wrong_shape",
        lambda: fwd(out=np.zeros((C, 8), F32)),
        ValueError,
        "out must have shape (8, 3) and dtype float32 (those of x), got array of shape (3, 8)",
    ),
    (
        "out_wrong_dtype",
        lambda: fwd(out=np.zeros((8, C), np.float64)),
        ValueError,
        "out must have shape (8, 3) and dtype float32 (those of x), got array of shape (8, 3) "
        "and dtype float64",
    ),
    (
        "out_read_only",
        lambda: fwd(out=read_only(np.zeros((8, C), F32))),
        ValueError,
        "out is read-only",
    ),
    (
        "out_broadcast",
        lambda: fwd(out=np.broadcast_to(F32(0), (8, C))),
        ValueError,
        "out is read-only",
    ),
    ("out_is_x", lambda: (lambda x: fwd(x=x, out=x))(_x()), ValueError, "out overlaps x"),
    ("out_overlaps_x", _x_and_out_overlapping, ValueError, "out overlaps x"),
    ("out_overlaps_beta", _out_overlapping_beta, ValueError, "out overlaps beta"),
    # running statistics written in place
    ("running_mean_in_x", _running_mean_view_of_x, ValueError, "running_mean overlaps x"),
    (
        "running_stats_overlap",
        _running_stats_overlap,
        ValueError,
        "running_mean overlaps running_var",
    ),
    ("running_stats_same_array", _running_stats_same, ValueError, "must be different arrays"),
    # backward
    (
        "dy_wrong_shape",
        lambda: bwd(dy=_x((C, 8))),
        ValueError,
        "dy must have the shape of x, (8, 3), got array of shape (3, 8)",
    ),
    ("dy_int", lambda: bwd(dy=np.ones((8, C), np.int32)), TypeError, "dy must have dtype"),
    ("dy_list", lambda: bwd(dy=_x().tolist()), TypeError, "dy must be a numpy.ndarray"),
    (
        "cache_from_reference",
        _cache_from_reference,
        TypeError,
        "cache must be the BatchNormCache returned by fastbn.batch_norm, got dict",
    ),
    ("backward_out_is_x", _backward_out_is_x, ValueError, "out overlaps x"),
    ("backward_out_overlaps_dy", _backward_out_overlaps_dy, ValueError, "out overlaps dy"),
    (
        "x_modified_relu_in_place",
        lambda: _x_modified_in_place(_relu_in_place),
        ValueError,
        "x was modified after batch_norm returned this cache",
    ),
    (
        "x_modified_next_batch",
        lambda: _x_modified_in_place(_next_batch),
        ValueError,
        "x was modified after batch_norm returned this cache",
    ),
    (
        "x_modified_scaled",
        lambda: _x_modified_in_place(_scale_in_place),
        ValueError,
        "Keep x unchanged until backward",
    ),
    # activation (batch norm fused with a ReLU)
    (
        "activation_unknown",
        lambda: _bad_activation_with_outputs("gelu"),
        ValueError,
        "activation must be None or 'relu', got 'gelu'",
    ),
    ("activation_capitalized", lambda: fwd(activation="ReLU"), ValueError, "got 'ReLU'"),
    (
        "activation_int",
        lambda: _bad_activation_with_outputs(1),
        TypeError,
        "activation must be None or a str ('relu'), got int 1",
    ),
    ("activation_bool", lambda: fwd(activation=True), TypeError, "got bool True"),
    (
        "activation_relu_eval_without_running_stats",
        lambda: fwd(training=False, activation="relu"),
        ValueError,
        "running_mean and running_var are required when training=False",
    ),
    (
        "x_modified_relu_cache",
        _relu_cache_then_x_scaled,
        ValueError,
        "x was modified after batch_norm returned this cache",
    ),
    # layer
    (
        "layer_wrong_channels",
        _layer_wrong_channels,
        ValueError,
        "expects 3 channels on axis 1, got x of shape (8, 5) and dtype float32",
    ),
]


@pytest.mark.parametrize("case,exc,fragment", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_argument(case, exc, fragment):
    call, watched = case()
    before = [a.copy() for a in watched if isinstance(a, np.ndarray)]
    with pytest.raises(exc, match=re.escape(fragment)):
        call()
    after = [a for a in watched if isinstance(a, np.ndarray)]
    for a, b in zip(after, before):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()  # nothing was modified


def test_error_case_count():
    assert len(ERRORS) >= 40
    assert len({e[0] for e in ERRORS}) == len(ERRORS)


@pytest.mark.parametrize(
    "kwargs,exc,fragment",
    [
        ({"momentum": 2.0}, ValueError, "momentum must be in [0, 1], got 2.0"),
        ({"momentum": "a"}, TypeError, "momentum must be a float in [0, 1], got str"),
        ({"eps": 0}, ValueError, "eps must be a positive finite float, got 0.0"),
        ({"eps": float("inf")}, ValueError, "eps must be a positive finite float, got inf"),
        ({"axis": 1.5}, TypeError, "axis must be an int, got float"),
        ({"dtype": np.int32}, TypeError, "dtype must be float32 or float64, got int32"),
        ({"activation": "tanh"}, ValueError, "activation must be None or 'relu', got 'tanh'"),
        ({"activation": 0}, TypeError, "activation must be None or a str ('relu'), got int 0"),
    ],
    ids=["momentum_2", "momentum_str", "eps_0", "eps_inf", "axis_float", "dtype_int"]
    + ["activation_tanh", "activation_int"],
)
def test_layer_constructor_rejects(kwargs, exc, fragment):
    with pytest.raises(exc, match=re.escape(fragment)):
        fastbn.BatchNorm(C, **kwargs)


def test_layer_failed_forward_changes_no_state():
    bn = fastbn.BatchNorm(C, momentum=None)
    x = _x()
    bn(x)
    state = bn.state_dict()
    with pytest.raises(TypeError, match="x must have dtype"):
        bn(np.ones((8, C), np.int64))
    with pytest.raises(ValueError, match="single value per channel"):
        bn(_x((1, C)))
    after = bn.state_dict()
    assert after["num_batches_tracked"] == 1
    for key in ("running_mean", "running_var", "gamma", "beta"):
        np.testing.assert_array_equal(after[key], state[key])
    bn(_x(seed=3))  # the cumulative average still counts 2 batches
    mean = (f64(x).mean(0) + f64(_x(seed=3)).mean(0)) / 2
    np.testing.assert_allclose(bn.running_mean, mean, rtol=1e-6)


def test_layer_load_state_dict_is_atomic():
    bn = fastbn.BatchNorm(C)
    good = bn.state_dict()
    bad = {**good, "gamma": np.full(C, 5.0), "running_var": np.ones(C + 1)}
    with pytest.raises(ValueError, match=re.escape("running_var must have shape (3,), got (4,)")):
        bn.load_state_dict(bad)
    np.testing.assert_array_equal(bn.gamma, np.ones(C))  # gamma was not loaded either


@pytest.mark.parametrize(
    "n,exc,fragment",
    [
        (0, ValueError, "set_num_threads: n must be in [1, "),
        (10**6, ValueError, "set_num_threads: n must be in [1, "),
        (1.5, TypeError, "set_num_threads: n must be an int, got float"),
        (True, TypeError, "set_num_threads: n must be an int, got bool"),
    ],
    ids=["zero", "huge", "float", "bool"],
)
def test_set_num_threads_rejects(n, exc, fragment):
    before = fastbn.get_num_threads()
    with pytest.raises(exc, match=re.escape(fragment)):
        fastbn.set_num_threads(n)
    with pytest.raises(exc, match=re.escape(fragment)):
        with fastbn.num_threads(n):
            pass
    assert fastbn.get_num_threads() == before


# -- 2. arrays of every kind give the answer of a contiguous copy ----------------------


def _train_all(x, dy, axis, gamma=None, beta=None, **kw):
    y, cache = fastbn.batch_norm(x, gamma, beta, axis=axis, **kw)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, cache)
    return y, dx, dgamma, dbeta, cache


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(ODD_LAYOUTS))
def test_layout_equals_contiguous_copy(name, dtype):
    shape, axis, how, same_order = ODD_LAYOUTS[name]
    rng = _rng(abs(hash(name)) % 2**32)
    C_ = shape[axis]
    base = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    base_dy = rng.standard_normal(shape).astype(dtype)
    gamma = (1 + 0.3 * rng.standard_normal(C_)).astype(dtype)
    beta = rng.standard_normal(C_).astype(dtype)
    x, dy = relayout(base, how), relayout(base_dy, how)
    x_before, dy_before = x.copy(), dy.copy()
    rm, rv = np.zeros(C_, dtype), np.ones(C_, dtype)
    rm2, rv2 = rm.copy(), rv.copy()
    got = _train_all(x, dy, axis, gamma, beta, running_mean=rm, running_var=rv)
    want = _train_all(
        np.ascontiguousarray(x), np.ascontiguousarray(dy), axis, gamma, beta,
        running_mean=rm2, running_var=rv2,
    )  # fmt: skip
    for g, w in zip(got[:4] + (rm, rv), want[:4] + (rm2, rv2)):
        assert g.shape == w.shape and g.dtype == w.dtype
        if same_order:
            assert g.tobytes() == w.tobytes()  # the same bits
        else:  # another summation order (NHWC memory): the same numbers to rounding
            assert rel_err(g, w) < TOL_REORDERED[dtype]
    y_ref, dx_ref, dg_ref, db_ref = oracle(x, dy, gamma, beta, axis)
    tol = TOL[dtype]
    for g, w in zip((got[0], got[2], got[3]), (y_ref, dg_ref, db_ref)):
        assert rel_err(g, w) < tol
    # dx cancels to ~eps/var of its terms when a channel has 2 values: compare with
    # the size of the terms, |gamma| * invstd * |dy|
    dx_scale = np.max(np.abs(f64(gamma)) * got[4].invstd) * np.max(np.abs(f64(dy)))
    assert np.max(np.abs(f64(got[1]) - dx_ref)) < tol * dx_scale
    # inputs are never modified
    assert x.tobytes() == x_before.tobytes() and dy.tobytes() == dy_before.tobytes()


def test_broadcast_input_zero_strides():
    """x = broadcast_to(row): every channel constant, so y == beta and dx is finite."""
    row = _x((1, 5))
    x = broadcast_rows(np.broadcast_to(row, (7, 5)))
    gamma, beta = _params(5)
    y, cache = fastbn.batch_norm(x, gamma, beta)
    np.testing.assert_array_equal(y, np.broadcast_to(beta, (7, 5)))
    dy = _x((7, 5), seed=2)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, cache)
    _, dx_ref, dg_ref, db_ref = oracle(np.ascontiguousarray(x), dy, gamma, beta, 1)
    assert rel_err(dx, dx_ref) < 1e-6 and rel_err(dbeta, db_ref) < 1e-6
    np.testing.assert_array_equal(dgamma, np.zeros(5, F32))


def test_float16_is_computed_in_float32_and_returned_as_float16():
    x16 = _x((64, 4), dtype=np.float16)
    dy16 = _x((64, 4), dtype=np.float16, seed=3)
    gamma, beta = _params(4, np.float16)
    y, dx, dgamma, dbeta, _ = _train_all(x16, dy16, 1, gamma, beta)
    assert y.dtype == dx.dtype == dgamma.dtype == dbeta.dtype == np.float16
    # exactly the float32 computation on the float16 values, rounded to float16
    y32, dx32, dg32, db32, _ = _train_all(
        x16.astype(F32), dy16.astype(F32), 1, gamma.astype(F32), beta.astype(F32)
    )
    for g, w in [(y, y32), (dx, dx32)]:
        np.testing.assert_array_equal(g, w.astype(np.float16))
    for g, w in [(dgamma, dg32), (dbeta, db32)]:  # float64 sums, one rounding to float16
        np.testing.assert_allclose(g, w, rtol=2**-10)
    out = np.empty_like(x16)
    y_out, _ = fastbn.batch_norm(x16, gamma, beta, out=out)
    assert y_out is out
    np.testing.assert_array_equal(out, y)


def test_float16_and_byteswapped_running_stats_are_updated_in_place():
    x = _x((32, C))
    for dtype in (np.float16, np.dtype(">f4"), np.dtype(">f8")):
        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
        fastbn.batch_norm(x, None, None, running_mean=rm, running_var=rv, momentum=1.0)
        assert rm.dtype == dtype
        np.testing.assert_allclose(rm, f64(x).mean(0), rtol=1e-3 if dtype == np.float16 else 1e-6)
        np.testing.assert_allclose(
            rv, f64(x).var(0, ddof=1), rtol=1e-3 if dtype == np.float16 else 1e-6
        )


@pytest.mark.parametrize(
    "out_kind", ["fortran", "byteswapped", "strided", "channels_last_for_nchw_x"]
)
def test_out_of_any_layout_receives_the_result(out_kind):
    x = _x((4, C, 3, 5))
    dy = _x((4, C, 3, 5), seed=8)
    gamma, beta = _params()
    y_want, cache = fastbn.batch_norm(x, gamma, beta)
    dx_want, _, _ = fastbn.batch_norm_backward(dy, cache)
    make = {
        "fortran": lambda: np.asfortranarray(np.zeros_like(x)),
        "byteswapped": lambda: np.zeros(x.shape, ">f4"),
        "strided": lambda: np.zeros(x.shape[:-1] + (10,), F32)[..., ::2],
        "channels_last_for_nchw_x": lambda: relayout(np.zeros_like(x), "channels_last"),
    }[out_kind]
    out = make()
    y, cache = fastbn.batch_norm(x, gamma, beta, out=out)
    assert y is out
    np.testing.assert_array_equal(out, y_want)
    dx_out = make()
    dx, _, _ = fastbn.batch_norm_backward(dy, cache, out=dx_out)
    assert dx is dx_out
    np.testing.assert_array_equal(dx_out, dx_want)


def test_backward_in_place_into_dy():
    x, dy = _x((16, C, 4)), _x((16, C, 4), seed=6)
    _, cache = fastbn.batch_norm(x, None, None)
    dx_want, _, _ = fastbn.batch_norm_backward(dy, cache)
    dx, _, _ = fastbn.batch_norm_backward(dy, cache, out=dy)
    assert dx is dy
    np.testing.assert_array_equal(dy, dx_want)


def test_dy_of_another_float_dtype_is_converted_to_x_dtype():
    x, dy = _x((16, C)), _x((16, C), dtype=np.float64, seed=6)
    _, cache = fastbn.batch_norm(x, None, None)
    dx, _, _ = fastbn.batch_norm_backward(dy, cache)
    dx32, _, _ = fastbn.batch_norm_backward(dy.astype(F32), cache)
    assert dx.dtype == F32
    np.testing.assert_array_equal(dx, dx32)


def test_cache_can_be_used_twice():
    x, dy = _x((16, C)), _x((16, C), seed=6)
    gamma, beta = _params()
    _, cache = fastbn.batch_norm(x, gamma, beta)
    first = fastbn.batch_norm_backward(dy, cache)
    second = fastbn.batch_norm_backward(dy, cache)
    for a, b in zip(first, second):
        assert a.tobytes() == b.tobytes()


def test_x_modified_but_cache_holds_a_copy_is_fine():
    """A non-contiguous x is copied into the cache, so modifying x cannot hurt."""
    x = np.asfortranarray(_x((16, C, 2)))
    dy = _x((16, C, 2), seed=6)
    _, cache = fastbn.batch_norm(x, None, None)
    dx_want, _, _ = fastbn.batch_norm_backward(dy, cache)
    x *= 3
    dx, _, _ = fastbn.batch_norm_backward(dy, cache)
    np.testing.assert_array_equal(dx, dx_want)


def test_caller_arrays_do_not_alias_the_cache():
    """Eval-mode statistics are snapshots: updating running stats later (another
    training call) does not change an earlier cache's backward."""
    x, dy = _x((16, C), dtype=np.float64), _x((16, C), dtype=np.float64, seed=6)
    gamma, beta = _params(dtype=np.float64)
    rm, rv = np.full(C, 0.5), np.full(C, 2.0)
    _, cache = fastbn.batch_norm(x, gamma, beta, training=False, running_mean=rm, running_var=rv)
    want = fastbn.batch_norm_backward(dy, cache)
    fastbn.batch_norm(_x((16, C), np.float64, seed=9), None, None, running_mean=rm, running_var=rv)
    gamma *= 5
    got = fastbn.batch_norm_backward(dy, cache)
    for a, b in zip(got, want):
        assert a.tobytes() == b.tobytes()


def test_empty_batch_in_eval_mode_gives_empty_results():
    x = np.zeros((0, C, 4), F32)
    gamma, beta = _params()
    rm, rv = _running()
    y, cache = fastbn.batch_norm(x, gamma, beta, training=False, running_mean=rm, running_var=rv)
    assert y.shape == (0, C, 4) and y.dtype == F32
    dx, dgamma, dbeta = fastbn.batch_norm_backward(np.zeros_like(x), cache)
    assert dx.shape == (0, C, 4)
    np.testing.assert_array_equal(dgamma, np.zeros(C, F32))
    np.testing.assert_array_equal(dbeta, np.zeros(C, F32))


@pytest.mark.parametrize("training", [True, False])
def test_zero_channels_give_empty_results(training):
    x = np.zeros((4, 0), F32)
    rm, rv = np.zeros(0, F32), np.ones(0, F32)
    y, cache = fastbn.batch_norm(
        x, np.ones(0, F32), np.zeros(0, F32), training=training, running_mean=rm, running_var=rv
    )
    assert y.shape == (4, 0)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(np.zeros_like(x), cache)
    assert dx.shape == (4, 0) and dgamma.shape == (0,) and dbeta.shape == (0,)


def test_other_ndarray_subclasses_are_read_as_plain_arrays(tmp_path):
    x = _x((10, C))
    mm = np.memmap(tmp_path / "x.dat", dtype=F32, mode="w+", shape=x.shape)
    mm[...] = x
    y_mm, _ = fastbn.batch_norm(mm, None, None)
    y, _ = fastbn.batch_norm(x, None, None)
    assert type(y_mm) is np.ndarray
    np.testing.assert_array_equal(y_mm, y)


# -- 3. extreme values -----------------------------------------------------------------
#
# On the shapes of _cases.FAMILIES: both kernel families, small (serial) and large (parallel).


def _poisoned(name, value, where, dtype=F32):
    shape, axis = FAMILIES[name]
    x = _x(shape, dtype=dtype, seed=11)
    dy = _x(shape, dtype=dtype, seed=12)
    clean = x.copy()
    channel = np.moveaxis(x, axis, -1)[..., 2]  # a view of channel 2's values
    n = channel.size
    index = {"first": 0, "middle": n // 2 + 1, "last": n - 1}[where]
    channel[np.unravel_index(index, channel.shape)] = value
    return x, clean, dy, axis


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_nonfinite_value_poisons_only_its_channel(family, value, where):
    x, clean, dy, axis = _poisoned(family, value, where)
    C_ = x.shape[axis]
    gamma, beta = _params(C_)
    rm, rv = _running(C_)
    rm_c, rv_c = _running(C_)
    y, cache = fastbn.batch_norm(x, gamma, beta, axis=axis, running_mean=rm, running_var=rv)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, cache)
    y_c, cache_c = fastbn.batch_norm(
        clean, gamma, beta, axis=axis, running_mean=rm_c, running_var=rv_c
    )
    dx_c, dgamma_c, dbeta_c = fastbn.batch_norm_backward(dy, cache_c)
    ch = lambda a, c: np.moveaxis(a, axis, -1)[..., c]  # noqa: E731
    # the poisoned channel: NaN everywhere, NaN statistics
    assert np.isnan(ch(y, 2)).all() and np.isnan(ch(dx, 2)).all()
    assert np.isnan(cache.mean[2]) and np.isnan(cache.invstd[2])
    assert np.isnan(rm[2]) and np.isnan(rv[2]) and np.isnan(dgamma[2])
    assert dbeta[2] == dbeta_c[2]  # sum(dy) does not involve x
    # every other channel: the same bits as without the poison
    for c in (0, 1, 3, 4)[: C_ - 1]:
        assert ch(y, c).tobytes() == ch(y_c, c).tobytes()
        assert ch(dx, c).tobytes() == ch(dx_c, c).tobytes()
    keep = np.arange(C_) != 2
    for a, b in [(rm, rm_c), (rv, rv_c), (dgamma, dgamma_c), (dbeta, dbeta_c)]:
        assert a[keep].tobytes() == b[keep].tobytes()


@pytest.mark.parametrize("family", ["rows_small", "planes_parallel"])
def test_nan_in_dy_poisons_only_its_channel(family):
    shape, axis = FAMILIES[family]
    x, dy = _x(shape, seed=1), _x(shape, seed=2)
    gamma, beta = _params(shape[axis])
    _, cache = fastbn.batch_norm(x, gamma, beta, axis=axis)
    dx_c, dg_c, db_c = fastbn.batch_norm_backward(dy, cache)
    np.moveaxis(dy, axis, -1)[..., 1][(0,) * (dy.ndim - 1)] = np.nan  # one value, channel 1
    dx, dg, db = fastbn.batch_norm_backward(dy, cache)
    ch = lambda a, c: np.moveaxis(a, axis, -1)[..., c]  # noqa: E731
    assert np.isnan(ch(dx, 1)).all() and np.isnan(dg[1]) and np.isnan(db[1])
    for c in (0, 2):
        assert ch(dx, c).tobytes() == ch(dx_c, c).tobytes()
        assert dg[c] == dg_c[c] and db[c] == db_c[c]


def test_both_infinities_in_one_channel():
    x = _x((10, C))
    x[3, 0], x[7, 0] = np.inf, -np.inf
    y, cache = fastbn.batch_norm(x, None, None)
    assert np.isnan(y[:, 0]).all() and np.isnan(cache.mean[0])
    assert np.isfinite(y[:, 1:]).all()


def test_nan_in_eval_mode_stays_in_its_element():
    x = _x((10, C))
    x[4, 1] = np.nan
    rm, rv = np.full(C, 0.5, F32), np.full(C, 2.0, F32)
    y, _ = fastbn.batch_norm(x, None, None, training=False, running_mean=rm, running_var=rv)
    expected = (f64(x) - 0.5) / np.sqrt(2.0 + 1e-5)
    assert np.isnan(y[4, 1])
    mask = ~np.isnan(expected)
    assert rel_err(y[mask], expected[mask]) < 1e-6


def test_eval_backward_dx_does_not_depend_on_x_values():
    x = _x((10, C), dtype=np.float64)
    x[4, 1] = np.inf
    dy = _x((10, C), dtype=np.float64, seed=3)
    rm, rv = np.full(C, 0.5), np.full(C, 2.0)
    _, cache = fastbn.batch_norm(x, None, None, training=False, running_mean=rm, running_var=rv)
    dx, _, _ = fastbn.batch_norm_backward(dy, cache)
    np.testing.assert_allclose(dx, dy / np.sqrt(2.0 + 1e-5), rtol=1e-15)


@pytest.mark.parametrize("value", [0.0, -3.5, 1e30, 7.0e-30])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_constant_channel_gives_beta_exactly(family, value):
    shape, axis = FAMILIES[family]
    x = _x(shape, seed=4)
    np.moveaxis(x, axis, -1)[..., 1] = value
    dy = _x(shape, seed=5)
    C_ = shape[axis]
    gamma, beta = _params(C_)
    y, cache = fastbn.batch_norm(x, gamma, beta, axis=axis)
    yc = np.moveaxis(y, axis, -1)[..., 1]
    assert (yc == beta[1]).all()  # exactly: no division blow-up, no rounding residue
    assert cache.mean[1] == F32(value)
    np.testing.assert_allclose(cache.invstd[1], 1 / np.sqrt(1e-5), rtol=1e-14)
    dx, dgamma, _ = fastbn.batch_norm_backward(dy, cache)
    assert dgamma[1] == 0
    # xhat = 0 in that channel: dx = gamma / sqrt(eps) * (dy - mean(dy)), finite
    dyc = f64(np.moveaxis(dy, axis, -1)[..., 1])
    expected = gamma[1] / np.sqrt(1e-5) * (dyc - dyc.mean())
    assert rel_err(np.moveaxis(dx, axis, -1)[..., 1], expected) < TOL[F32]
    # the other channels match the float64 reference (which is itself inexact on a
    # constant channel: its mean of n copies of 1e30 is not exactly 1e30)
    _, dx_ref, _, _ = oracle(x, dy, gamma, beta, axis)
    others = np.arange(C_) != 1
    assert np.isfinite(dx).all()
    assert (
        rel_err(np.moveaxis(dx, axis, -1)[..., others], np.moveaxis(dx_ref, axis, -1)[..., others])
        < TOL[F32]
    )


@pytest.mark.parametrize("magnitude", [1e30, 3e38])
def test_float32_near_max_does_not_overflow_the_variance(magnitude):
    rng = _rng(6)
    x = (magnitude * rng.uniform(-1, 1, (4000, 4))).astype(F32)
    x[:, 3] = (magnitude / 2 * (1 + 0.1 * rng.standard_normal(4000))).astype(F32)
    rm, rv = np.zeros(4), np.ones(4)  # float64 running stats can hold var ~ 1e77
    y, cache = fastbn.batch_norm(x, None, None, running_mean=rm, running_var=rv, momentum=1.0)
    x64 = f64(x)
    var = x64.var(0)
    assert np.isfinite(y).all() and np.isfinite(rv).all()
    np.testing.assert_allclose(1 / cache.invstd**2 - 1e-5, var, rtol=1e-12)
    np.testing.assert_allclose(rv, x64.var(0, ddof=1), rtol=1e-12)
    y_ref = (x64 - x64.mean(0)) / np.sqrt(var + 1e-5)
    assert np.max(np.abs(y - y_ref)) < TOL[F32] * np.max(np.abs(y_ref))


def test_float32_large_offset_small_noise():
    """x = 1e7 + noise in float32 (spacing 1 at 1e7): the float32 values are what they
    are, and fastbn normalizes exactly those values (the naive float32 formula does not)."""
    rng = _rng(7)
    x = (1e7 + 3.0 * rng.standard_normal((50000, 3))).astype(F32)
    x[:, 2] = (1e7 + 300.0 * rng.standard_normal(50000)).astype(F32)
    y, cache = fastbn.batch_norm(x, None, None)
    x64 = f64(x)
    y_ref = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    assert np.max(np.abs(y - y_ref)) < TOL[F32] * np.max(np.abs(y_ref))
    np.testing.assert_allclose(f64(y).mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(f64(y).var(0), x64.var(0) / (x64.var(0) + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(cache.mean, x64.mean(0), rtol=1e-15)


def test_tiny_values_and_subnormals():
    rng = _rng(8)
    x = (1e-40 * rng.standard_normal((100, 2))).astype(F32)  # float32 subnormals
    x[:, 1] = (1e-30 * rng.standard_normal(100)).astype(F32)
    y, _ = fastbn.batch_norm(x, None, None)
    y_ref, _ = fastbn.reference.batch_norm(f64(x), None, None)
    assert np.max(np.abs(y - y_ref)) <= 1e-6 * np.max(np.abs(y_ref)) + 1e-44


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_running_stats_never_turn_nan_from_finite_batches():
    rng = _rng(9)
    rm, rv = np.zeros(4, F32), np.ones(4, F32)
    batches = [
        rng.standard_normal((16, 4)),
        np.full((16, 4), 3.0),  # constant: var 0
        1e18 * rng.standard_normal((16, 4)),  # var ~ 1e36: still a float32
        1e-30 * rng.standard_normal((16, 4)),
        1e30 * rng.standard_normal((16, 4)),  # var ~ 1e60: inf in float32 running_var
        rng.standard_normal((2, 4)),  # the smallest batch
    ]
    for momentum in (0.1, 1.0, 0.0, 0.5, 1.0):
        for b in batches:
            fastbn.batch_norm(
                b.astype(F32), None, None, running_mean=rm, running_var=rv, momentum=momentum
            )
            assert not np.isnan(rm).any() and not np.isnan(rv).any()
            assert (rv >= 0).all()
    # momentum=1 replaced the inf left by the 1e30 batch with a finite value
    assert np.isfinite(rv).all()


def test_momentum_one_replaces_infinite_running_var():
    rm, rv = np.zeros(2), np.array([np.inf, 1.0])
    x = _x((8, 2), dtype=np.float64)
    fastbn.batch_norm(x, None, None, running_mean=rm, running_var=rv, momentum=1.0)
    np.testing.assert_allclose(rv, x.var(0, ddof=1), rtol=1e-13)
    np.testing.assert_allclose(rm, x.mean(0), rtol=1e-13)


def test_momentum_zero_keeps_running_stats_bitwise():
    rm, rv = np.array([0.25, -1.0], F32), np.array([2.0, 0.5], F32)
    rm0, rv0 = rm.copy(), rv.copy()
    fastbn.batch_norm(_x((8, 2)), None, None, running_mean=rm, running_var=rv, momentum=0.0)
    assert rm.tobytes() == rm0.tobytes() and rv.tobytes() == rv0.tobytes()


def test_running_var_nan_in_eval_propagates_to_its_channel_only():
    x = _x((6, C))
    rm, rv = np.zeros(C, F32), np.array([1.0, np.nan, 4.0], F32)
    y, _ = fastbn.batch_norm(x, None, None, training=False, running_mean=rm, running_var=rv)
    assert np.isnan(y[:, 1]).all() and np.isfinite(y[:, [0, 2]]).all()


def test_float64_variance_overflow_warns():
    """Finite float64 values ~1e200 apart: the variance overflows (as in np.var); the
    channel's output is beta. Not silent: a RuntimeWarning names the channel."""
    x = np.array([[1e200, 1.0], [-1e200, 2.0], [3e199, 3.0]])
    beta = np.array([0.5, 0.0])
    fragment = "the variance of channels [0] overflows float64"
    with pytest.warns(RuntimeWarning, match=re.escape(fragment)):
        y, cache = fastbn.batch_norm(x, None, beta)
    assert (y[:, 0] == 0.5).all() and cache.invstd[0] == 0
    y_ref, _ = fastbn.reference.batch_norm(x[:, 1:], None, None)
    np.testing.assert_allclose(y[:, 1:], y_ref, rtol=1e-12)
