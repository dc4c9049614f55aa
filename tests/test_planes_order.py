"""The elementwise pass of the planes family writes its planes in memory order, a task
being ``AFFINE_BLOCK`` outer indices times ``AFFINE_CHANNELS`` channels; small inputs
with short planes (``_plan.SHORT_PLANE_BYTES`` to ``LONG_PLANE_BYTES``) take the two-pass
path instead of the fused one. Oracles: the tasks' ranges against a plain count of every
plane, and the fused path (forced with ``LONG_PLANE_BYTES = 0``), whose per-channel steps
are the same formulas, so the same bits."""

import numpy as np
import pytest

import fastbn
from fastbn import _plan, _view
from fastbn._kernels import affine, layout

PLANS = [
    (32, 16, 64, 4),  # small, short planes: two-pass, one task
    (256, 64, 4, 4),  # tiny planes: rows of 256 columns
    (8, 16, 256, 4),  # small, 1 KiB planes: fused
    (64, 64, 4096, 4),  # large planes: two-pass, 16 channels per task
    (40, 24, 5000, 8),  # chunks of 13 channels, the last one shorter
    (3, 7, 200000, 4),  # one plane per task
    (1, 1, 262144, 4),
    (16, 64, 64, 4),  # parallel-sized, fused: a task per channel
    (100, 37, 1, 8),  # rows
    (1000, 5000, 1, 4),
]


@pytest.mark.parametrize("shape", PLANS, ids=str)
def test_elementwise_tasks_cover_every_plane_once(shape):
    outer, C, inner, itemsize = shape
    plan = _plan.Plan(outer, C, inner, itemsize)
    if plan.fold > 1:  # tiny planes: the kernels see rows of C * inner columns
        C, inner = plan.columns, 1
    ints = plan.ints
    seen = np.zeros((outer, C), np.int64)
    for t in range(ints[layout.AFFINE_TASKS]):
        lo, hi, c_lo, c_hi = (int(v) for v in affine._affine_range(ints, np.int64(t)))
        assert 0 <= lo < hi <= outer and 0 <= c_lo < c_hi <= C
        if inner == 1:  # rows: whole rows per task
            assert (c_lo, c_hi) == (0, C)
        seen[lo:hi, c_lo:c_hi] += 1
    np.testing.assert_array_equal(seen, 1)
    if plan.fused:  # a fused task is its channel
        assert ints[layout.AFFINE_TASKS] == C and ints[layout.AFFINE_CHANNELS] == 1


def test_small_short_planes_take_the_two_pass_path():
    assert not _plan.Plan(32, 16, 64, 4).fused  # NCHW (32, 16, 8, 8) float32
    assert not _plan.Plan(32, 64, 16, 4).fused  # (32, 64, 4, 4): 64-byte planes
    assert _plan.Plan(8, 16, 256, 4).fused  # 1 KiB planes
    assert _plan.Plan(16, 64, 64, 4).fused  # parallel-sized
    # tinier planes (2x2 float32) are neither: rows of C * inner columns (test_tiny_planes)
    assert not _plan.Plan(512, 16, 4, 4).fused and _plan.Plan(512, 16, 4, 4).fold == 4


def _call(x, dy, training, activation, out, rng):
    C = x.shape[1]
    dtype = x.dtype
    gamma = (1.0 + 0.5 * rng.standard_normal(C)).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    rm, rv = rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2.0, C).astype(dtype)
    y_out = np.empty_like(x) if out else None
    y, cache = fastbn.batch_norm(
        x, gamma, beta, training=training, running_mean=rm, running_var=rv,
        activation=activation, out=y_out,
    )  # fmt: skip
    dx_out = np.empty_like(x) if out else None
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, cache, out=dx_out)
    return [y, dx, dgamma, dbeta, rm, rv], cache.plan


@pytest.mark.parametrize("out", [False, True], ids=["new", "out"])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
# planes past _plan.TINY_PLANE_BYTES (shorter ones are folded into rows: test_tiny_planes)
@pytest.mark.parametrize("shape", [(32, 16, 8, 8), (64, 10, 6, 6), (7, 9, 6, 7), (33, 5, 40)])
def test_two_pass_short_planes_give_the_fused_paths_bits(
    shape, dtype, training, activation, out, monkeypatch
):
    rng = np.random.default_rng(sum(shape))
    x = (2.0 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    results = []
    for long_bytes in (_plan.LONG_PLANE_BYTES, 0):
        monkeypatch.setattr(_plan, "LONG_PLANE_BYTES", long_bytes)
        monkeypatch.setattr(_plan, "_plans", {})  # plans and views made afresh
        monkeypatch.setattr(_view, "_views", {})
        results.append(_call(x, dy, training, activation, out, np.random.default_rng(1)))
    (two_pass, plan_a), (fused, plan_b) = results
    assert not plan_a.fused and plan_b.fused
    for a, b in zip(two_pass, fused):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize(
    "outer, C, itemsize, width",
    [
        (64, 4096, 4, 1024),  # 1 MiB, in cache: accumulators of 1024 columns
        (128, 2048, 8, 1024),
        (16, 1024, 4, 1024),  # not wider than a chunk
        (300, 1000, 4, 1000),
        (4096, 4096, 4, 4096),  # 64 MiB, from memory: whole rows of up to 4096
        (1024, 16384, 4, 4096),  # from memory, wider than 4096: chunks of 4096
        (256, 10000, 8, 4096),  # 20 MB float64: two chunks of 4096 and one of 1808
        (8, 16384, 4, 1024),  # 512 KiB, in cache: chunks of 1024 at any width
    ],
)
def test_rows_reductions_split_wide_rows_that_sit_in_cache(outer, C, itemsize, width):
    """The rows family's column chunks (``_plan``'s split), and the reduction tasks cover
    every (row, column) once."""
    plan = _plan.Plan(outer, C, 1, itemsize)
    ints = plan.ints
    assert ints[layout.SPLIT_WIDTH] == width
    assert ints[layout.NSPLIT] == -(-C // width)
    covered = np.zeros((outer, C), np.int64)
    for t in range(ints[layout.NTASKS]):
        b, k = divmod(t, ints[layout.NSPLIT])
        rows = slice(b * ints[layout.BLOCK_LEN], min(outer, (b + 1) * ints[layout.BLOCK_LEN]))
        covered[rows, k * width : min(C, (k + 1) * width)] += 1
    assert (covered == 1).all()
    assert plan.counts.sum() == outer


@pytest.mark.parametrize(
    "shape, dtype, nsplit",
    [
        ((48, 3000), np.float32, 3),  # in cache: chunks of 1024, one partial
        ((48, 3000), np.float64, 3),
        ((256, 10000), np.float64, 3),  # 20 MB, from memory: chunks of 4096, one partial
        ((480, 9000), np.float32, 3),  # 17 MB
    ],
)
def test_split_wide_rows_match_the_reference(shape, dtype, nsplit):
    """Rows split into column chunks (one partial), against the float64 reference,
    forward and backward."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    assert _plan.Plan(*shape, 1, x.itemsize).ints[layout.NSPLIT] == nsplit
    y, cache = fastbn.batch_norm(x)
    dx, _, _ = fastbn.batch_norm_backward(dy, cache)
    y_ref, cache_ref = fastbn.reference.batch_norm(x.astype(np.float64), None, None)
    dx_ref, _, _ = fastbn.reference.batch_norm_backward(dy.astype(np.float64), cache_ref)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(dx, dx_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "outer, C, itemsize, blocks",
    [(129, 509, 4, 2), (200, 512, 4, 2), (1000, 300, 4, 5), (300, 1000, 4, 5), (201, 512, 8, 2)],
)
def test_parallel_sized_rows_inputs_get_blocks_of_equal_rows(outer, C, itemsize, blocks):
    """Rows inputs of SERIAL_BELOW elements or more get as many blocks as before, of equal
    rows (the last shorter by less than one row per block), not a full block and a
    remainder ((129, 509): 128 + 1 rows); their elementwise tasks too."""
    plan = _plan.Plan(outer, C, 1, itemsize)
    ints = plan.ints
    assert outer * C >= _plan.SERIAL_BELOW and plan.parallel
    assert ints[layout.NBLOCKS] == blocks == ints[layout.NTASKS]
    assert ints[layout.BLOCK_LEN] == -(-outer // blocks)
    assert plan.counts.sum() == outer and plan.counts.max() - plan.counts.min() < blocks
    tasks = ints[layout.AFFINE_TASKS]
    assert ints[layout.AFFINE_BLOCK] == -(-outer // tasks)
    assert tasks * ints[layout.AFFINE_BLOCK] - outer < tasks


@pytest.mark.parametrize(
    "outer, C",
    [(64, 256), (128, 512), (256, 256), (64, 1024), (1024, 64)],
)
def test_rows_inputs_of_one_task_stay_serial(outer, C):
    """Below SERIAL_BELOW elements, or exactly one task of them: one serial task (cut in
    two, (128, 512) ran slower next to torch's threads, see ``_plan._balanced``)."""
    plan = _plan.Plan(outer, C, 1, 4)
    assert plan.ints[layout.NTASKS] == 1 and plan.ints[layout.AFFINE_TASKS] == 1
    assert not plan.parallel


def test_equal_blocks_leave_plans_with_equal_blocks_unchanged():
    plan = _plan.Plan(4096, 1024, 1, 4)
    assert plan.ints[layout.NBLOCKS] == 32 and plan.ints[layout.BLOCK_LEN] == 128
    plan = _plan.Plan(65536, 256, 1, 4)
    assert plan.ints[layout.NBLOCKS] == 64 and plan.ints[layout.BLOCK_LEN] == 1024


@pytest.mark.skipif(fastbn.get_num_threads() < 2, reason="needs 2 threads")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_equal_blocks_give_the_same_bits_serial_and_parallel(dtype):
    """(129, 509), two blocks of 65 and 64 rows: the parallel targets run (timed from
    the first call) and give the bits of the serial ones on one thread; the result
    matches the float64 reference."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((129, 509)) * 3 + 5).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    gamma = rng.uniform(0.5, 2, 509).astype(dtype)
    beta = rng.standard_normal(509).astype(dtype)

    def run():
        y, cache = fastbn.batch_norm(x, gamma, beta)
        return [a.tobytes() for a in (y, *fastbn.batch_norm_backward(dy, cache))]

    with fastbn.num_threads(1):
        serial = run()
    plan = _plan.plan_for(129, 509, 1, x.itemsize)
    with fastbn._choice.delay(0), fastbn.num_threads(2):
        for _ in range(4):
            assert run() == serial
    assert plan.choices[("forward_train", False, False)].seen[1] > 0
    assert plan.choices[("backward", False, False)].seen[1] > 0
    y, cache = fastbn.batch_norm(x, gamma, beta)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, cache)
    ry, rcache = fastbn.reference.batch_norm(x.astype(np.float64), gamma, beta)
    rdx, rdgamma, rdbeta = fastbn.reference.batch_norm_backward(dy.astype(np.float64), rcache)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, ry, rtol=tol, atol=tol)
    np.testing.assert_allclose(dx, rdx, rtol=tol, atol=tol * 10)
    np.testing.assert_allclose(dgamma, rdgamma, rtol=tol * 10, atol=tol * 10)
    np.testing.assert_allclose(dbeta, rdbeta, rtol=tol, atol=tol * 10)
