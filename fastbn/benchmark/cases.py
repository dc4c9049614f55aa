"""The one case table: what ``python -m fastbn bench`` and ``bench/`` time, and the bars.

A ``Case`` names an input (shape, channel axis, memory layout), optionally a fixed dtype and
whether fastbn is called through the ``BatchNorm`` layer instead of the functional form.
``BARS`` restates the speed targets of the issues against these cases, so that a run says
which of them it met.
"""

import math
from dataclasses import dataclass

import numpy as np

OPS = ("forward_train", "forward_eval", "backward", "forward_backward")
IMPLS = ("reference", "fastbn", "fastbn_out", "torch")
# Bytes an operation must move at least, in units of the input's size: what GB/s counts.
MIN_TRAFFIC = {"forward_train": 3, "forward_eval": 2, "backward": 5, "forward_backward": 8}


@dataclass(frozen=True)
class Case:
    """A benchmark input of ``shape`` with channel ``axis``.

    ``channels_last`` stores an ``(N, C, H, W)`` array with NHWC memory (torch's
    ``channels_last``); ``dtype`` (a name) pins the dtype whatever ``--dtype`` asks;
    ``layer`` calls fastbn through ``fastbn.BatchNorm`` (``bn.forward`` / ``bn.backward``).
    """

    name: str
    shape: tuple
    axis: int = 1
    channels_last: bool = False
    dtype: str = None
    layer: bool = False

    @property
    def C(self):
        return self.shape[self.axis]

    @property
    def size(self):
        return math.prod(self.shape)

    @property
    def layout(self):
        return "channels_last" if self.channels_last else "contiguous"

    @property
    def small(self):
        """Small inputs, where per-call cost dominates: timed against ``np.copyto`` too."""
        return self.name in SMALL_CASES

    def dtypes(self, requested):
        """The dtype names this case runs in, given those asked for."""
        return (self.dtype,) if self.dtype else tuple(requested)


CASES = (
    Case("64x256", (64, 256)),
    Case("128x512", (128, 512)),
    Case("100x100 BatchNorm", (100, 100), dtype="float64", layer=True),
    Case("NCHW 32x16x8x8", (32, 16, 8, 8)),
    Case("NHWC 16x8x8x32", (16, 8, 8, 32), axis=-1),
    # NCHW with NHWC memory, as a convolution written with im2col returns its output
    Case("NCHW 32x16x8x8 channels_last", (32, 16, 8, 8), channels_last=True),
    # a late CNN layer: planes of 2x2 values, where the planes kernels loop per plane
    Case("NCHW 256x64x2x2", (256, 64, 2, 2)),
    Case("256x1024", (256, 1024)),
    Case("4096x1024", (4096, 1024)),
    Case("65536x256", (65536, 256)),
    Case("1000000x64", (1_000_000, 64)),
    Case("1024x16384", (1024, 16384)),
    Case("NCHW 32x64x56x56", (32, 64, 56, 56)),
    Case("NCHW 32x64x56x56 channels_last", (32, 64, 56, 56), channels_last=True),
)
BY_NAME = {c.name: c for c in CASES}
QUICK_CASES = (
    "64x256",
    "100x100 BatchNorm",
    "4096x1024",
    "1000000x64",
    "NCHW 32x64x56x56",
    "NCHW 32x64x56x56 channels_last",
)
# The small inputs of real networks (issue 11): per-call cost, next to np.copyto.
SMALL_CASES = (
    "64x256",
    "128x512",
    "100x100 BatchNorm",
    "NCHW 32x16x8x8",
    "NHWC 16x8x8x32",
    "NCHW 32x16x8x8 channels_last",
    "NCHW 256x64x2x2",
)
# The DRAM-sized 2-D cases that the speed targets speak of.
DRAM_CASES = ("65536x256", "1000000x64", "1024x16384")
# What --busy runs unless --cases says otherwise: the busy-machine bar's cases.
BUSY_CASES = ("256x1024", "4096x1024", "65536x256")
# Where the fused batch norm + ReLU is compared with its composition (issue 13).
FUSION_CASES = (*DRAM_CASES, "NCHW 32x64x56x56")


@dataclass(frozen=True)
class Bar:
    """A speed target: ``metric`` of ``op`` on ``case`` in ``dtype`` must be ``>= limit``
    (speedups ``x_ref``, ``x_torch``) or ``<= limit`` (time ratios ``copy``, ``units_out``).

    ``x_ref`` / ``x_torch``: their time over fastbn's (allocating); ``copy``: fastbn's
    (allocating) over ``np.copyto`` of the same bytes; ``units_out``: fastbn's with
    ``out=`` over the same-process probe.
    """

    case: str
    dtype: str
    op: str
    metric: str
    limit: float

    @property
    def at_least(self):
        return self.metric.startswith("x_")


def _bars():
    bars = []
    for name in ("64x256", "128x512"):
        bars += [
            Bar(name, "float32", "forward_train", "x_torch", 2.0),
            Bar(name, "float32", "forward_backward", "x_torch", 3.0),
            Bar(name, "float32", "forward_train", "copy", 4.0),
        ]
    bars += [
        Bar("100x100 BatchNorm", "float64", "forward_backward", "x_ref", 8.0),
        Bar("100x100 BatchNorm", "float64", "forward_train", "copy", 4.0),
        Bar("NCHW 32x16x8x8", "float32", "forward_train", "x_torch", 2.0),
        Bar("NCHW 32x16x8x8", "float32", "forward_backward", "x_torch", 3.0),
        Bar("NHWC 16x8x8x32", "float32", "forward_train", "x_torch", 1.5),
        Bar("NHWC 16x8x8x32", "float32", "forward_backward", "x_torch", 2.5),
        Bar("NCHW 32x64x56x56", "float32", "forward_backward", "x_torch", 3.0),
        Bar("NCHW 32x64x56x56 channels_last", "float32", "forward_backward", "x_torch", 1.5),
    ]
    for name in DRAM_CASES:
        bars += [
            Bar(name, "float32", "forward_train", "units_out", 1.6),
            Bar(name, "float32", "forward_backward", "units_out", 4.2),
            Bar(name, "float32", "forward_backward", "x_torch", 2.5),
        ]
    return tuple(bars)


BARS = _bars()
# --busy: N threads over 1 thread, forward+backward, under one spinning process per core.
BUSY_BAR = 1.25
# Fusion: fused (out=) over plain fastbn (out=) at most; unfused (allocating) over fused
# (allocating) at least; both for forward+backward.
FUSION_BARS = {"relu_out/fastbn_out": 1.1, "unfused/relu": 1.6}


def select_cases(names=None, *, quick=False, default=None):
    """Cases by comma-separated ``names``; else the quick subset, ``default`` or all.
    Unknown names raise ``SystemExit`` with the list to choose from."""
    if names:
        wanted = [n.strip() for n in names.split(",")]
        unknown = [n for n in wanted if n not in BY_NAME]
        if unknown:
            raise SystemExit(f"unknown case(s) {unknown}; see --list")
        return [BY_NAME[n] for n in wanted]
    if quick:
        return [BY_NAME[n] for n in QUICK_CASES]
    if default is not None:
        return [BY_NAME[n] for n in default]
    return list(CASES)


def torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


def make_data(case, dtype, seed=0):
    """``x``, ``dy``, ``gamma``, ``beta``, ``running_mean``, ``running_var`` for a case:
    ``x`` and ``dy`` of ``case.shape`` (NHWC memory when ``channels_last``), the others
    of shape ``(C,)``, all of ``dtype``."""
    rng = np.random.default_rng(seed)
    shape = case.shape
    if case.channels_last:  # NHWC memory, NCHW shape
        nhwc = (shape[0],) + shape[2:] + (shape[1],)

        def draw():
            return np.moveaxis(rng.standard_normal(nhwc, dtype=np.float32).astype(dtype), -1, 1)
    else:

        def draw():
            return rng.standard_normal(shape, dtype=np.float32).astype(dtype)

    x = draw() * 2 + 0.5
    dy = draw()
    C = case.C
    return {
        "x": x,
        "dy": dy,
        "gamma": (1 + 0.1 * rng.standard_normal(C)).astype(dtype),
        "beta": (0.1 * rng.standard_normal(C)).astype(dtype),
        "running_mean": np.zeros(C, dtype),
        "running_var": np.ones(C, dtype),
    }
