"""Tables, bars, noise warnings and the JSON of a run (the plot is in ``plot.py``)."""

import json
import platform
import time
from dataclasses import asdict

import numba
import numpy as np

from .. import threading_layer_name
from .cases import (
    BARS,
    BUSY_BAR,
    BUSY_CASES,
    BY_NAME,
    FUSION_BARS,
    FUSION_CASES,
    IMPLS,
    torch_or_none,
)
from .runners import FUSION_IMPLS


def machine_info(threads):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    torch = torch_or_none()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu,
        "threads": threads,
        "threading_layer": threading_layer_name(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "torch": getattr(torch, "__version__", None),
    }


def header(threads, with_torch):
    info = machine_info(threads)
    return (
        f"fastbn bench  {info['date']}  {info['cpu']}  threads={threads} "
        f"({info['threading_layer']})  numpy {info['numpy']}  numba {info['numba']}"
        + (f"  torch {info['torch']}" if with_torch else "")
        + "\n"
        "ms: median; x ref / x torch: speedup of fastbn (allocating) over them; "
        "GB/s: minimal traffic / time; units: time / same-process probe time; "
        "/copy: fastbn (allocating) time / np.copyto of the same bytes (small cases)"
    )


def _ratio(num, den, fmt, width):
    return f"{num / den:{width}{fmt}}" if num and den else f"{'-':>{width}s}"


def format_table(case, results, nbytes):
    """One case's table: a row per op, then its noise warnings."""
    impls = [i for i in IMPLS if i in results[0].ms]
    small = results[0].copyto_ms is not None
    head = f"{'op':17s}" + "".join(f"{i:>11s}" for i in impls)
    head += f"{'x ref':>8s}{'x torch':>8s}{'GB/s':>7s}{'units':>7s}{'out=':>6s}"
    head += f"{'copyto':>9s}{'/copy':>7s}" if small else ""
    api = "  via BatchNorm" if results[0].api == "BatchNorm" else ""
    lines = [
        f"\n{case.name}  shape={case.shape} axis={case.axis} {results[0].dtype}{api}  "
        f"probe {results[0].probe_ms:.3f} ms",
        head,
    ]
    for r in results:
        fast = r.ms["fastbn"]
        row = f"{r.op:17s}" + "".join(f"{r.ms[i]:11.3f}" for i in impls)
        row += _ratio(r.ms.get("reference"), fast, ".1f", 8)
        row += _ratio(r.ms.get("torch"), fast, ".2f", 8)
        row += f"{r.gbps('fastbn_out', nbytes):7.1f}{r.units('fastbn'):7.2f}"
        row += f"{r.units('fastbn_out'):6.2f}"
        if small:
            row += f"{r.copyto_ms:9.4f}{fast / r.copyto_ms:7.1f}"
        lines.append(row)
    lines += noise_lines(results)
    return "\n".join(lines)


def format_fusion(case, results):
    """batch norm + ReLU: fused (allocating, out=) against plain fastbn (out=), fastbn
    then NumPy's ReLU, and torch's batch_norm + relu."""
    impls = [i for i in ("fastbn_out", *FUSION_IMPLS) if i in results[0].ms]
    lines = [
        f"\n{case.name} {results[0].dtype}: batch norm + ReLU "
        f"(relu_out/fastbn_out <= {FUSION_BARS['relu_out/fastbn_out']}, "
        f"unfused/relu >= {FUSION_BARS['unfused/relu']} for forward_backward)",
        f"{'op':17s}"
        + "".join(f"{i:>11s}" for i in impls)
        + f"{'out/plain':>10s}{'x unfused':>10s}{'x torch':>8s}",
    ]
    for r in results:
        row = f"{r.op:17s}" + "".join(f"{r.ms[i]:11.3f}" for i in impls)
        row += _ratio(r.ms["relu_out"], r.ms["fastbn_out"], ".2f", 10)
        row += _ratio(r.ms["unfused"], r.ms["relu"], ".2f", 10)
        row += _ratio(r.ms.get("torch_relu"), r.ms["relu"], ".2f", 8)
        lines.append(row)
    lines += noise_lines(results)
    return "\n".join(lines)


def format_busy(rows, procs):
    lines = [
        f"\nbusy machine: {procs} spinning processes; fastbn on 1 thread and on "
        f"{rows[0].threads if rows else '-'} threads (N/1 <= {BUSY_BAR} is the bar)",
        f"{'case':20s}{'dtype':>9s} {'op':17s}{'1 thr ms':>10s}{'N thr ms':>10s}{'N/1':>8s}"
        f"{'out= 1':>10s}{'out= N':>10s}{'N/1':>8s}",
    ]
    for r in rows:
        lines.append(
            f"{r.case:20s}{r.dtype:>9s} {r.op:17s}{r.ms_1:10.3f}{r.ms_n:10.3f}"
            f" {r.ms_n / r.ms_1:7.2f}{r.out_ms_1:10.3f}{r.out_ms_n:10.3f}"
            f" {r.out_ms_n / r.out_ms_1:7.2f}"
        )
    lines += noise_lines(rows, expected=("load",))
    return "\n".join(lines)


def format_scaling(rows, threads):
    lines = [
        f"\nthread scaling, fastbn forward+backward with out=: 1 vs {threads} threads",
        f"{'case':20s}{'dtype':>9s}{'1 thread ms':>13s}{f'{threads} threads ms':>14s}"
        f"{'speedup':>9s}",
    ]
    for name, dtype, t1, tn in rows:
        lines.append(f"{name:20s}{dtype:>9s}{t1 * 1e3:13.2f}{tn * 1e3:14.2f}{t1 / tn:9.2f}")
    return "\n".join(lines)


def noise_lines(results, expected=()):
    """A warning line per noisy result; kinds in ``expected`` (the load under --busy)
    alone do not make one."""
    lines = []
    for r in results:
        reasons = [
            why for kind, why in zip(r.noise["kinds"], r.noise["reasons"]) if kind not in expected
        ]
        if reasons:
            lines.append(f"  ! noisy {r.op}: " + "; ".join(reasons) + ": its ratios are unreliable")
    return lines


def format_noise_summary(summary):
    if not summary["noisy"]:
        return (
            f"noise: none detected ({summary['results']} results; limits: spread "
            f"{summary['limits']['spread']}, probe {summary['limits']['probe']}x, "
            f"load {summary['cores']} cores)"
        )
    load = summary["load_start"] if "load" not in summary["expected"] else None
    start = f", load average {load:.1f} at the start" if load is not None else ""
    return (
        f"WARNING: noisy machine: {summary['noisy_results']} of {summary['results']} results "
        f"noisy ({', '.join(summary['kinds'])}){start}; {summary['cores']} cores. "
        "Ratios marked '! noisy' are unreliable: rerun on a quiet machine."
    )


def _metric(result, metric):
    fast = result.ms.get("fastbn")
    if metric == "x_ref" and result.ms.get("reference"):
        return result.ms["reference"] / fast
    if metric == "x_torch" and result.ms.get("torch"):
        return result.ms["torch"] / fast
    if metric == "copy" and result.copyto_ms:
        return fast / result.copyto_ms
    if metric == "units_out" and "fastbn_out" in result.ms:
        return result.units("fastbn_out")
    return None


def evaluate_bars(results, busy=(), fusion=()):
    """Each bar that this run measured: ``{case, dtype, op, metric, limit, value, ok,
    noisy}``. Busy and fusion bars take the metric names ``N/1`` and FUSION_BARS' keys."""
    found = {(r.case, r.dtype, r.op): r for r in results}
    rows = []
    for bar in BARS:
        r = found.get((bar.case, bar.dtype, bar.op))
        value = _metric(r, bar.metric) if r else None
        if value is not None:
            ok = value >= bar.limit if bar.at_least else value <= bar.limit
            rows.append(_bar_row(bar.case, bar.dtype, bar.op, bar.metric, bar.limit, value, ok, r))
    for r in busy:  # the bar of the busy cases (others may be run, and get no verdict)
        if r.op == "forward_backward" and r.dtype == "float32" and r.case in BUSY_CASES:
            value = r.ms_n / r.ms_1
            ok = value <= BUSY_BAR
            rows.append(_bar_row(r.case, r.dtype, r.op, "N/1", BUSY_BAR, value, ok, r, ("load",)))
    for r in fusion:  # the fusion bars are the large cases' (FUSION_CASES)
        if r.op != "forward_backward" or r.case not in FUSION_CASES:
            continue
        for key, limit in FUSION_BARS.items():
            num, den = key.split("/")
            value = r.ms[num] / r.ms[den]
            ok = value <= limit if key.startswith("relu_out") else value >= limit
            rows.append(_bar_row(r.case, r.dtype, r.op, key, limit, value, ok, r))
    return rows


def _bar_row(case, dtype, op, metric, limit, value, ok, result, expected=()):
    """One bar's verdict; ``noisy`` when the result is, kinds in ``expected`` aside."""
    noisy = bool(result.noise and [k for k in result.noise["kinds"] if k not in expected])
    return dict(case=case, dtype=dtype, op=op, metric=metric, limit=limit, value=value, ok=ok,
                noisy=noisy)  # fmt: skip


def format_bars(rows):
    if not rows:
        return ""
    lines = ["\nbars (the issues' targets) measured in this run:"]
    for b in rows:
        sign = ">=" if b["metric"].startswith("x_") or b["metric"] == "unfused/relu" else "<="
        verdict = "ok" if b["ok"] else "MISSED"
        lines.append(
            f"  {b['case']:32s}{b['dtype']:>8s} {b['op']:17s}{b['metric']:>20s} "
            f"{b['value']:7.2f} {sign} {b['limit']:<5g}{verdict}"
            + ("  (noisy)" if b["noisy"] else "")
        )
    return "\n".join(lines)


def write_json(path, *, info, summary, results, fusion=(), busy=(), scaling=(), bars=()):
    report = {
        "machine": info,
        "noise": summary,
        "results": [asdict(r) for r in results],
        "fusion": [asdict(r) for r in fusion],
        "busy": [asdict(r) for r in busy],
        "scaling": [dict(case=c, dtype=d, s_1=t1, s_n=tn) for c, d, t1, tn in scaling],
        "bars": list(bars),
    }
    with open(path, "w") as fh:
        json.dump(report, fh, indent=1)


def case_order(name):
    return list(BY_NAME).index(name)
