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
