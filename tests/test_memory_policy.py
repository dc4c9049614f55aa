"""What the output pool keeps follows the loop (``fastbn._memory``, issue 11 item 4): sizes
no longer asked for are released, the bytes held stay within what the loop had live at
once, and a steady loop still gets its memory back every step."""

import gc

import numpy as np
import pytest

import fastbn
from fastbn import _memory


@pytest.fixture(autouse=True)
def fresh_pool():
    old = fastbn.pool_limit()
    gc.collect()
    fastbn.set_pool_limit(0)  # empties the pool and forgets the request history
    fastbn.set_pool_limit(1 << 30)  # the default limit: the policy, not the limit, bounds it
    yield
    fastbn.set_pool_limit(0)
    fastbn.set_pool_limit(old)


def _step(x, dy):
    """A forward + backward that drops its outputs, as a loop body does."""
    y, cache = fastbn.batch_norm(x)
    dx, _, _ = fastbn.batch_norm_backward(dy, cache)
    return y.ctypes.data, dx.ctypes.data


def test_forty_distinct_sizes_hold_at_most_three_outputs():
    """The issue's loop: 40 batches (4096 + k, 1024) float32. The old policy kept every
    size up to 1 GiB (1012 MB held for 32 MB of live data)."""
    base = np.random.default_rng(0).standard_normal((4096 + 40, 1024)).astype(np.float32)
    dy = np.ones_like(base)
    largest = 0
    for k in range(40):
        n = 4096 + k
        _step(base[:n], dy[:n])
        largest = max(largest, n * 1024 * 4)
        gc.collect()
        assert fastbn.pool_held() <= 3 * largest, (k, fastbn.pool_held())
    assert fastbn.pool_held() <= 3 * largest
    assert fastbn.pool_held() >= largest  # the last step's outputs are kept for a next one


def test_steady_loop_recycles_every_step():
    x = np.random.default_rng(1).standard_normal((1024, 512)).astype(np.float32)
    dy = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    start = _memory._state["fresh"]  # a running count of fresh allocations
    first = _step(x, dy)
    fresh = _memory._state["fresh"]
    assert fresh - start == 2  # y and dx of the first step only
    for _ in range(10):
        addresses = _step(x, dy)
        assert set(addresses) == set(first)  # the same memory, no new pages
    assert _memory._state["fresh"] == fresh
    assert fastbn.pool_held() == 2 * x.nbytes


def test_loop_over_several_layers_keeps_them_all():
    """A two-layer loop (sizes A and B, outputs alive until the step ends, as in a net)
    keeps both sizes: no fresh memory after the first step."""
    rng = np.random.default_rng(3)
    xa = rng.standard_normal((2048, 256)).astype(np.float32)  # 2 MiB
    xb = rng.standard_normal((16, 64, 32, 32)).astype(np.float32)  # 4 MiB
    start = _memory._state["fresh"]
    for step in range(6):
        ya, ca = fastbn.batch_norm(xa)
        yb, cb = fastbn.batch_norm(xb)
        dxb, _, _ = fastbn.batch_norm_backward(yb, cb)
        dxa, _, _ = fastbn.batch_norm_backward(ya, ca)
        del ya, yb, dxa, dxb, ca, cb
        gc.collect()
        if step == 0:
            fresh = _memory._state["fresh"]
    assert fresh - start == 4
    assert _memory._state["fresh"] == fresh
    assert fastbn.pool_held() == 2 * (xa.nbytes + xb.nbytes)


def test_a_size_no_longer_asked_for_is_released():
    old = np.random.default_rng(4).standard_normal((1024, 512)).astype(np.float32)
    new = np.random.default_rng(5).standard_normal((1024, 640)).astype(np.float32)
    for _ in range(3):
        _step(old, old)
    gc.collect()
    assert set(_memory._free) == {old.nbytes}
    for _ in range(_memory._WINDOW // 2 + 1):  # two requests a step: the window passes
        _step(new, new)
    gc.collect()
    assert set(_memory._free) == {new.nbytes}
    assert fastbn.pool_held() == 2 * new.nbytes


def test_limit_still_bounds_the_pool():
    fastbn.set_pool_limit(3 << 20)  # room for one of two 2 MiB outputs
    x = np.random.default_rng(6).standard_normal((1024, 512)).astype(np.float32)
    _step(x, x)
    gc.collect()
    assert fastbn.pool_held() == 2 << 20


def test_at_the_limit_a_newer_size_replaces_an_older_one():
    """With the pool full at its limit, a dropped buffer of the size asked for most
    recently takes the place of one of a size asked for less recently."""
    fastbn.set_pool_limit(2 << 20)  # room for one 2 MiB buffer
    f32 = np.dtype(np.float32)
    old = _memory.empty((1024, 512), f32)  # 2 MiB
    del old
    gc.collect()
    assert set(_memory._free) == {2 << 20}
    new = _memory.empty((1024, 500), f32)  # a new size: fresh memory, the old one stays
    assert set(_memory._free) == {2 << 20}
    nbytes = new.nbytes
    del new
    gc.collect()
    assert set(_memory._free) == {nbytes}
    assert fastbn.pool_held() == nbytes
