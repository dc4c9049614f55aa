"""Serial or parallel: for inputs big enough to split, the faster of the two, by timing.

The parallel kernels are faster on an idle machine, but a parallel region needs every
thread on a core at once: with NumPy's BLAS threads spinning between fastbn's calls, or
other processes on the cores, a thread that waits for its partner can make a call many
times slower than the serial kernel (README, threads). Both give the same bits (the work
partition is fixed by the shape), so fastbn times every call of a shape that could run
in parallel and keeps running whichever mode has been faster lately, trying the other
mode now and then (after ``PROBE_EVERY`` calls, less often while it keeps losing) so
that it follows the machine as its load changes.

The parallel mode is first tried once the serial one has run ``PARALLEL_AFTER_NS`` (0.5 s)
of this operation on this plan in this process: a short session (a notebook's first
calls) does not compile the parallel targets (about half of a cold first call's compile
time), a training loop reaches them within its first second. ``python -m fastbn warmup``
compiles both (``delay(0)``: with no delay each mode is timed from the first call, the
parallel one first); so does the benchmark, which measures the steady state.

A try is ``TRY_CALLS`` consecutive calls of the other mode, and its first is not kept:
after a streak of serial calls the OpenMP threads sleep, and the call that wakes them
costs more than the parallel calls that would follow it (NCHW (32, 16, 8, 8) float32
forward: 30+ us against 10.7 us warm, serial 17.6 us). Kept, that first call made every
try of the parallel mode lose, and the serial mode stayed chosen although slower.
"""

import contextlib
import time

PROBE_EVERY = 16  # calls between two tries of the mode not in use
_MAX_INTERVAL = 64
_KEPT = 3  # times kept per mode; the estimate is their minimum (noise only adds time)
TRY_CALLS = 2  # calls per try of the other mode; the first wakes it up and is not kept
PARALLEL_AFTER_NS = 500_000_000  # serial time before the first parallel call (read per call)

_clock = time.perf_counter_ns


class Choice:
    """Timing state of one operation on one plan: the last ``_KEPT`` times (ns) of each
    mode (the first call of each, which may compile, is not kept, nor the first call
    of a try), the countdown to the next try of the mode not in use, and the calls
    left in a try under way."""

    __slots__ = ("times", "seen", "countdown", "interval", "trying", "serial_ns")

    def __init__(self):
        self.times = ([], [])  # serial, parallel
        self.seen = [0, 0]
        self.countdown = PROBE_EVERY
        self.interval = PROBE_EVERY
        self.trying = 0  # calls left in the current try
        self.serial_ns = 0  # serial time kept before the first parallel call

    def _best(self):
        serial, parallel = self.times
        return 1 if min(parallel) <= min(serial) else 0

    def mode(self):
        """1 (parallel) or 0 (serial) for the next call."""
        if PARALLEL_AFTER_NS and not self.seen[1]:  # serial until the delay is spent
            if len(self.times[0]) < 2 or self.serial_ns < PARALLEL_AFTER_NS:
                return 0
        if len(self.times[1]) < 2:
            return 1
        if len(self.times[0]) < 2:
            return 0
        best = self._best()
        if self.trying:
            return 1 - best
        self.countdown -= 1
        if self.countdown > 0:
            return best
        self.trying = TRY_CALLS
        return 1 - best  # a try of the other mode

    def _keep(self, mode, nanoseconds):
        times = self.times[mode]
        if len(times) == _KEPT:
            times[self.seen[mode] % _KEPT] = nanoseconds
        else:
            times.append(nanoseconds)

    def record(self, mode, nanoseconds):
        self.seen[mode] += 1
        if self.seen[mode] == 1:
            return  # the first call may have compiled
        if not self.trying:
            self._keep(mode, nanoseconds)
            if not self.seen[1]:
                self.serial_ns += nanoseconds
            return
        self.trying -= 1
        if self.trying == TRY_CALLS - 1:
            return  # the call that woke the mode up
        self._keep(mode, nanoseconds)
        if not self.trying:  # the try is over: back off while it loses
            lost = self._best() != mode
            self.interval = min(2 * self.interval, _MAX_INTERVAL) if lost else PROBE_EVERY
            self.countdown = self.interval


@contextlib.contextmanager
def delay(nanoseconds):
    """Within the block, the serial time before a plan's first parallel call (new plans'
    and those not yet past it); ``delay(0)`` times both modes from the first calls."""
    global PARALLEL_AFTER_NS
    saved, PARALLEL_AFTER_NS = PARALLEL_AFTER_NS, int(nanoseconds)
    try:
        yield
    finally:
        PARALLEL_AFTER_NS = saved


def run(choice, serial, parallel, parallel_call, args):
    """Call ``serial(*args)`` or ``parallel_call(parallel, *args)`` as ``choice`` says,
    timing it."""
    mode = choice.mode()
    start = _clock()
    result = parallel_call(parallel, *args) if mode else serial(*args)
    choice.record(mode, _clock() - start)
    return result
