"""The common calls skip the full checks when every check would pass (``_checks._quick_*``,
``functional._backward_quick``). These tests hold the quick paths to the checked path:
the same bits for the same values, and the same errors where a quick path still checks.

The checked path is forced by passing parameters that do not own their memory (views of
larger buffers), which the quick checks refuse; the values are the same. An ``x`` (or
``dy``) may be a view: the quick checks need only know the array that owns its memory
(``_checks.memory_owner``) and that it is none of the arrays written.
"""

import pickle

import numpy as np
import pytest

import fastbn
from fastbn import _checks, functional

SHAPES = [(64, 48), (16, 6, 5, 7), (9, 3, 33)]


def _view_of_copy(a):
    """``a``'s values in an array that does not own its memory (the checked path)."""
    big = np.empty((2,) + a.shape, a.dtype)
    big[0] = a
    return big[0]


def _arrays(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    params = [
        rng.uniform(0.5, 1.5, C).astype(dtype),
        rng.standard_normal(C).astype(dtype),
        rng.standard_normal(C).astype(dtype),
        rng.uniform(0.5, 2.0, C).astype(dtype),
    ]
    return x, dy, params


def _forward(x, params, training, out, activation):
    gamma, beta, rm, rv = params
    y, cache = fastbn.batch_norm(
        x, gamma, beta, training=training, running_mean=rm, running_var=rv,
        momentum=0.25, eps=1e-4, out=out, activation=activation,
    )  # fmt: skip
    return y, cache


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("with_out", [False, True])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_quick_and_checked_paths_give_the_same_bits(shape, dtype, training, with_out, activation):
    x, dy, params = _arrays(shape, dtype)
    quick_params = [p.copy() for p in params]
    checked_params = [_view_of_copy(p) for p in params]
    x_checked = _view_of_copy(x)
    # the quick checks accept the first form and refuse the second
    args = (x, *quick_params[:2], training, *quick_params[2:], 0.25, 1e-4, 1, 1, None)
    assert _checks.quick_view(*args) is not None
    args = (x_checked, *checked_params[:2], training, *checked_params[2:], 0.25, 1e-4, 1, 1, None)
    assert _checks.quick_view(*args) is None

    out_quick = np.full(shape, 7, dtype) if with_out else None
    out_checked = _view_of_copy(np.full(shape, 7, dtype)) if with_out else None
    y1, cache1 = _forward(x, quick_params, training, out_quick, activation)
    y2, cache2 = _forward(x_checked, checked_params, training, out_checked, activation)
    if with_out:
        assert y1 is out_quick and y2 is out_checked
    np.testing.assert_array_equal(y1, y2)
    for a, b in zip(quick_params, checked_params):  # running statistics updated alike
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(cache1.mean, cache2.mean)
    np.testing.assert_array_equal(cache1.invstd, cache2.invstd)
    # the quick backward (plain dy) against the checked one (a dy that is a view)
    assert functional._backward_quick(dy, cache1, None) is not None
    dx_quick = np.full(shape, 5, dtype) if with_out else None
    dx_checked = _view_of_copy(np.full(shape, 5, dtype)) if with_out else None
    assert _checks.plain_dx_out(dx_quick, dy, x) if with_out else True
    dx1, dg1, db1 = fastbn.batch_norm_backward(dy, cache1, out=dx_quick)
    dx2, dg2, db2 = fastbn.batch_norm_backward(
        _view_of_copy(dy)[:, ::-1][:, ::-1], cache2, out=dx_checked
    )
    if with_out:
        assert dx1 is dx_quick and dx2 is dx_checked
    np.testing.assert_array_equal(dx1, dx2)
    np.testing.assert_array_equal(dg1, dg2)
    np.testing.assert_array_equal(db1, db2)
    assert dx1.dtype == dtype and dg1.dtype == dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("with_out", [False, True])
def test_an_x_that_is_a_view_takes_the_quick_path_with_the_same_bits(dtype, training, with_out):
    """A slice of a larger batch and a reshaped array (views whose base owns the memory):
    the quick forward and backward, with the bits of the same values in arrays of their
    own (the checked path, forced by parameters that are views)."""
    rng = np.random.default_rng(13)
    data = (rng.standard_normal((3, 40, 9)) * 3 + 1).astype(dtype)
    dy_data = rng.standard_normal((2, 40, 9)).astype(dtype)
    _, _, params = _arrays((40, 9), dtype, seed=13)
    for x, dy in (
        (data[1], dy_data[1]),
        (data.reshape(120, 9)[40:80], dy_data.reshape(-1)[:360].reshape(40, 9)),
    ):
        assert x.base is not None and dy.base is not None
        quick_params = [p.copy() for p in params]
        checked_params = [_view_of_copy(p) for p in params]
        args = (x, *quick_params[:2], training, *quick_params[2:], 0.25, 1e-4, 1, 1, None)
        assert _checks.quick_view(*args) is not None
        out = np.full(x.shape, 7, dtype) if with_out else None
        y1, cache1 = _forward(x, quick_params, training, out, None)
        y2, cache2 = _forward(x.copy(), checked_params, training, None, None)
        np.testing.assert_array_equal(y1, y2)
        for a, b in zip(quick_params, checked_params):
            np.testing.assert_array_equal(a, b)
        dx_out = np.full(x.shape, 5, dtype) if with_out else None
        if with_out:
            assert _checks.plain_dx_out(dx_out, dy, x)
        assert functional._backward_quick(dy, cache1, dx_out) is not None
        for got, want in zip(
            fastbn.batch_norm_backward(dy, cache1, out=dx_out),
            fastbn.batch_norm_backward(dy.copy(), cache2),
        ):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("written", ["running_mean", "running_var", "out"])
def test_an_x_inside_an_array_written_is_refused_by_the_quick_check(written):
    """``x`` a view of the memory of a running statistic or of ``out`` (each owning its
    memory, as the quick check wants): the quick check refuses it, its owner being that
    array, and the checked path raises, changing nothing."""
    rng = np.random.default_rng(14)
    C = 6
    rm, rv, out = rng.standard_normal(C), rng.uniform(1, 2, C), None
    if written == "out":
        holder = out = rng.standard_normal((1, C))
    else:
        holder = rm if written == "running_mean" else rv
    x = holder.reshape(1, C)  # one value per channel: allowed with running_var_ddof=0
    assert x.base is holder
    before = holder.copy()
    args = (x, None, None, True, rm, rv, 0.1, 1e-5, 1, 0, out)
    assert _checks.quick_view(*args) is None
    with pytest.raises(ValueError, match="overlaps"):
        fastbn.batch_norm(x, running_mean=rm, running_var=rv, out=out, running_var_ddof=0)
    np.testing.assert_array_equal(holder, before)


@pytest.mark.parametrize("training", [True, False])
def test_numpy_float64_eps_and_momentum_take_the_quick_path_with_the_same_bits(training):
    """``eps`` and ``momentum`` as ``np.float64`` (arithmetic on NumPy values gives them):
    the quick path, with the bits of Python floats and of the checked path."""
    x, dy, params = _arrays((30, 7), np.float32, seed=15)
    results = []
    for kind in ("quick float", "quick np.float64", "checked"):
        number = np.float64 if kind == "quick np.float64" else float
        p = [_view_of_copy(a) for a in params] if kind == "checked" else [a.copy() for a in params]
        eps, momentum = number(1e-3), number(0.3)
        args = (x, p[0], p[1], training, p[2], p[3], momentum, eps, 1, 1, None)
        assert (_checks.quick_view(*args) is None) == (kind == "checked")
        y, cache = fastbn.batch_norm(
            x, p[0], p[1], training=training, running_mean=p[2], running_var=p[3],
            momentum=momentum, eps=eps,
        )  # fmt: skip
        results.append((y, p[2], p[3], *fastbn.batch_norm_backward(dy, cache)))
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            np.testing.assert_array_equal(got, want)


def _channels_last(a):
    """``a`` (NCHW) with NHWC memory, as a convolution written with im2col returns it."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_a_channels_last_x_takes_the_quick_path_with_the_same_bits(dtype, training, activation):
    """An NCHW array with NHWC memory and a ``dy`` of that layout: the quick forward and
    backward, with the bits of the checked path (parameters that are views) and of the
    C-contiguous NHWC array with ``axis=-1`` (the same memory); ``y`` and ``dx`` keep the
    layout. A C-contiguous ``dy`` goes through the checked path, with the same bits."""
    rng = np.random.default_rng(16)
    shape = (6, 5, 4, 3)
    x = _channels_last((rng.standard_normal(shape) * 2 + 1).astype(dtype))
    dy = _channels_last(rng.standard_normal(shape).astype(dtype))
    assert not x.flags.c_contiguous and x.base is not None
    _, _, params = _arrays(shape, dtype, seed=16)
    quick_params = [p.copy() for p in params]
    args = (x, *quick_params[:2], training, *quick_params[2:], 0.25, 1e-4, 1, 1, None)
    view = _checks.quick_view(*args)
    assert view is not None and view.channels_last
    y1, cache1 = _forward(x, quick_params, training, None, activation)
    checked_params = [_view_of_copy(p) for p in params]
    y2, cache2 = _forward(x, checked_params, training, None, activation)
    nhwc_params = [p.copy() for p in params]
    gamma, beta, rm, rv = nhwc_params
    y3, cache3 = fastbn.batch_norm(
        np.ascontiguousarray(x.transpose(0, 2, 3, 1)), gamma, beta, training=training,
        running_mean=rm, running_var=rv, momentum=0.25, eps=1e-4, axis=-1,
        activation=activation,
    )  # fmt: skip
    assert y1.strides == x.strides
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(y1.transpose(0, 2, 3, 1), y3)
    for a, b, c in zip(quick_params, checked_params, nhwc_params):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert functional._backward_quick(dy, cache1, None) is not None
    assert functional._backward_quick(np.ascontiguousarray(dy), cache1, None) is None
    dx1, dg1, db1 = fastbn.batch_norm_backward(dy, cache1)
    assert dx1.strides == x.strides
    for got in (
        fastbn.batch_norm_backward(dy, cache2),
        fastbn.batch_norm_backward(np.ascontiguousarray(dy), cache1),
    ):
        for a, b in zip(got, (dx1, dg1, db1)):
            np.testing.assert_array_equal(a, b)
    dx3, dg3, db3 = fastbn.batch_norm_backward(
        np.ascontiguousarray(dy.transpose(0, 2, 3, 1)), cache3
    )
    np.testing.assert_array_equal(dx1.transpose(0, 2, 3, 1), dx3)
    np.testing.assert_array_equal(dg1, dg3)
    np.testing.assert_array_equal(db1, db3)


def test_other_layouts_and_a_channels_last_out_take_the_checked_path():
    """Only C-contiguous and exactly channels-last inputs are quick: another permutation
    of the axes, a channels-last ``x`` with ``out=`` (whose layout the checked path
    handles) and a strided channels-last view give the checked path's answers."""
    rng = np.random.default_rng(17)
    base = rng.standard_normal((6, 5, 4, 3))
    permuted = np.ascontiguousarray(base.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
    strided = _channels_last(base)[:, :, ::2]
    x_cl = _channels_last(base)
    cases = [(permuted, None), (strided, None), (x_cl, np.empty(x_cl.shape))]
    for x, out in cases:
        rm, rv = np.zeros(x.shape[1]), np.ones(x.shape[1])
        assert _checks.quick_view(x, None, None, True, rm, rv, 0.1, 1e-5, 1, 1, out) is None
        y, _ = fastbn.batch_norm(x, running_mean=rm, running_var=rv, out=out)
        rm2, rv2 = np.zeros(x.shape[1]), np.ones(x.shape[1])
        y_ref, _ = fastbn.batch_norm(np.ascontiguousarray(x), running_mean=rm2, running_var=rv2)
        np.testing.assert_allclose(y, y_ref, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(rv, rv2, rtol=1e-13)


def test_quick_forward_matches_the_reference():
    """An oracle independent of both paths: the naive NumPy reference."""
    x, dy, params = _arrays((100, 100), np.float64, seed=3)
    ref_params = [p.copy() for p in params]
    y, cache = _forward(x, params, True, None, None)
    gamma, beta, rm, rv = ref_params
    y_ref, cache_ref = fastbn.reference.batch_norm(
        x, gamma, beta, training=True, running_mean=rm, running_var=rv, momentum=0.25, eps=1e-4
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(params[2], rm, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(params[3], rv, rtol=1e-12)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, cache)
    dx_ref, dgamma_ref, dbeta_ref = fastbn.reference.batch_norm_backward(dy, cache_ref)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-10, atol=1e-12)


def test_quick_eval_raises_the_checked_paths_error_for_a_negative_running_var():
    x, _, (gamma, beta, rm, rv) = _arrays((8, 4), np.float64)
    rv[2] = -0.5
    messages = []
    for var in (rv, _view_of_copy(rv)):  # quick, then checked
        with pytest.raises(ValueError) as info:
            fastbn.batch_norm(x, gamma, beta, training=False, running_mean=rm, running_var=var)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert "running_var must be >= 0" in messages[0]


@pytest.mark.parametrize(
    "make_out",
    [
        lambda x: x,  # out is x
        lambda x: x.reshape(-1).reshape(x.shape),  # a view of x
        lambda x: np.empty(x.shape, np.float64),  # another dtype
        lambda x: np.empty(x.shape[::-1], x.dtype).T,  # not C-contiguous
        lambda x: np.empty((x.shape[0] + 1,) + x.shape[1:], x.dtype),  # another shape
    ],
)
def test_an_out_the_quick_check_refuses_goes_through_the_checked_path(make_out):
    x, _, (gamma, beta, rm, rv) = _arrays((16, 8), np.float32)
    out = make_out(x)
    assert not _checks.plain_out(out, x)
    rm_before, rv_before = rm.copy(), rv.copy()
    try:
        y, _ = fastbn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, out=out)
    except (TypeError, ValueError) as error:  # what the checked path says of it
        assert "out" in str(error)
        np.testing.assert_array_equal(rm, rm_before)  # a failed call changed nothing
        np.testing.assert_array_equal(rv, rv_before)
        return
    y_plain, _ = fastbn.batch_norm(x, gamma, beta, running_mean=rm_before, running_var=rv_before)
    np.testing.assert_array_equal(y, y_plain)


@pytest.mark.parametrize("training", [True, False])
def test_an_x_inside_out_goes_through_the_checked_path(training):
    """``x`` a view of ``out``'s memory: ``out`` owns its buffer and is not ``x``, but
    they overlap; the quick check refuses ``x`` (not its own memory) and the checked
    path raises, changing nothing."""
    out = np.random.default_rng(1).standard_normal((12, 5))
    x = out[:]
    before = out.copy()
    rm, rv = np.zeros(5), np.ones(5)
    args = (x, None, None, training, rm, rv, 0.1, 1e-5, 1, 1, out)
    assert _checks.quick_view(*args) is None
    with pytest.raises(ValueError, match="out overlaps x"):
        fastbn.batch_norm(x, training=training, running_mean=rm, running_var=rv, out=out)
    np.testing.assert_array_equal(out, before)
    np.testing.assert_array_equal(rm, 0.0)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_backward_into_dy_itself_takes_the_quick_path(training, activation):
    """``out=dy`` (allowed: the update is elementwise) gives the bits of an allocating
    call, through the quick path."""
    x, dy, params = _arrays((40, 24), np.float32, seed=2)
    y, cache = _forward(x, params, training, None, activation)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, cache)
    assert _checks.plain_dx_out(dy, dy, x)
    dx_in_place, dgamma2, dbeta2 = fastbn.batch_norm_backward(dy, cache, out=dy)
    assert dx_in_place is dy
    np.testing.assert_array_equal(dy, dx)
    np.testing.assert_array_equal(dgamma2, dgamma)
    np.testing.assert_array_equal(dbeta2, dbeta)


def _dx_outs():
    """``(name, make(x, dy) -> (dy, out))``: backward outputs the quick check refuses."""
    return [
        ("x", lambda x, dy: (dy, x)),
        ("a view of dy", lambda x, dy: (dy, dy.reshape(-1).reshape(dy.shape))),
        ("dy a view of out", lambda x, dy: _dy_inside(dy)),
        ("out overlapping dy", lambda x, dy: _shifted(dy)),
        ("another dtype", lambda x, dy: (dy, np.empty(dy.shape, np.float64))),
        ("not C-contiguous", lambda x, dy: (dy, np.empty(dy.shape[::-1], dy.dtype).T)),
        ("read-only", lambda x, dy: (dy, _read_only(np.empty_like(dy)))),
        ("a view of another buffer", lambda x, dy: (dy, _view_of_copy(np.empty_like(dy)))),
    ]


def _dy_inside(dy):
    out = dy.copy()
    return out[:], out


def _shifted(dy):
    big = np.concatenate([dy, dy[:1]])
    return big[:-1], big[1:]


def _read_only(a):
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("name, make", _dx_outs(), ids=[n for n, _ in _dx_outs()])
def test_a_dx_out_the_quick_check_refuses_goes_through_the_checked_path(name, make):
    """Each such ``out`` gets the checked path's answer: its error (nothing written to
    ``out``), or the allocating call's bits when it is a legal ``out`` (another buffer's
    view, a transposed array, or ``dy``'s memory exactly)."""
    legal = ("a view of another buffer", "a view of dy", "dy a view of out", "not C-contiguous")
    x, dy, params = _arrays((16, 8), np.float32, seed=4)
    _, cache = _forward(x, params, True, None, None)
    dx_ref, dgamma_ref, _ = fastbn.batch_norm_backward(dy.copy(), cache)
    dy, out = make(x, dy)
    assert not _checks.plain_dx_out(out, dy, x)
    before = out.copy()
    try:
        dx, dgamma, _ = fastbn.batch_norm_backward(dy, cache, out=out)
    except (TypeError, ValueError) as error:
        assert "out" in str(error)
        assert name not in legal
        np.testing.assert_array_equal(out, before)
        return
    assert name in legal
    assert dx is out
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_array_equal(dgamma, dgamma_ref)


def test_an_x_inside_dx_out_goes_through_the_checked_path():
    """The forward ``x`` a view of the backward's ``out``: refused by the quick check
    (``x`` does not own its memory); the checked path raises and writes nothing."""
    out = np.random.default_rng(6).standard_normal((12, 5))
    x = out[:]
    dy = np.ones_like(out)
    _, cache = fastbn.batch_norm(x)
    assert not _checks.plain_dx_out(out, dy, x)
    before = out.copy()
    with pytest.raises(ValueError, match="out overlaps x"):
        fastbn.batch_norm_backward(dy, cache, out=out)
    np.testing.assert_array_equal(out, before)


def _unpickled(*arrays):
    """Copies through pickle: their dtype objects equal NumPy's without being them."""
    copies = pickle.loads(pickle.dumps(arrays))
    assert all(c.dtype == a.dtype and c.dtype is not a.dtype for c, a in zip(copies, arrays))
    return copies


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unpickled_parameters_are_read_as_they_are_with_the_same_bits(dtype):
    """gamma, beta and running statistics loaded from a pickle (a saved model, the
    textbooks' ``load_params``): the kernels read them as they are, not through a
    float64 copy (which compiled the kernels for float64 parameters again, 1.9 s, and
    made every call slower), with the bits of the same values in ordinary arrays."""
    x, dy, (gamma, beta, rm, rv) = _arrays((30, 12), dtype, seed=4)
    loaded = _unpickled(gamma, beta, rm, rv)
    plan = fastbn._plan.plan_for(30, 12, 1, np.dtype(dtype).itemsize)
    kernel_gamma, kernel_beta = fastbn._launch.params(plan, loaded[0], loaded[1])
    assert kernel_gamma is loaded[0] and kernel_beta is loaded[1]
    for training in (True, False):
        y, cache = fastbn.batch_norm(
            x, gamma, beta, training=training, running_mean=rm, running_var=rv
        )
        y2, cache2 = fastbn.batch_norm(
            x, loaded[0], loaded[1], training=training, running_mean=loaded[2],
            running_var=loaded[3],
        )  # fmt: skip
        np.testing.assert_array_equal(y2, y)
        np.testing.assert_array_equal(loaded[2], rm)
        np.testing.assert_array_equal(loaded[3], rv)
        for got, want in zip(
            fastbn.batch_norm_backward(dy, cache2), fastbn.batch_norm_backward(dy, cache)
        ):
            np.testing.assert_array_equal(got, want)
            assert got.dtype == np.dtype(dtype)


def test_a_first_call_on_an_unpickled_x_keeps_numpys_dtype_in_the_shapes_view(monkeypatch):
    """The View cached for a shape and dtype holds NumPy's dtype object even when an
    unpickled x created it, so the next backward of that shape with an ordinary dy still
    takes the quick path (it compares dtypes by identity)."""
    shape = (17, 13)  # a shape no other test uses: its View is made here
    x, dy, params = _arrays(shape, np.float32, seed=5)
    (x_loaded,) = _unpickled(x)
    y, cache = fastbn.batch_norm(x_loaded, *params[:2])
    assert cache.view.dtype is np.dtype(np.float32)
    quick = []
    original = functional._backward_quick

    def spy(*args):
        result = original(*args)
        quick.append(result is not None)
        return result

    monkeypatch.setattr(functional, "_backward_quick", spy)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, cache)
    assert quick == [True]
    want = fastbn.batch_norm_backward(dy, fastbn.batch_norm(x, *params[:2])[1])
    np.testing.assert_array_equal(dx, want[0])
