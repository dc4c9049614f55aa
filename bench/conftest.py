"""pytest-benchmark suite options: ``pytest bench --benchmark-only [--bench-threads N]``."""


def pytest_addoption(parser):
    parser.addoption(
        "--bench-threads",
        type=int,
        default=None,
        help="threads for fastbn and torch (default: all)",
    )
    parser.addoption(
        "--bench-quick",
        action="store_true",
        help="only the quick subset of cases (fastbn.benchmark.QUICK_CASES)",
    )


def pytest_configure(config):
    """The suite measures the steady state: each plan times both of fastbn's modes from
    its first calls instead of running serial for its first 0.5 s (``fastbn._choice``)."""
    from fastbn import _choice

    _choice.PARALLEL_AFTER_NS = 0
