"""Recycled memory of large new outputs (``fastbn._memory``): reused only once every
view of the previous output is gone, never shared between live arrays, bounded,
and the results are those of fresh memory."""

import gc

import numpy as np
import pytest

import fastbn
from fastbn.reference import batch_norm as ref_batch_norm

from _cases import relayout

SHAPE = (1024, 512)  # 2 MiB of float32: above the 1 MiB threshold


@pytest.fixture(autouse=True)
def fresh_pool():
    old = fastbn.pool_limit()
    gc.collect()  # outputs of earlier tests go back to the pool now, then are released
    fastbn.set_pool_limit(0)
    fastbn.set_pool_limit(64 << 20)
    yield
    fastbn.set_pool_limit(0)
    fastbn.set_pool_limit(old)


def _x(seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(dtype)


def test_dropped_output_is_reused_and_fully_rewritten():
    y1, _ = fastbn.batch_norm(_x(0))
    address = y1.ctypes.data
    y1[...] = np.nan  # stale contents must not survive into the next output
    del y1
    gc.collect()
    assert fastbn.pool_held() == np.prod(SHAPE) * 4
    x2 = _x(1)
    y2, _ = fastbn.batch_norm(x2)
    assert y2.ctypes.data == address
    assert fastbn.pool_held() == 0
    C = SHAPE[1]
    expected, _ = ref_batch_norm(x2.astype(np.float64), np.ones(C), np.zeros(C))
    np.testing.assert_allclose(y2, expected, rtol=0, atol=2e-6)


def test_live_outputs_and_views_never_share_memory():
    x = _x()
    y1, cache = fastbn.batch_norm(x)
    dx1, _, _ = fastbn.batch_norm_backward(np.ones_like(x), cache)
    view = y1[::3]
    del y1
    gc.collect()
    assert fastbn.pool_held() == 0  # the view keeps y1's memory
    y2, _ = fastbn.batch_norm(x)
    dx2, _, _ = fastbn.batch_norm_backward(np.ones_like(x), cache)
    for a, b in [(view, y2), (view, dx1), (y2, dx1), (dx1, dx2), (y2, dx2)]:
        assert not np.shares_memory(a, b)
    del view
    gc.collect()
    assert fastbn.pool_held() == np.prod(SHAPE) * 4


def test_recycled_output_flags_and_layout():
    x = _x()
    y, _ = fastbn.batch_norm(x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.flags.c_contiguous
    assert y.flags.writeable and not y.flags.owndata
    # channels-last memory is kept for a channels-last input
    x4 = np.random.default_rng(2).standard_normal((8, 64, 32, 32)).astype(np.float32)
    x4 = relayout(x4, "channels_last")
    y4, _ = fastbn.batch_norm(x4)
    assert y4.strides == x4.strides


def test_limit_bounds_and_zero_disables():
    fastbn.set_pool_limit(3 << 20)  # room for one 2 MiB output, not two
    ys = [fastbn.batch_norm(_x(i))[0] for i in range(2)]
    del ys
    gc.collect()
    assert fastbn.pool_held() == 2 << 20
    fastbn.set_pool_limit(0)
    assert fastbn.pool_held() == 0
    y, _ = fastbn.batch_norm(_x())
    assert y.base is None  # plain np.empty when disabled
    del y
    gc.collect()
    assert fastbn.pool_held() == 0


def test_small_outputs_are_plain_arrays():
    y, _ = fastbn.batch_norm(np.ones((64, 256), np.float32) + np.arange(256, dtype=np.float32))
    assert y.base is None


@pytest.mark.parametrize("bad", [-1, 1.5, "1", True, None])
def test_set_pool_limit_rejects(bad):
    with pytest.raises(ValueError, match="nbytes"):
        fastbn.set_pool_limit(bad)


def test_recycled_output_feeds_the_next_layer():
    """A recycled output passed back in as x (its base is the lease) gives the same bits as
    a plain copy of it."""
    y, _ = fastbn.batch_norm(_x())
    z1, _ = fastbn.batch_norm(y)
    z2, _ = fastbn.batch_norm(np.array(y))
    np.testing.assert_array_equal(z1, z2)
