"""pytest-benchmark suite over the table in ``fastbn.benchmark``.

Groups are (operation, case, dtype); inside a group the implementations ``reference``,
``fastbn``, ``fastbn_out``, ``torch`` (when importable), the streaming ``probe``, on the
small cases ``copyto`` (``np.copyto`` of the same bytes), and on the fusion cases the
batch norm + ReLU runners (when ``fastbn.batch_norm`` takes ``activation=``) line up for
comparison. Run with ``pytest bench --benchmark-only``; the normal test run does not
collect this directory. JIT compilation is warmed in the runners' first call, before
pytest-benchmark starts timing.
"""

import numba
import numpy as np
import pytest

import fastbn
from fastbn import benchmark as B

_data_cache = {}


def _data(case, dtype):
    key = (case.name, dtype)
    if key not in _data_cache:
        _data_cache.clear()  # one case's arrays at a time: the big ones are 0.5 GB
        _data_cache[key] = B.make_data(case, dtype)
    return _data_cache[key]


def _cases(config):
    if config.getoption("--bench-quick"):
        return [c for c in B.CASES if c.name in B.QUICK_CASES]
    return list(B.CASES)


def _impls(case):
    impls = [*B.IMPLS, "probe"]
    if case.small:
        impls.append("copyto")
    if case.name in B.FUSION_CASES and B.fusion_available():
        impls += B.FUSION_IMPLS
    return impls


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        params, ids = [], []
        for case in _cases(metafunc.config):
            for dtype in case.dtypes(("float32", "float64")):
                for impl in _impls(case):
                    params.append((case, dtype, impl))
                    ids.append(f"{case.name.replace(' ', '_')}-{dtype}-{impl}")
        metafunc.parametrize("case,dtype,impl", params, ids=ids)


@pytest.fixture(scope="session")
def threads(request):
    n = request.config.getoption("--bench-threads") or numba.config.NUMBA_NUM_THREADS
    fastbn.set_num_threads(n)
    return n


@pytest.mark.parametrize("op", B.OPS)
def test_bench(benchmark, case, op, dtype, impl, threads):
    data = _data(case, dtype)
    if impl == "probe":
        fn = B.make_probe(data)
    else:
        fn = B.make_runner(impl, op, case, data, threads=threads)
        if fn is None:
            pytest.skip(f"{impl} is not installed")
    fn()  # warm: JIT compile or cache load, page faults of the outputs
    benchmark.group = f"{op} {case.name} {dtype}"
    benchmark.extra_info.update(
        shape=list(case.shape),
        axis=case.axis,
        layout=case.layout,
        api="BatchNorm" if case.layer else "batch_norm",
        bytes=int(np.dtype(dtype).itemsize * case.size),
    )
    rounds = 3 if impl == "reference" and case.size > 1 << 20 else None
    if rounds:
        benchmark.pedantic(fn, rounds=rounds, iterations=1)
    else:
        benchmark(fn)
