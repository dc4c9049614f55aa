"""Streaming (non-temporal) stores write exactly what ordinary stores write.

Large outputs use them; the threshold is lowered here so that small, odd shapes
exercise every path: unaligned heads, whole lines, tails, rows and planes.
"""

import numpy as np
import pytest

import fastbn
from fastbn import _plan
from fastbn._kernels import affine

from _cases import LAYOUTS, random_case


@pytest.fixture
def stream_everything(monkeypatch):
    def set_threshold(nbytes):
        monkeypatch.setattr(_plan, "STREAM_BYTES", nbytes)

    return set_threshold


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_streamed_equals_cached_stores(layout, dtype, stream_everything):
    rng = np.random.default_rng(8)
    x, dy, gamma, beta, axis = random_case(rng, layout, dtype, scale=2.0)
    results = []
    for threshold in (1 << 62, 0):
        stream_everything(threshold)
        y, cache = fastbn.batch_norm(x, gamma, beta, axis=axis)
        dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, cache)
        results.append((y, dx, dgamma, dbeta))
    for plain, streamed in zip(*results):
        np.testing.assert_array_equal(plain, streamed)


@pytest.mark.parametrize(
    "shape",
    [(300, 77), (40, 301), (1000, 3), (999, 1), (500, 16), (7, 3, 301), (129, 5000), (2, 64, 16)],
)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_streamed_into_unaligned_out(shape, offset, stream_everything):
    """``out=`` views that start 4 or 12 bytes past a line boundary."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal(shape).astype(np.float32)
    size = x.size
    stream_everything(1 << 62)
    y_plain, _ = fastbn.batch_norm(x, None, None)
    stream_everything(0)
    buffer = np.zeros(size + 32, np.float32)
    out = buffer[offset : offset + size].reshape(shape)
    y, _ = fastbn.batch_norm(x, None, None, out=out)
    np.testing.assert_array_equal(y, y_plain)
    assert not buffer[:offset].any() and not buffer[offset + size :].any()  # nothing outside


@pytest.mark.parametrize("llc_mib, expected_mib", [(8, 4), (32, 16), (300, 16)])
def test_the_streaming_threshold_is_half_the_last_level_cache_up_to_16_mib(
    monkeypatch, tmp_path, llc_mib, expected_mib
):
    """Half the cache that sysfs reports, but never above 16 MiB (a socket's cache, shared:
    a 2-core VM reported 300 MiB)."""
    cache = tmp_path / "index3"
    cache.mkdir()
    (cache / "size").write_text(f"{llc_mib * 1024}K\n")
    monkeypatch.setattr(_plan.glob, "glob", lambda pattern: [str(cache / "size")])
    assert _plan._last_level_cache_bytes() == llc_mib << 20
    assert _plan.stream_threshold(_plan._last_level_cache_bytes()) == expected_mib << 20
    monkeypatch.undo()
    assert _plan.STREAM_BYTES == _plan.stream_threshold(_plan._last_level_cache_bytes())


@pytest.mark.parametrize(
    "dtype, shape",
    [
        (np.float32, (37, 2048)),  # 8 KiB rows; tasks of 32 rows and 5
        (np.float32, (21, 4096)),  # tasks of 16 rows and 5
        (np.float32, (6, 16384)),  # tasks of 4 rows and 2
        (np.float64, (13, 1024)),  # one task of 13 rows
        (np.float64, (10, 2056)),
    ],
)
@pytest.mark.parametrize("offset", [0, 1, 5])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_wide_rows_streamed_across_rows(dtype, shape, offset, activation, training, monkeypatch):
    """Rows of at least ``affine.FOUR_ROWS_FROM`` bytes, a whole number of lines each, are
    streamed line by line across four rows (two for ``dx``): the bits of ordinary stores,
    into ``out=`` views whose rows start 0 to 15 elements before a line boundary, row
    counts not a multiple of four, nothing written outside ``out``."""
    itemsize = np.dtype(dtype).itemsize
    row = shape[1] * itemsize
    assert row >= affine.FOUR_ROWS_FROM and row % 64 == 0
    rng = np.random.default_rng(shape[1] + offset)
    x = (1.5 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = (1 + 0.5 * rng.standard_normal(shape[1])).astype(dtype)
    beta = rng.standard_normal(shape[1]).astype(dtype)
    running = {"running_mean": rng.standard_normal(shape[1]), "running_var": np.full(shape[1], 2.0)}

    def run(out=None, dx_out=None):
        kw = dict(running) if not training else {}
        y, cache = fastbn.batch_norm(
            x, gamma, beta, training=training, out=out, activation=activation, **kw
        )
        return (y,) + fastbn.batch_norm_backward(dy, cache, out=dx_out)

    monkeypatch.setattr(_plan, "STREAM_BYTES", 1 << 62)
    plain = run()
    monkeypatch.setattr(_plan, "STREAM_BYTES", 0)
    buffer = np.zeros(2 * x.size + 64, dtype)
    out = buffer[offset : offset + x.size].reshape(shape)
    dx_out = buffer[x.size + 32 + offset : 2 * x.size + 32 + offset].reshape(shape)
    streamed = run(out, dx_out)
    for a, b in zip(plain, streamed):
        np.testing.assert_array_equal(a, b)
    assert streamed[0] is out and streamed[1] is dx_out
    outside = np.r_[buffer[:offset], buffer[offset + x.size : x.size + 32 + offset]]
    assert not outside.any() and not buffer[2 * x.size + 32 + offset :].any()
