"""Benchmarks: one table of cases drives ``python -m fastbn bench`` and ``bench/``.

The package, as small modules (bottleneck ships its benchmark the same way):

``cases``    the case table (``CASES``, the quick, small, DRAM, busy and fusion subsets),
             the speed bars and ``make_data``;
``runners``  the implementations under test (``make_runner``): the reference, fastbn
             allocating and with ``out=``, torch, ``np.copyto``, and batch norm + ReLU;
``timing``   interleaved rounds in one process and the bandwidth ``probe``;
``noise``    the checks that say when the machine is too noisy for the ratios;
``busy``     bounded background CPU load (``--busy``);
``suite``    the accuracy check and what is timed per case;
``report``   tables, bars, noise warnings and JSON; ``plot`` the speedup figure;
``cli``      the command line (``add_arguments``, ``run``).
"""

from .cases import (
    BARS,
    BUSY_CASES,
    CASES,
    DRAM_CASES,
    FUSION_CASES,
    IMPLS,
    MIN_TRAFFIC,
    OPS,
    QUICK_CASES,
    SMALL_CASES,
    Bar,
    Case,
    make_data,
    torch_or_none,
)
from .cli import add_arguments, run
from .report import format_scaling, format_table, machine_info
from .runners import FUSION_IMPLS, fusion_available, make_runner
from .suite import BusyResult, Result, bench_case, check_against_reference, thread_scaling
from .timing import interleaved_medians, interleaved_samples, make_probe

__all__ = [
    "BARS",
    "BUSY_CASES",
    "CASES",
    "DRAM_CASES",
    "FUSION_CASES",
    "FUSION_IMPLS",
    "IMPLS",
    "MIN_TRAFFIC",
    "OPS",
    "QUICK_CASES",
    "SMALL_CASES",
    "Bar",
    "BusyResult",
    "Case",
    "Result",
    "add_arguments",
    "bench_case",
    "check_against_reference",
    "format_scaling",
    "format_table",
    "fusion_available",
    "interleaved_medians",
    "interleaved_samples",
    "machine_info",
    "make_data",
    "make_probe",
    "make_runner",
    "run",
    "thread_scaling",
    "torch_or_none",
]
