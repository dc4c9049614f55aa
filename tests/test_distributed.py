"""SyncBatchNorm on 2 and 3 MPI ranks (``mpiexec`` subprocesses with a timeout, so a
deadlock fails instead of hanging), against ``fastbn.BatchNorm`` on the whole batch.

The rank scripts are ``tests/mpi/``. Skipped only when mpi4py is absent
(``pip install 'fastbn[mpi]' mpich``); each rank runs Numba on one thread.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mpi4py")

HERE = Path(__file__).parent / "mpi"
TOL = {"float32": 2e-6, "float64": 1e-12}


def mpiexec(n, script, *args, timeout=240):
    exe = Path(sys.executable).parent / "mpiexec"
    exe = str(exe) if exe.exists() else shutil.which("mpiexec")
    assert exe, "mpi4py is installed but mpiexec is not found (pip install mpich)"
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1")
    cmd = [exe, "-n", str(n), sys.executable, str(HERE / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def sync_results(n, *splits):
    proc = mpiexec(n, "check_sync.py", *splits)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("n, splits", [(2, ["64+64", "7+3", "10+0"]), (3, ["5+0+9", "4+4+4"])])
def test_sync_matches_batchnorm_on_the_whole_batch(n, splits):
    results = sync_results(n, *splits)
    assert len(results) == len(splits) * 6 + 3
    for r in results:
        assert r["identical"], r  # running statistics: the same bits on every rank
        tol = TOL[r.get("dtype", "float64")]
        for name, err in r["err"].items():
            assert err <= tol, (r, name)


def rank_lines(proc):
    return sorted(line for line in proc.stdout.splitlines() if line.startswith("rank "))


@pytest.mark.parametrize(
    "case, expected",
    [
        ("channels", "ValueError: SyncBatchNorm: ranks disagree on the channels: [4, 5]"),
        ("dtype", "ValueError: SyncBatchNorm: ranks disagree on the x dtype: "),
        ("single", "ValueError: Expected more than 1 value per channel"),
        ("skip_backward", "ValueError: SyncBatchNorm: ranks disagree on the operation: "),
    ],
)
def test_disagreement_raises_the_same_error_on_every_rank(case, expected):
    proc = mpiexec(2, "check_errors.py", case)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = rank_lines(proc)
    assert len(lines) == 2, proc.stdout
    messages = {line.split(": ", 1)[1] for line in lines}
    assert len(messages) == 1, lines
    assert messages.pop().startswith(expected), lines


def test_a_rank_with_bad_input_makes_the_others_raise():
    lines = rank_lines(mpiexec(2, "check_errors.py", "bad_x"))
    assert lines[0].startswith("rank 0: SyncError: SyncBatchNorm forward: rank(s) [1]"), lines
    assert lines[1].startswith("rank 1: ValueError: ") and "expects 4 channels" in lines[1]


def test_train_eval_disagreement_times_out_instead_of_hanging():
    lines = rank_lines(mpiexec(2, "check_errors.py", "mode", timeout=120))
    assert lines[0].startswith("rank 0: SyncError: ") and "within 5.0 s" in lines[0], lines
    assert lines[1] == "rank 1: ok", lines


def test_a_rank_that_raises_ends_mpiexec_non_zero():
    proc = mpiexec(2, "check_errors.py", "raise", timeout=120)
    assert proc.returncode != 0
    assert "rank 1 fails before its forward" in proc.stderr
    assert "SyncError" in proc.stderr


def test_comm_must_be_an_mpi4py_communicator():
    lines = rank_lines(mpiexec(2, "check_errors.py", "comm"))
    assert lines == [
        f"rank {r}: TypeError: comm must be an mpi4py MPI.Comm, got str" for r in (0, 1)
    ]


def test_example_data_parallel_losses_match_one_process():
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "fastbn.examples.distributed", "--json"]
    one = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert one.returncode == 0, one.stderr
    exe = Path(sys.executable).parent / "mpiexec"
    exe = str(exe) if exe.exists() else shutil.which("mpiexec")
    two = subprocess.run(
        [exe, "-n", "2", *cmd], capture_output=True, text=True, timeout=240, env=env
    )
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = json.loads(one.stdout.splitlines()[-1]), json.loads(two.stdout.splitlines()[-1])
    assert a["ranks"] == 1 and b["ranks"] == 2
    assert len(a["loss"]) == len(b["loss"]) >= 3
    assert a["loss"][-1] < 0.8 * a["loss"][0]  # it trains
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=0, atol=1e-10)
