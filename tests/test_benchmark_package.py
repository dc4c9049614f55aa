"""The benchmark package's parts: case table, runners, noise checks, busy load, bars, CLI.

No timing is asserted; what is asserted is what each part computes or decides.
"""

import argparse
import json
import os
import time

import numpy as np
import pytest

from fastbn import functional
from fastbn import reference as ref
from fastbn.__main__ import main
from fastbn.benchmark import cases, cli, noise, report, runners
from fastbn.benchmark.busy import BusyLoad
from fastbn.benchmark.suite import BusyResult, Result, bench_case


def test_case_table_names_the_issues_small_cases():
    by = cases.BY_NAME
    assert by["64x256"].shape == (64, 256) and by["128x512"].shape == (128, 512)
    layer_case = by["100x100 BatchNorm"]
    assert layer_case.shape == (100, 100) and layer_case.layer
    assert layer_case.dtypes(["float32"]) == ("float64",)  # pinned whatever --dtype asks
    assert by["NCHW 32x16x8x8"].shape == (32, 16, 8, 8) and by["NCHW 32x16x8x8"].axis == 1
    assert by["NHWC 16x8x8x32"].shape == (16, 8, 8, 32) and by["NHWC 16x8x8x32"].axis == -1
    assert by["NHWC 16x8x8x32"].C == 32
    twin = by["NCHW 32x16x8x8 channels_last"]
    assert twin.shape == (32, 16, 8, 8) and twin.channels_last and twin.small
    subsets = (cases.QUICK_CASES, cases.SMALL_CASES, cases.DRAM_CASES, cases.BUSY_CASES)
    for names in (*subsets, cases.FUSION_CASES):
        assert set(names) <= set(by)
    for bar in cases.BARS:
        assert bar.case in by and bar.op in cases.OPS
        assert bar.metric in ("x_ref", "x_torch", "copy", "units_out")
    assert [c.name for c in cases.select_cases("64x256, 4096x1024")] == ["64x256", "4096x1024"]
    with pytest.raises(SystemExit, match="unknown case"):
        cases.select_cases("64x257")


def _reference_outputs(case, data, op):
    x, dy, g, b = data["x"], data["dy"], data["gamma"], data["beta"]
    if op == "forward_eval":
        rm, rv = data["running_mean"], data["running_var"]
        kw = dict(training=False, running_mean=rm, running_var=rv, axis=case.axis)
        return ref.batch_norm(x, g, b, **kw)[:1]  # y
    y, cache = ref.batch_norm(x, g, b, axis=case.axis)
    return ref.batch_norm_backward(dy, cache) if op in ("backward", "forward_backward") else (y,)


@pytest.mark.parametrize("name", ["100x100 BatchNorm", "NHWC 16x8x8x32"])
def test_new_case_runners_compute_what_they_claim(name, monkeypatch):
    """Each fastbn runner of the layer and channels-last cases gives the reference's
    outputs; the layer case goes through BatchNorm.forward / backward."""
    case = cases.BY_NAME[name]
    calls = []
    real_forward = runners.layer.BatchNorm.forward

    def counting_forward(self, x, **kw):
        calls.append(x.shape)
        return real_forward(self, x, **kw)

    monkeypatch.setattr(runners.layer.BatchNorm, "forward", counting_forward)
    for op in cases.OPS:
        data = cases.make_data(case, case.dtype or "float64")
        want = _reference_outputs(case, data, op)  # before: the runners update running stats
        for impl in ("fastbn", "fastbn_out"):
            got = runners.make_runner(impl, op, case, data)()
            assert len(want) in (1, 3)
            for g, w in zip(got[: len(want)], want):
                np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)
    assert bool(calls) == case.layer


def test_copyto_runner_copies_the_bytes():
    small = cases.Case("t", (2, 3, 4, 5), channels_last=True)
    data = cases.make_data(small, "float32")
    dst = runners.make_runner("copyto", "forward_train", small, data)()
    assert dst.flags.c_contiguous and dst.nbytes == data["x"].nbytes
    np.testing.assert_array_equal(dst, data["x"])
    assert not np.shares_memory(dst, data["x"])


def test_torch_gets_the_same_memory_as_channels_last():
    torch = pytest.importorskip("torch")
    case = cases.BY_NAME["NHWC 16x8x8x32"]
    data = cases.make_data(case, "float32")
    x, dy, _ = runners._torch_tensors(torch, case, data)
    assert tuple(x.shape) == (16, 32, 8, 8)
    assert x.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(x.numpy(), np.moveaxis(data["x"], -1, 1))
    y = runners.make_runner("torch", "forward_train", case, data, threads=1)()
    want, _ = ref.batch_norm(data["x"].astype(np.float64), data["gamma"], data["beta"], axis=-1)
    np.testing.assert_allclose(np.moveaxis(y.numpy(), 1, -1), want, rtol=2e-4, atol=2e-5)
    y = runners.make_runner("torch_relu", "forward_train", case, data, threads=1)()
    relu = np.maximum(want, 0)
    np.testing.assert_allclose(np.moveaxis(y.numpy(), 1, -1), relu, rtol=2e-4, atol=2e-5)


# -- fusion: chosen by the signature of fastbn.batch_norm -----------------------------------


def test_fusion_available_reads_the_signature():
    def with_activation(x, gamma, beta, *, activation=None):
        pass

    def without(x, gamma, beta, *, axis=1):
        pass

    assert runners.fusion_available(with_activation) is True
    assert runners.fusion_available(without) is False
    assert runners.fusion_available(len) is False  # a builtin with no activation parameter


def _stub_fused(monkeypatch):
    """A batch_norm that takes activation= by composition (as the fused API promises)."""
    real_fwd, real_bwd = functional.batch_norm, functional.batch_norm_backward

    def fwd(x, gamma, beta, *, activation=None, out=None, **kw):
        y, cache = real_fwd(x, gamma, beta, out=out, **kw)
        if activation == "relu":
            np.maximum(y, 0, out=y)
            cache = ("relu", cache, y)
        return y, cache

    def bwd(dy, cache, *, out=None):
        if isinstance(cache, tuple):
            _, cache, y = cache
            dy = dy * (y > 0)
        return real_bwd(dy, cache, out=out)

    monkeypatch.setattr(functional, "batch_norm", fwd)
    monkeypatch.setattr(functional, "batch_norm_backward", bwd)


@pytest.mark.parametrize("fused", [False, True])
def test_fusion_runners_only_with_the_api_and_then_correct(fused, monkeypatch):
    if fused and not runners.fusion_available():
        _stub_fused(monkeypatch)
    if not fused and runners.fusion_available():
        monkeypatch.setattr(functional, "batch_norm", ref.batch_norm)  # no activation=
    case = cases.Case("tiny", (16, 8))
    data = cases.make_data(case, "float64")
    y_bn, cache = ref.batch_norm(data["x"], data["gamma"], data["beta"])
    y_want = np.maximum(y_bn, 0)
    dx_want = ref.batch_norm_backward(data["dy"] * (y_bn > 0), cache)
    for impl in ("relu", "relu_out", "unfused"):
        fwd = runners.make_runner(impl, "forward_train", case, data)
        fb = runners.make_runner(impl, "forward_backward", case, data)
        if not fused:
            assert fwd is None and fb is None
            continue
        np.testing.assert_allclose(fwd()[0], y_want, rtol=1e-12, atol=1e-12)
        for got, want in zip(fb(), dx_want):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    args = _args()
    assert cli.settings(args).fusion is fused
    assert cli.settings(_args(no_fusion=True)).fusion is False


def _args(**kw):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    argv = []
    for key, value in kw.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return parser.parse_args(argv)


def test_settings_defaults_and_busy_defaults():
    plain = cli.settings(_args())
    assert plain.ops == cases.OPS and [c.name for c in plain.cases] == list(cases.BY_NAME)
    busy = cli.settings(_args(busy=True))
    assert busy.ops == ("forward_backward",) and busy.fusion is False
    assert [c.name for c in busy.cases] == list(cases.BUSY_CASES)
    assert cli.settings(_args(busy=True, ops="all")).ops == cases.OPS
    with pytest.raises(SystemExit, match="unknown op"):
        cli.settings(_args(ops="forward"))


# -- noise ------------------------------------------------------------------------------------


def test_noise_quiet_samples_are_not_noisy():
    quiet = {"probe": [1.0, 1.02, 0.99, 1.01, 1.0], "fastbn": [2.0, 2.1, 1.95, 2.02, 2.0]}
    record = noise.assess(quiet, load=0.5, ncores=2)
    assert record["noisy"] is False and record["kinds"] == []
    assert record["probe_off"] == 0 and record["rounds"] == 5
    # IQR over median of the fastbn samples: (2.02 - 2.0) / 2.0
    assert record["spread"]["fastbn"] == pytest.approx(0.01)


def test_noise_each_sign_is_named():
    spread = {"probe": [1.0] * 5, "fastbn": [1.0, 1.0, 2.0, 3.0, 3.0]}  # IQR 2 / median 2
    rec = noise.assess(spread, ncores=2)
    assert rec["kinds"] == ["spread"] and rec["spread"]["fastbn"] == pytest.approx(1.0)
    off = {"probe": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 4.0]}  # one round 4x its median
    rec = noise.assess(off, ncores=2)
    assert rec["kinds"] == ["probe"] and rec["probe_off"] == 1
    assert noise.assess({"probe": [1.0] * 3}, load=2.5, ncores=2)["kinds"] == ["load"]
    assert noise.assess({"probe": [1.0] * 3}, load=2.0, ncores=2)["kinds"] == []
    # 0.1 ms for the parallel probe against 2 us for np.copyto: 0.1 ms > 5 * 2 us + 20 us
    starved = {"probe": [1e-4] * 3, "copyto": [2e-6] * 3}
    assert noise.assess(starved, ncores=2)["kinds"] == ["threads"]
    fine = {"probe": [7e-6] * 3, "copyto": [2e-6] * 3}  # 7 us < 5 * 2 us + 20 us
    assert noise.assess(fine, ncores=2)["kinds"] == []
    few = noise.assess({"fastbn": [1.0, 9.0]}, ncores=2)  # two rounds give no spread
    assert few["spread"]["fastbn"] is None and not few["noisy"]


def test_noise_summary_counts_and_ignores_the_expected_load():
    records = [
        {"noisy": True, "kinds": ["spread"]},
        {"noisy": True, "kinds": ["load"]},
        {"noisy": False, "kinds": []},
    ]
    s = noise.summarize(records, load_start=0.1)
    assert s["noisy"] and s["noisy_results"] == 2 and s["results"] == 3
    assert s["kinds"] == ["load", "spread"]
    busy = noise.summarize(records, load_start=99.0, expected=("load",))
    assert busy["noisy_results"] == 1 and busy["kinds"] == ["spread"]
    assert "noisy machine" in report.format_noise_summary(s)
    quiet = noise.summarize([{"noisy": False, "kinds": []}], load_start=0.0)
    assert not quiet["noisy"] and "none detected" in report.format_noise_summary(quiet)


def test_noisy_result_gets_a_warning_line():
    rec = noise.assess({"probe": [1.0] * 7, "fastbn": [1, 1, 1, 5, 9, 9, 9]}, ncores=2)
    r = _result("64x256", "forward_train", {"fastbn": 1.0, "fastbn_out": 1.0}, noise_=rec)
    table = report.format_table(cases.BY_NAME["64x256"], [r], 64 * 256 * 4)
    warning = [line for line in table.splitlines() if line.startswith("  ! noisy")]
    assert len(warning) == 1 and "spread" in warning[0] and "unreliable" in warning[0]


# -- bars ---------------------------------------------------------------------------------------


def _result(case, op, ms, *, copyto=None, probe=1.0, noise_=None, dtype="float32"):
    quiet = {"noisy": False, "kinds": [], "reasons": []}
    shape = cases.BY_NAME[case].shape
    return Result(case, shape, "contiguous", dtype, op, 2, probe, ms, copyto, noise=noise_ or quiet)


def test_bars_are_evaluated_from_the_measured_ratios():
    results = [
        _result("64x256", "forward_train", {"fastbn": 0.01, "torch": 0.03}, copyto=0.002),
        _result("64x256", "forward_backward", {"fastbn": 0.02, "torch": 0.05}),
        _result("65536x256", "forward_train", {"fastbn": 2.0, "fastbn_out": 1.5}, probe=1.0),
    ]
    got = {(b["case"], b["op"], b["metric"]): (b["value"], b["ok"]) for b in
           report.evaluate_bars(results)}  # fmt: skip
    assert got[("64x256", "forward_train", "x_torch")] == (pytest.approx(3.0), True)
    assert got[("64x256", "forward_train", "copy")] == (pytest.approx(5.0), False)  # > 4
    assert got[("64x256", "forward_backward", "x_torch")] == (pytest.approx(2.5), False)  # < 3
    assert got[("65536x256", "forward_train", "units_out")] == (pytest.approx(1.5), True)
    assert ("65536x256", "forward_backward", "x_torch") not in got  # not measured
    assert "MISSED" in report.format_bars(report.evaluate_bars(results))
    loaded = {"noisy": True, "kinds": ["load"], "reasons": ["load average 3.0 > 2 cores"]}
    r = _result("64x256", "forward_backward", {"fastbn": 0.01, "torch": 0.04}, noise_=loaded)
    (bar,) = report.evaluate_bars([r])
    assert bar["ok"] and bar["noisy"]  # 4 >= 3, measured on a loaded machine
    busy = BusyResult("4096x1024", "float32", "forward_backward", 2, 2, 5.0, 6.0, 5.0, 7.0, loaded)
    (bar,) = report.evaluate_bars([], busy=[busy])
    assert bar["value"] == pytest.approx(1.2) and bar["ok"] and not bar["noisy"]  # load expected


def test_fusion_and_busy_bars_only_for_their_cases():
    """The fusion bars are issue 13's, for the large cases (``FUSION_CASES``), and the busy
    bar is for ``BUSY_CASES``: a run of other cases (``--cases``) gets their figures in its
    tables but no verdict."""
    ms = {"fastbn_out": 1.0, "relu_out": 1.05, "relu": 1.0, "unfused": 1.7}
    big = _result("65536x256", "forward_backward", ms)
    small = _result("64x256", "forward_backward", ms)
    got = {(b["case"], b["metric"]): (b["value"], b["ok"]) for b in
           report.evaluate_bars([], fusion=[big, small])}  # fmt: skip
    assert got == {
        ("65536x256", "relu_out/fastbn_out"): (pytest.approx(1.05), True),
        ("65536x256", "unfused/relu"): (pytest.approx(1.7), True),
    }
    quiet = {"noisy": False, "kinds": [], "reasons": []}
    other = BusyResult("64x256", "float32", "forward_backward", 2, 2, 5.0, 9.0, 5.0, 9.0, quiet)
    assert report.evaluate_bars([], busy=[other]) == []


# -- busy load ------------------------------------------------------------------------------------


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as fh:  # utime + stime, fields 14 and 15, in ticks
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_busy_load_spins_and_stops_by_itself():
    with BusyLoad(2, seconds=60) as load:
        assert load.alive() and len(load.pids()) == 2
        time.sleep(1.0)
        if os.path.exists(f"/proc/{load.pids()[0]}/stat"):
            # each spins: at least a fifth of a core over the second, even on a loaded machine
            assert all(_cpu_seconds(pid) > 0.2 for pid in load.pids())
    assert load.pids() == []  # terminated on exit
    with BusyLoad(1, seconds=0.3) as load:
        time.sleep(3.0)
        assert not load.alive()  # its own deadline ended it
    with pytest.raises(ValueError, match="procs"):
        BusyLoad(0, seconds=1)


def test_bench_busy_writes_json(tmp_path, capsys):
    out = tmp_path / "busy.json"
    argv = ["bench", "--busy", "--busy-procs", "1", "--cases", "64x256", "--rounds", "2"]
    assert main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "busy machine: 1 spinning processes" in printed
    report_ = json.loads(out.read_text())
    assert report_["results"] == [] and len(report_["busy"]) == 1
    row = report_["busy"][0]
    assert row["op"] == "forward_backward" and row["procs"] == 1
    assert min(row["ms_1"], row["ms_n"], row["out_ms_1"], row["out_ms_n"]) > 0
    assert report_["noise"]["expected"] == ["load"]


def test_small_case_reports_copyto_apart_from_the_implementations():
    case = cases.BY_NAME["64x256"]
    (r,) = bench_case(case, "float32", ["forward_train"], ["fastbn"], threads=1, rounds=1)
    assert r.copyto_ms > 0 and set(r.ms) == {"fastbn"} and r.noise["rounds"] == 1


def test_bench_fusion_table_and_json(tmp_path, capsys, monkeypatch):
    """With activation= available (stubbed by composition until it lands), the command
    adds a fusion table and a ``fusion`` list to the JSON; the fusion bars, which are the
    large cases', are not judged on a small case (``test_fusion_and_busy_bars_only_for_their_cases``
    checks the judging)."""
    if not runners.fusion_available():
        _stub_fused(monkeypatch)
    out = tmp_path / "fusion.json"
    argv = ["bench", "--cases", "64x256", "--ops", "forward_backward", "--rounds", "1"]
    assert main([*argv, "--no-torch", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "batch norm + ReLU" in printed
    report_ = json.loads(out.read_text())
    (row,) = report_["fusion"]
    assert set(row["ms"]) == {"fastbn_out", "relu", "relu_out", "unfused"}
    metrics = {b["metric"] for b in report_["bars"] if b["case"] == "64x256"}
    assert not {"relu_out/fastbn_out", "unfused/relu"} & metrics
    assert [r["op"] for r in report_["results"]] == ["forward_backward"]
