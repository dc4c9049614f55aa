"""The benchmark command runs end to end (tiny case, one round); no timing is asserted."""

import json

import numpy as np

from fastbn import benchmark
from fastbn.__main__ import main


def test_bench_command_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--cases",
            "64x256",
            "--ops",
            "forward_train,backward",
            "--rounds",
            "1",
            "--no-torch",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "accuracy vs float64 reference" in printed and "64x256" in printed
    report = json.loads(out.read_text())
    assert report["machine"]["threads"] >= 1
    results = report["results"]
    assert [r["op"] for r in results] == ["forward_train", "backward"]
    for r in results:
        assert set(r["ms"]) == {"reference", "fastbn", "fastbn_out"}
        assert all(v > 0 for v in r["ms"].values()) and r["probe_ms"] > 0
        assert r["copyto_ms"] > 0  # a small case: np.copyto of the same bytes, apart from ms
        assert r["noise"]["rounds"] == 1 and isinstance(r["noise"]["noisy"], bool)
    # every timed result is assessed: the plain ones and, with activation="relu", the fused
    assert report["noise"]["results"] == len(results) + len(report["fusion"])
    assert ("WARNING: noisy machine" in printed) == report["noise"]["noisy"]


def test_accuracy_check_covers_every_case_layout():
    rows = benchmark.check_against_reference(benchmark.CASES, ["float32", "float64"])
    assert len(rows) == len(benchmark.CASES) * 2 * 4
    assert all(err <= tol for _, _, _, err, tol in rows)


def test_runners_compute_what_they_claim():
    """Each runner performs its operation: fastbn's outputs equal the reference's."""
    case = benchmark.Case("tiny", (16, 8))
    data = benchmark.make_data(case, "float64")
    for op in benchmark.OPS:
        want = benchmark.make_runner("reference", op, case, data)()
        for impl in ("fastbn", "fastbn_out"):
            got = benchmark.make_runner(impl, op, case, data)()
            first_got = got[0]  # y for forward ops, dx for backward ones
            np.testing.assert_allclose(first_got, want[0], rtol=1e-10, atol=1e-12)
