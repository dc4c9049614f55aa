"""fastbn.moments / Moments / grad_sums, batch_norm(stats=), batch_norm_backward(sums=) and
BatchNorm.collect_stats, against exact formulas and the plain calls' bits."""

import numpy as np
import pytest

import fastbn
from fastbn import Moments

from _cases import LAYOUTS, random_case, rel_err


def np_moments(x, axis):
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    x64 = x.astype(np.float64)
    mean = np.mean(x64, axis=red)
    return x64.size // x.shape[axis], mean, np.var(x64, axis=red) * (x64.size // x.shape[axis])


def splits(n, k, rng):
    """k contiguous parts of n rows, uneven, with empty ones when k > 2."""
    cuts = np.sort(rng.integers(0, n + 1, k - 1))
    if k > 2:
        cuts[0] = cuts[1]  # an empty part
    return np.split(np.arange(n), cuts)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_moments_equal_numpy(dtype):
    rng = np.random.default_rng(0)
    for shape, axis in [((300, 7), 1), ((6, 5, 4, 3), 1), ((4, 3, 5, 6), -1), ((200000, 3), 1)]:
        x = (5.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
        m = fastbn.moments(x, axis)
        n, mean, m2 = np_moments(x, axis)
        assert m.count == n and m.mean.dtype == np.float64 and m.m2.shape == (shape[axis],)
        assert rel_err(m.mean, mean) < 1e-13  # np.mean itself errs ~1e-14 at 2e5
        assert rel_err(m.m2, m2) < 1e-12
        np.testing.assert_allclose(m.var(1), m2 / (n - 1), rtol=1e-12)


def test_merge_of_any_split_equals_the_whole():
    rng = np.random.default_rng(1)
    x = 1e3 + rng.standard_normal((5000, 9))
    whole = fastbn.moments(x)
    worst = 0.0
    for k in range(1, 9):
        parts = [fastbn.moments(x[idx]) for idx in splits(len(x), k, rng)]
        assert any(p.count == 0 for p in parts) == (k > 2)
        merged = Moments.merge(parts)
        assert merged.count == whole.count
        worst = max(worst, rel_err(merged.mean, whole.mean), rel_err(merged.m2, whole.m2))
        worst = max(worst, rel_err(merged.var(1), np.var(x, axis=0, ddof=1)))
    assert worst <= 1e-13, worst


def test_merge_is_deterministic_on_1_and_2_threads():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300000, 4)).astype(np.float32)
    idx = splits(len(x), 5, rng)

    def run():
        merged = Moments.merge(fastbn.moments(x[i]) for i in idx)
        return merged.to_array().tobytes()

    with fastbn.num_threads(1):
        one = run()
    with fastbn.num_threads(2):
        two, again = run(), run()
    assert one == two == again


def test_empty_parts_are_identities_and_all_empty_is_empty():
    x = np.arange(12.0).reshape(6, 2)
    m = fastbn.moments(x)
    empty = fastbn.moments(x[:0])
    assert empty.count == 0 and np.isnan(empty.mean).all() and (empty.m2 == 0).all()
    assert Moments.merge([empty, m, empty]) is m
    both = Moments.merge([empty, empty])
    assert both.count == 0 and np.isnan(both.var()).all()
    assert m.mean.tolist() == [5.0, 6.0] and m.var(1).tolist() == [14.0, 14.0]


def test_array_round_trip_and_validation():
    m = fastbn.moments(np.random.default_rng(3).standard_normal((10, 3)))
    buf = m.to_array()
    assert buf.shape == (7,) and buf.dtype == np.float64 and buf[0] == 10
    back = Moments.from_array(buf)
    assert back.count == 10 and np.array_equal(back.mean, m.mean) and np.array_equal(back.m2, m.m2)
    with pytest.raises(ValueError, match="odd length"):
        Moments.from_array(np.zeros(4))
    with pytest.raises(ValueError, match="non-negative integer"):
        Moments.from_array(np.array([2.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="non-negative integer"):
        Moments.from_array(np.array([-1.0, 0.0, 0.0]))
    with pytest.raises(TypeError, match="buf must be a numpy.ndarray"):
        Moments.from_array([1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="part 1 has 2 channels"):
        Moments.merge([m, Moments(2, np.zeros(2), np.zeros(2))])
    with pytest.raises(TypeError, match="part 0"):
        Moments.merge([buf])
    with pytest.raises(ValueError, match="at least one"):
        Moments.merge([])
    with pytest.raises(ValueError, match="ddof"):
        m.var(2)
    with pytest.raises(AttributeError):
        m.count = 3
    with pytest.raises(ValueError):
        m.mean[0] = 1.0  # read-only


@pytest.mark.parametrize("shape", [(50, 3), (50, 3, 7), (40000, 3)])
def test_nan_channel_stays_nan_and_others_exact(shape):
    """The other channels get the bits of the same input with a finite value in place of
    the NaN. (Not those of the input without the channel: with fewer channels the rows
    loop is another width, which LLVM may vectorize and reassociate differently: on Zen 4
    with Numba 0.63, channel 0's mean of (50, 3) and of (50, 2) differed in the last bit.)"""
    x = np.random.default_rng(4).standard_normal(shape)
    clean = x.copy()
    x[7, 1] = np.nan
    m = fastbn.moments(x)
    assert np.isnan(m.mean[1]) and np.isnan(m.m2[1])
    want = fastbn.moments(clean)
    assert np.array_equal(m.mean[[0, 2]], want.mean[[0, 2]])
    assert np.array_equal(m.m2[[0, 2]], want.m2[[0, 2]])


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_given_stats_and_sums_give_the_plain_bits(layout, dtype):
    x, dy, gamma, beta, axis = random_case(np.random.default_rng(5), layout, dtype)
    C = x.shape[axis]
    x_before = x.copy()
    rm1, rv1 = np.zeros(C, dtype), np.ones(C, dtype)
    rm2, rv2 = rm1.copy(), rv1.copy()
    kw = dict(axis=axis, momentum=0.3)
    y1, c1 = fastbn.batch_norm(x, gamma, beta, running_mean=rm1, running_var=rv1, **kw)
    m = fastbn.moments(x, axis)
    y2, c2 = fastbn.batch_norm(x, gamma, beta, running_mean=rm2, running_var=rv2, stats=m, **kw)
    assert np.array_equal(y1, y2) and np.array_equal(rm1, rm2) and np.array_equal(rv1, rv2)
    plain = fastbn.batch_norm_backward(dy, c1)
    sums = fastbn.grad_sums(dy, c1)
    for got in (fastbn.batch_norm_backward(dy, c2), fastbn.batch_norm_backward(dy, c1, sums=sums)):
        for a, b in zip(plain, got):
            assert np.array_equal(a, b)
    assert np.array_equal(x, x_before)


def test_grad_sums_equal_the_formula():
    rng = np.random.default_rng(6)
    x, dy = rng.standard_normal((40, 3, 5)), rng.standard_normal((40, 3, 5))
    _, cache = fastbn.batch_norm(x)
    sums = fastbn.grad_sums(dy, cache)
    mean = x.mean(axis=(0, 2))
    assert sums.shape == (2, 3) and sums.dtype == np.float64
    np.testing.assert_allclose(sums[0], dy.sum(axis=(0, 2)), rtol=1e-13)
    expected = (dy * (x - mean[None, :, None])).sum(axis=(0, 2))
    np.testing.assert_allclose(sums[1], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parts_with_merged_stats_and_summed_sums_equal_the_whole(dtype):
    """Three 'ranks' in one process, as SyncBatchNorm composes the pieces."""
    rng = np.random.default_rng(7)
    x = (2.0 + rng.standard_normal((41, 6, 3))).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    gamma, beta = np.linspace(0.5, 2, 6).astype(dtype), np.linspace(-1, 1, 6).astype(dtype)
    y_ref, cache = fastbn.batch_norm(x.astype(np.float64), gamma, beta)
    dx_ref, dg_ref, db_ref = fastbn.batch_norm_backward(dy.astype(np.float64), cache)
    idx = [np.arange(0, 20), np.arange(20, 20), np.arange(20, 41)]  # one part empty
    merged = Moments.merge(fastbn.moments(x[i]) for i in idx)
    outs = [fastbn.batch_norm(x[i], gamma, beta, stats=merged) for i in idx]
    total = sum(fastbn.grad_sums(dy[i], c) for i, (_, c) in zip(idx, outs))
    back = [fastbn.batch_norm_backward(dy[i], c, sums=total) for i, (_, c) in zip(idx, outs)]
    tol = 2e-6 if dtype == np.float32 else 1e-12
    assert rel_err(np.concatenate([y for y, _ in outs]), y_ref) < tol
    assert rel_err(np.concatenate([b[0] for b in back]), dx_ref) < tol
    assert rel_err(back[0][1], dg_ref) < tol and rel_err(back[0][2], db_ref) < tol


def test_stats_and_sums_errors():
    x = np.random.default_rng(8).standard_normal((10, 3))
    m = fastbn.moments(x)
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match="stats= is for training=True"):
        fastbn.batch_norm(x, training=False, running_mean=rm, running_var=rv, stats=m)
    with pytest.raises(ValueError, match="stats has 2 channels, x has 3"):
        fastbn.batch_norm(x, stats=Moments(5, np.zeros(2), np.ones(2)))
    with pytest.raises(TypeError, match="stats must be a fastbn.Moments"):
        fastbn.batch_norm(x, stats=m.to_array())
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fastbn.batch_norm(x, stats=fastbn.moments(x[:1]))
    _, cache = fastbn.batch_norm(x)
    with pytest.raises(ValueError, match=r"sums must have shape \(2, 3\)"):
        fastbn.batch_norm_backward(x, cache, sums=np.zeros((3, 2)))
    with pytest.raises(TypeError, match="sums must be a numpy.ndarray"):
        fastbn.batch_norm_backward(x, cache, sums=[[0.0] * 3] * 2)
    with pytest.raises(TypeError, match="cache must be"):
        fastbn.grad_sums(x, None)


def test_empty_local_batch_with_global_stats():
    x = np.random.default_rng(9).standard_normal((8, 3))
    m = fastbn.moments(x)
    rm, rv = np.zeros(3), np.ones(3)
    y, cache = fastbn.batch_norm(x[:0], stats=m, running_mean=rm, running_var=rv, momentum=1.0)
    assert y.shape == (0, 3)
    np.testing.assert_array_equal(rm, m.mean)
    np.testing.assert_allclose(rv, np.var(x, axis=0, ddof=1), rtol=1e-14)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(np.zeros((0, 3)), cache, sums=np.ones((2, 3)))
    assert dx.shape == (0, 3) and dgamma is None and dbeta is None


def test_collect_stats_gives_the_exact_statistics_of_all_batches():
    rng = np.random.default_rng(10)
    batches = [1e4 + 3.0 * rng.standard_normal((n, 4, 5)) for n in (3, 17, 1, 40)]
    bn = fastbn.BatchNorm(4, dtype=np.float64).eval()
    with bn.collect_stats():
        for xb in batches:
            y = bn.forward(xb)
            assert np.array_equal(y, fastbn.batch_norm(xb, bn.gamma, bn.beta)[0])
    every = np.concatenate(batches)
    assert rel_err(bn.running_mean, every.mean(axis=(0, 2))) < 1e-12
    assert rel_err(bn.running_var, every.var(axis=(0, 2), ddof=1)) < 1e-12
    assert bn.num_batches_tracked == 0 and not bn.training


def test_collect_stats_errors_leave_the_state_unchanged():
    bn = fastbn.BatchNorm(3, dtype=np.float64)
    x = np.random.default_rng(11).standard_normal((6, 3))
    with pytest.raises(KeyError), bn.collect_stats():
        bn.forward(x)
        raise KeyError("inside")
    assert (bn.running_mean == 0).all() and (bn.running_var == 1).all()
    with pytest.raises(ValueError, match="saw 0 value"), bn.collect_stats():
        pass
    with pytest.raises(RuntimeError, match="already active"), bn.collect_stats():
        with bn.collect_stats():
            pass
    with pytest.raises(ValueError, match="track_running_stats"):
        with fastbn.BatchNorm(3, track_running_stats=False).collect_stats():
            pass
    assert (bn.running_mean == 0).all() and (bn.running_var == 1).all()


def test_moments_pickle():
    import pickle

    m = fastbn.moments(np.random.default_rng(12).standard_normal((9, 2)))
    back = pickle.loads(pickle.dumps(m))
    assert back.count == 9 and np.array_equal(back.mean, m.mean) and np.array_equal(back.m2, m.m2)


def test_fastbn_distributed_imports_without_mpi4py(monkeypatch):
    """``import fastbn.distributed`` never needs mpi4py; making a layer says what to install."""
    import sys

    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as if it were not installed
    import fastbn.distributed as d

    with pytest.raises(ImportError, match=r"fastbn\[mpi\]"):
        d.SyncBatchNorm(4)


def test_parts_whose_variance_is_far_below_eps_merge_exactly():
    """m2 travels as it is (not 1/sqrt(var + eps), from which var would be recovered)."""
    rng = np.random.default_rng(13)
    x = 1.0 + 1e-7 * rng.standard_normal((300, 3))  # variance 1e-14, eps 1e-5
    merged = Moments.merge(fastbn.moments(x[i]) for i in splits(300, 4, rng))
    assert rel_err(merged.var(1), np.var(x, axis=0, ddof=1)) < 1e-9
    rv = np.ones(3)
    fastbn.batch_norm(x[:10], stats=merged, running_mean=np.zeros(3), running_var=rv, momentum=1.0)
    assert rel_err(rv, np.var(x, axis=0, ddof=1)) < 1e-9
