"""Is the machine quiet enough for the ratios? Three signs of a noisy run, per result.

- **spread**: the interquartile range of a callable's per-round samples over their
  median exceeds ``SPREAD_LIMIT`` (rounds disagree, so one median means little);
- **probe**: a round's probe time is off the probe's own median by more than
  ``PROBE_LIMIT`` times (the bandwidth moved under that round);
- **load**: the 1-minute load average exceeds the number of cores this process may run
  on (someone else wants the cores; the benchmark's own threads count too, so on an idle
  machine the load stays at or below the thread count).

- **threads**: where ``np.copyto`` of the same bytes is timed (small cases), the
  parallel probe takes more than ``STARVED_FACTOR`` times as long plus
  ``STARVED_SLACK_S`` (its threads wait for cores that others hold: two thread pools, or
  other processes, fight for them; every parallel time of that case is then inflated,
  consistently, which the spread does not show).

A noisy result is still printed, with a warning line, and marked in the JSON.
"""

import os

import numpy as np

SPREAD_LIMIT = 0.25
PROBE_LIMIT = 1.5
STARVED_FACTOR = 5.0
STARVED_SLACK_S = 20e-6
MIN_ROUNDS = 3  # fewer samples give no spread


def cores():
    """The number of cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average():
    """The 1-minute load average, or None where the system has none."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def spread(samples):
    """Interquartile range over median of ``samples``; None for fewer than 3."""
    if len(samples) < MIN_ROUNDS:
        return None
    q1, med, q3 = np.percentile(samples, [25, 50, 75])
    return float((q3 - q1) / med) if med > 0 else None


def probe_off(samples):
    """How many of the probe's ``samples`` are off their median by over PROBE_LIMIT x."""
    if len(samples) < MIN_ROUNDS:
        return 0
    med = float(np.median(samples))
    return sum(1 for t in samples if t > med * PROBE_LIMIT or t * PROBE_LIMIT < med)


def starved(samples, probe="probe", copyto="copyto"):
    """``(probe s, copyto s)`` medians when the parallel probe is starved, else None."""
    if probe not in samples or copyto not in samples:
        return None
    p, c = float(np.median(samples[probe])), float(np.median(samples[copyto]))
    return (p, c) if p > STARVED_FACTOR * c + STARVED_SLACK_S else None


def assess(samples, *, load=None, ncores=None, probe="probe", copyto="copyto"):
    """The ``noise`` record of one result from its per-round ``samples``
    (``{name: [seconds, ...]}``, the probe under ``probe`` and ``np.copyto`` under
    ``copyto`` when timed) and the load.

    Returns ``{"noisy", "kinds", "reasons", "spread", "probe_off", "rounds", "load1",
    "cores"}``: ``kinds`` a subset of ``["spread", "probe", "threads", "load"]``,
    ``reasons`` one readable sentence per kind."""
    ncores = cores() if ncores is None else ncores
    spreads = {name: spread(ts) for name, ts in samples.items()}
    rounds = max((len(ts) for ts in samples.values()), default=0)
    off = probe_off(samples[probe]) if probe in samples else 0
    kinds, reasons = [], []
    measured = {k: v for k, v in spreads.items() if v is not None}
    if measured:
        name = max(measured, key=measured.get)
        if measured[name] > SPREAD_LIMIT:
            kinds.append("spread")
            reasons.append(
                f"rounds disagree: spread {measured[name]:.2f} ({name}) > {SPREAD_LIMIT}"
            )
    if off:
        kinds.append("probe")
        reasons.append(f"probe off its median by > {PROBE_LIMIT}x in {off} of {rounds} rounds")
    slow = starved(samples, probe, copyto)
    if slow:
        kinds.append("threads")
        reasons.append(
            f"the parallel probe takes {slow[0] * 1e3:.3f} ms against {slow[1] * 1e3:.4f} ms "
            "for np.copyto of the same bytes: threads wait for cores"
        )
    if load is not None and load > ncores:
        kinds.append("load")
        reasons.append(f"load average {load:.1f} > {ncores} cores")
    return {
        "noisy": bool(kinds),
        "kinds": kinds,
        "reasons": reasons,
        "spread": spreads,
        "probe_off": off,
        "rounds": rounds,
        "load1": load,
        "cores": ncores,
    }


def summarize(records, *, load_start=None, expected=()):
    """The overall ``noise`` record of a run from its results' records; kinds in
    ``expected`` (the load that ``--busy`` makes) do not count."""
    ncores = cores()
    counted = [[k for k in r["kinds"] if k not in expected] for r in records if r]
    noisy = [kinds for kinds in counted if kinds]
    kinds = sorted({k for ks in noisy for k in ks})
    loaded_at_start = load_start is not None and load_start > ncores
    if loaded_at_start and "load" not in expected and "load" not in kinds:
        kinds.append("load")
    return {
        "noisy": bool(noisy) or "load" in kinds,
        "expected": list(expected),
        "noisy_results": len(noisy),
        "results": len(records),
        "kinds": kinds,
        "load_start": load_start,
        "cores": ncores,
        "limits": {
            "spread": SPREAD_LIMIT,
            "probe": PROBE_LIMIT,
            "threads": STARVED_FACTOR,
            "load": ncores,
        },
    }
