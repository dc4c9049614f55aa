"""``BatchNorm`` skips the checks on a call of a form (mode, shape) that an earlier call
validated (``BatchNorm._prepare`` / ``_repeats``, ``functional.call_again``).
These tests hold that path to ``fastbn.batch_norm`` through its checked path (arguments
that are views of larger buffers, which the quick checks refuse): the same bits over
many steps in both modes, and every change of the layer's state between calls honoured
as a fresh layer would honour it."""

import numpy as np
import pytest

import fastbn
from fastbn import functional


def _view_of_copy(a):
    """``a``'s values in an array that does not own its memory (the checked path)."""
    big = np.empty((2,) + a.shape, a.dtype)
    big[0] = a
    return big[0]


class Oracle:
    """A layer's arithmetic through ``fastbn.batch_norm``'s checked path."""

    def __init__(self, bn):
        self.bn = bn
        self.rm, self.rv = _view_of_copy(bn.running_mean), _view_of_copy(bn.running_var)
        self.count = 0

    def forward(self, x):
        bn = self.bn
        gamma = None if bn.gamma is None else _view_of_copy(bn.gamma)
        beta = None if bn.beta is None else _view_of_copy(bn.beta)
        momentum = bn.momentum
        if momentum is None:
            momentum = 1.0 / (self.count + 1)
        if bn.training:
            self.count += 1
        y, self.cache = fastbn.batch_norm(
            _view_of_copy(x), gamma, beta, training=bn.training, running_mean=self.rm,
            running_var=self.rv, momentum=momentum, eps=bn.eps, activation=bn.activation,
        )  # fmt: skip
        return y

    def backward(self, dy):
        return fastbn.batch_norm_backward(_view_of_copy(dy), self.cache)


def _assert_backward_and_state_match(bn, oracle, dy):
    """``bn.backward(dy)`` and the layer's state give the oracle's bits."""
    dx = bn.backward(dy)
    dx_ref, dgamma_ref, dbeta_ref = oracle.backward(dy)
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_array_equal(bn.dgamma, dgamma_ref)
    np.testing.assert_array_equal(bn.dbeta, dbeta_ref)
    np.testing.assert_array_equal(bn.running_mean, oracle.rm)
    np.testing.assert_array_equal(bn.running_var, oracle.rv)
    assert bn.num_batches_tracked == oracle.count


def _rng_arrays(rng, shape, dtype):
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    return x, rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("shape", [(32, 12), (8, 5, 3, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("momentum", [0.2, None])
def test_repeated_calls_in_both_modes_give_the_checked_paths_bits(
    shape, dtype, activation, momentum
):
    rng = np.random.default_rng(5)
    bn = fastbn.BatchNorm(shape[1], dtype=dtype, activation=activation, momentum=momentum)
    bn.gamma[...] = rng.uniform(0.5, 1.5, shape[1])
    bn.beta[...] = rng.standard_normal(shape[1])
    oracle = Oracle(bn)
    for step in range(6):
        bn.train(step % 3 != 2)  # two training steps, then an eval one
        x, dy = _rng_arrays(rng, shape, dtype)
        y = bn.forward(x)
        np.testing.assert_array_equal(y, oracle.forward(x))
        if bn.training:  # the quick path was taken from the second call of a form on
            assert bn._repeats(x)
        _assert_backward_and_state_match(bn, oracle, dy)
        bn.gamma -= 0.01 * bn.dgamma  # an optimizer's in-place update between steps
        bn.beta -= 0.01 * bn.dbeta
    x, _ = _rng_arrays(rng, shape, dtype)
    bn.eval()
    bn.forward(x)
    assert bn._repeats(x)  # eval calls of one form take the quick path too
    np.testing.assert_array_equal(bn.forward(x), oracle.forward(x))


def _changes():
    """State changes between two calls of one form, as ``(name, change)``."""

    def replace_gamma(bn):
        bn.gamma = bn.gamma * 2.0

    def replace_running_var(bn):
        bn.running_var = bn.running_var + 1.0

    def eps(bn):
        bn.eps = 0.5

    def momentum(bn):
        bn.momentum = 0.9

    def momentum_int(bn):
        bn.momentum = 1

    def no_running_stats(bn):
        bn.track_running_stats = False

    def in_place_running(bn):
        bn.running_mean += 3.0
        bn.running_var *= 4.0

    return [
        ("replace_gamma", replace_gamma),
        ("replace_running_var", replace_running_var),
        ("eps", eps),
        ("momentum", momentum),
        ("momentum_int", momentum_int),
        ("no_running_stats", no_running_stats),
        ("in_place_running", in_place_running),
    ]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name, change", _changes())
def test_a_state_change_between_calls_is_honoured(training, name, change):
    rng = np.random.default_rng(11)
    x1, _ = _rng_arrays(rng, (24, 6), np.float64)
    x2, _ = _rng_arrays(rng, (24, 6), np.float64)
    bn = fastbn.BatchNorm(6, dtype=np.float64).train(training)
    bn.forward(x1)
    bn.forward(x1)  # prepared: the next call of this form takes the quick path
    change(bn)
    fresh = fastbn.BatchNorm(6, dtype=np.float64).train(training)  # never prepared
    for name in ("gamma", "beta", "running_mean", "running_var"):
        getattr(fresh, name)[...] = getattr(bn, name)
    fresh.eps, fresh.momentum = bn.eps, bn.momentum
    fresh.track_running_stats = bn.track_running_stats
    fresh.num_batches_tracked = bn.num_batches_tracked
    before = (bn.running_mean.copy(), bn.running_var.copy())
    y = bn.forward(x2)
    y_fresh = fresh.forward(x2)
    np.testing.assert_array_equal(y, y_fresh)
    np.testing.assert_array_equal(bn.running_mean, fresh.running_mean)
    np.testing.assert_array_equal(bn.running_var, fresh.running_var)
    if not training or not bn.track_running_stats:
        np.testing.assert_array_equal(bn.running_mean, before[0])


def test_prepared_eval_then_training_on_a_single_sample_raises():
    """An eval call of one sample per channel prepares its form; training on that form
    must still raise (more than one value per channel), changing nothing."""
    bn = fastbn.BatchNorm(4, dtype=np.float64).eval()
    x = np.arange(4.0).reshape(1, 4)
    bn.forward(x)
    bn.forward(x)
    bn.train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn.forward(x)
    np.testing.assert_array_equal(bn.running_mean, 0.0)
    assert bn.num_batches_tracked == 0


def test_prepared_eval_raises_for_a_negative_running_var_and_changes_nothing():
    rng = np.random.default_rng(2)
    x, _ = _rng_arrays(rng, (16, 5), np.float32)
    bn = fastbn.BatchNorm(5).eval()
    bn.forward(x)
    cache = bn._cache
    assert bn._repeats(x)
    bn.running_var[3] = -1.0
    with pytest.raises(ValueError) as quick:
        bn.forward(x)
    with pytest.raises(ValueError) as checked:
        fastbn.batch_norm(
            x, bn.gamma, bn.beta, training=False, running_mean=bn.running_mean,
            running_var=_view_of_copy(bn.running_var),
        )  # fmt: skip
    assert str(quick.value) == str(checked.value)
    assert "running_var must be >= 0" in str(quick.value)
    assert bn._cache is cache  # the failed call left the layer as it was


def test_read_only_running_stats_in_training_take_the_checked_path():
    rng = np.random.default_rng(4)
    x, _ = _rng_arrays(rng, (16, 5), np.float64)
    bn = fastbn.BatchNorm(5, dtype=np.float64)
    bn.forward(x)
    bn.running_var.flags.writeable = False
    assert not bn._repeats(x)
    with pytest.raises(ValueError):
        bn.forward(x)
    assert bn.num_batches_tracked == 1


def _spy_on_call_again(monkeypatch, index):
    """The list of argument ``index`` of each ``call_again`` the layer makes from now on."""
    seen = []
    original = functional.call_again

    def spy(*args):
        seen.append(args[index])
        return original(*args)

    monkeypatch.setattr(fastbn.layer, "call_again", spy)
    return seen


def test_the_quick_layer_path_is_what_the_layer_runs(monkeypatch):
    """Guard for the tests above: the second call of a form goes through
    ``functional.call_again`` (training, then eval), not through ``batch_norm``."""
    calls = _spy_on_call_again(monkeypatch, 9)  # training
    x = np.random.default_rng(0).standard_normal((10, 3))
    bn = fastbn.BatchNorm(3, dtype=np.float64)
    bn.forward(x)
    bn.forward(x)
    bn.eval()
    bn.forward(x)
    bn.forward(x)
    assert calls == [True, False]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_repeated_calls_with_out_give_the_checked_paths_bits(monkeypatch, dtype, activation):
    """``forward(x, out=y)`` and ``backward(dy, out=dx)`` on preallocated arrays: the
    quick layer path (``call_again`` is given ``out``) writes them with the bits of the
    checked path, over training and eval steps."""
    outs = _spy_on_call_again(monkeypatch, 10)  # out
    rng = np.random.default_rng(7)
    shape = (24, 6, 2, 3)
    bn = fastbn.BatchNorm(shape[1], dtype=dtype, activation=activation)
    oracle = Oracle(bn)
    y_out, dx_out = np.empty(shape, dtype), np.empty(shape, dtype)
    for step in range(6):
        bn.train(step not in (2, 3))
        x, dy = _rng_arrays(rng, shape, dtype)
        assert bn.forward(x, out=y_out) is y_out
        np.testing.assert_array_equal(y_out, oracle.forward(x))
        assert bn.backward(dy, out=dx_out) is dx_out
        dx_ref, dgamma_ref, dbeta_ref = oracle.backward(dy)
        np.testing.assert_array_equal(dx_out, dx_ref)
        np.testing.assert_array_equal(bn.dgamma, dgamma_ref)
        np.testing.assert_array_equal(bn.running_var, oracle.rv)
    # steps 1, 3, 4 and 5 repeat a form seen before (4: training after two eval steps)
    assert len(outs) == 4 and all(o is y_out for o in outs)


@pytest.mark.parametrize("make_out", [lambda x: x, lambda x: x.reshape(x.shape)])
def test_a_layer_out_overlapping_x_raises_after_a_prepared_call(make_out):
    """``out`` that is ``x`` or a view of it: the quick layer path refuses it and the
    checked path raises, changing nothing."""
    rng = np.random.default_rng(8)
    x, _ = _rng_arrays(rng, (16, 5), np.float64)
    bn = fastbn.BatchNorm(5, dtype=np.float64)
    bn.forward(x)
    out = make_out(x)
    assert bn._repeats(x) and not bn._repeats(x, out)
    before, mean_before = x.copy(), bn.running_mean.copy()
    with pytest.raises(ValueError, match="out overlaps x"):
        bn.forward(x, out=out)
    np.testing.assert_array_equal(x, before)
    np.testing.assert_array_equal(bn.running_mean, mean_before)
    assert bn.num_batches_tracked == 1


def test_running_stats_that_are_views_keep_the_quick_path_only_for_other_memory():
    """Running statistics that are views of a larger buffer: an ``out`` of its own memory
    cannot overlap them and takes the quick layer path; the buffer itself as ``out``, or
    as ``x``, holds them and is refused (the checked path raises, changing nothing). The
    results are those of a layer with arrays of its own."""
    rng = np.random.default_rng(9)
    x, _ = _rng_arrays(rng, (16, 5), np.float32)
    bn, plain = fastbn.BatchNorm(5), fastbn.BatchNorm(5)
    buffer = np.zeros((16, 5), np.float32)
    buffer[1] = 1.0
    bn.running_mean, bn.running_var = buffer[0], buffer[1]
    out = np.empty_like(x)
    for _ in range(2):
        bn.forward(x, out=out)
        assert bn._repeats(x) and bn._repeats(x, out)
        np.testing.assert_array_equal(out, plain.forward(x))
    np.testing.assert_array_equal(bn.running_var, plain.running_var)
    assert not bn._repeats(x, buffer) and not bn._repeats(buffer)
    before = buffer.copy()
    with pytest.raises(ValueError, match="overlaps"):
        bn.forward(x, out=buffer)
    with pytest.raises(ValueError, match="overlaps"):
        bn.forward(buffer)
    np.testing.assert_array_equal(buffer, before)
    assert bn.num_batches_tracked == 2


@pytest.mark.parametrize("training", [True, False])
def test_a_view_of_a_batch_takes_the_quick_layer_path_with_the_same_bits(training):
    """``x`` a slice of a larger array or a reshaped one (a view of memory that its base
    owns) repeats the prepared form: the layer's quick path, with the bits of the same
    values in an array of their own, for the forward, the running statistics and the
    backward."""
    rng = np.random.default_rng(12)
    data = rng.standard_normal((64, 6)).astype(np.float32) * 2 + 3
    dy = rng.standard_normal((16, 6)).astype(np.float32)
    bn, own = fastbn.BatchNorm(6), fastbn.BatchNorm(6)
    for layer in (bn, own):
        layer.train(training)
        layer.forward(data[:16].copy())  # prepares the form
    for start in (16, 32):
        x_view = data[start : start + 16]
        x_reshaped = data.reshape(-1)[start * 6 : (start + 16) * 6].reshape(16, 6)
        for x in (x_view, x_reshaped):
            assert x.base is not None and bn._repeats(x) is not None
            y = bn.forward(x)
            y_own = own.forward(x.copy())
            np.testing.assert_array_equal(y, y_own)
            np.testing.assert_array_equal(bn.running_mean, own.running_mean)
            np.testing.assert_array_equal(bn.running_var, own.running_var)
            np.testing.assert_array_equal(bn.backward(dy), own.backward(dy))
            np.testing.assert_array_equal(bn.dgamma, own.dgamma)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_a_channels_last_batch_takes_the_quick_layer_path_with_the_same_bits(training, activation):
    """NCHW batches with NHWC memory (a convolution's output written with im2col), and a
    ``dy`` of that layout: after the first call the layer's quick path, with the bits of
    a layer over ``axis=-1`` fed the same memory as C-contiguous NHWC arrays (the same
    sums in the same order)."""
    rng = np.random.default_rng(18)
    bn = fastbn.BatchNorm(5, activation=activation)
    nhwc_layer = fastbn.BatchNorm(5, axis=-1, activation=activation)
    for layer in (bn, nhwc_layer):
        layer.train(training)
    for step in range(3):
        nhwc = (rng.standard_normal((8, 3, 4, 5)) * 2 + 1).astype(np.float32)
        dy_nhwc = rng.standard_normal((8, 3, 4, 5)).astype(np.float32)
        x, dy = nhwc.transpose(0, 3, 1, 2), dy_nhwc.transpose(0, 3, 1, 2)
        if step:
            assert bn._repeats(x) is not None
        y = bn.forward(x)
        assert y.strides == x.strides
        np.testing.assert_array_equal(y.transpose(0, 2, 3, 1), nhwc_layer.forward(nhwc))
        np.testing.assert_array_equal(bn.running_var, nhwc_layer.running_var)
        dx = bn.backward(dy)
        assert dx.strides == x.strides
        np.testing.assert_array_equal(dx.transpose(0, 2, 3, 1), nhwc_layer.backward(dy_nhwc))
        np.testing.assert_array_equal(bn.dgamma, nhwc_layer.dgamma)
        np.testing.assert_array_equal(bn.dbeta, nhwc_layer.dbeta)
    assert not bn._repeats(x, np.empty(x.shape, np.float32))  # out=: the checked path


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_repeated_training_calls_refill_one_cache_with_the_checked_paths_bits(dtype, activation):
    """From the third training call of a form on, the layer refills its last cache (the
    statistics in place, gamma's and beta's snapshots, x): the same object, and the bits of
    the checked path, with gamma and beta changed in place between forward and backward
    (backward uses the forward's snapshot, as a fresh cache would)."""
    rng = np.random.default_rng(11)
    shape = (40, 7)
    bn = fastbn.BatchNorm(shape[1], dtype=dtype, activation=activation)
    oracle = Oracle(bn)
    caches = []
    for _ in range(5):
        x, dy = _rng_arrays(rng, shape, dtype)
        np.testing.assert_array_equal(bn.forward(x), oracle.forward(x))
        caches.append(bn._cache)
        bn.gamma *= 1.5  # before backward: the snapshot of the forward's gamma counts
        bn.beta += 0.25
        _assert_backward_and_state_match(bn, oracle, dy)
    assert caches[0] is not caches[1]  # checked path, then the quick path's first cache
    assert caches[1] is caches[2] is caches[3] is caches[4]  # refilled from then on


def test_a_training_call_interrupted_while_refilling_drops_the_cache(monkeypatch):
    """An exception inside a refilling call (an interrupt, memory) may leave the cache half
    rewritten: the layer drops it, so a backward raises instead of using it."""
    rng = np.random.default_rng(12)
    x, dy = _rng_arrays(rng, (16, 5), np.float64)
    bn = fastbn.BatchNorm(5, dtype=np.float64)
    for _ in range(3):
        bn.forward(x)
    assert bn._cache is bn._own_cache

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastbn.functional._launch, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bn.forward(x)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="before forward"):
        bn.backward(dy)
    np.testing.assert_array_equal(bn.forward(x), fastbn.BatchNorm(5, dtype=np.float64).forward(x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_a_loop_alternating_forms_keeps_each_quick_with_the_checked_paths_bits(
    monkeypatch, dtype, activation
):
    """Training batches of two sizes (a last partial batch) between evaluation passes over
    two other sizes: after each form's first call every call takes the quick path (a spy
    counts them), a training call refills only a cache of its own shape, and every result
    and the state are the checked path's bits. A fifth form makes the layer forget the
    others (``_MAX_FORMS``) and relearn them, with the same results."""
    assert fastbn.layer._MAX_FORMS == 4
    quick = _spy_on_call_again(monkeypatch, 9)  # training flag of each quick call
    rng = np.random.default_rng(21)
    C = 6
    bn = fastbn.BatchNorm(C, dtype=dtype, activation=activation)
    oracle = Oracle(bn)
    forms = [(True, 32), (True, 32), (True, 32), (True, 7), (False, 100), (False, 33)]
    for _epoch in range(3):
        for training, rows in forms:
            bn.train(training)
            x, dy = _rng_arrays(rng, (rows, C), dtype)
            np.testing.assert_array_equal(bn.forward(x), oracle.forward(x))
            if training:
                _assert_backward_and_state_match(bn, oracle, dy)
                assert bn._cache.view.shape == (rows, C)
    # epoch 0: the 2nd and 3rd (32-row) calls; epochs 1 and 2: all six calls
    assert len(quick) == 2 + 6 + 6
    bn.train()
    x, dy = _rng_arrays(rng, (5, C), dtype)  # a fifth form: the four are forgotten
    np.testing.assert_array_equal(bn.forward(x), oracle.forward(x))
    _assert_backward_and_state_match(bn, oracle, dy)
    assert list(bn._prepared) == [(True, (5, C))]
    x, dy = _rng_arrays(rng, (32, C), dtype)
    np.testing.assert_array_equal(bn.forward(x), oracle.forward(x))  # checked again
    _assert_backward_and_state_match(bn, oracle, dy)
    assert len(quick) == 14


@pytest.mark.parametrize("activation", [None, "relu"])
def test_eval_calls_refill_the_cache_too_and_a_failed_one_keeps_it_whole(activation):
    """Training and eval calls of one shape share one refilled cache (backward after
    either gives the checked path's bits); an eval call that raises for a negative
    running_var leaves that cache as it was: backward still gives the last call's
    gradients."""
    rng = np.random.default_rng(23)
    shape = (20, 6)
    bn = fastbn.BatchNorm(shape[1], dtype=np.float64, activation=activation)
    oracle = Oracle(bn)
    caches = []
    for step in range(8):
        bn.train(step % 3 != 2)
        x, dy = _rng_arrays(rng, shape, np.float64)
        np.testing.assert_array_equal(bn.forward(x), oracle.forward(x))
        _assert_backward_and_state_match(bn, oracle, dy)
        caches.append(bn._cache)
    assert len({id(c) for c in caches[3:]}) == 1  # both modes' forms are quick by step 3
    bn.eval()
    dx_before = bn.backward(dy)
    saved = bn.running_var.copy()
    bn.running_var[2] = -0.5
    with pytest.raises(ValueError, match="running_var must be >= 0"):
        bn.forward(x)
    assert bn._cache is caches[-1]
    np.testing.assert_array_equal(bn.backward(dy), dx_before)
    bn.running_var[...] = saved
