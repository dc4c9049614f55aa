"""The compile notice (``fastbn._compile_notice``) and ``fastbn.warmup`` /
``python -m fastbn warmup`` (issue 12, items 2 and 3)."""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from numba import types

import fastbn
from fastbn import _compile_notice, _plan, _warmup
from fastbn._kernels import ops

# One small cold compile: forward_eval, float64, serial target (about 3 s alone).
_EVAL = textwrap.dedent(
    """
    import numpy as np, fastbn
    x = np.arange(24.0).reshape(6, 4)
    y, _ = fastbn.batch_norm(x, training=False, running_mean=np.zeros(4), running_var=np.ones(4))
    print(repr(float(y.sum())))
    from fastbn._warmup import _dispatchers  # which ReLU kernels this process compiled
    print(sorted(d.py_func.__name__ for d in _dispatchers() if "relu" in d.py_func.__name__
                 and d.stats.cache_misses))
    """
)


def _python(code, **env):
    full = {k: v for k, v in os.environ.items() if k != "FASTBN_QUIET_COMPILE"}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=600
    )


def test_cold_call_prints_one_line_warm_call_prints_nothing(tmp_path):
    expected = float((np.arange(24.0) / np.sqrt(1.0 + 1e-5)).sum())  # y = x / sqrt(var + eps)
    cold = _python(_EVAL, NUMBA_CACHE_DIR=str(tmp_path))
    assert cold.returncode == 0, cold.stderr
    lines = cold.stderr.splitlines()
    assert len(lines) == 1, cold.stderr
    assert re.fullmatch(
        r"fastbn: compiling forward_eval \(float64, serial target\) for this machine, "
        r"about \d+ s; this happens once per machine and Numba version \(cached in .+\)\. "
        r"Silence: FASTBN_QUIET_COMPILE=1 or fastbn\.set_compile_notice\(False\); "
        r"compile ahead: python -m fastbn warmup",
        lines[0],
    ), lines[0]
    assert str(tmp_path) in lines[0]
    warm = _python(_EVAL, NUMBA_CACHE_DIR=str(tmp_path))
    assert warm.returncode == 0 and warm.stderr == ""
    value, relu_compiled = cold.stdout.splitlines()
    assert float(value) == pytest.approx(expected, rel=1e-12)
    assert warm.stdout == cold.stdout
    # a call without activation="relu" compiles no ReLU loop (jit.relu_pair)
    assert relu_compiled == "[]"


class _FakeDispatcher:
    """What the listener reads of a Numba dispatcher: ``py_func``."""

    def __init__(self, name, module="fastbn._kernels.ops"):
        def fn():
            pass

        fn.__name__, fn.__module__ = name, module
        self.py_func = fn


F32, F64 = types.Array(types.float32, 1, "C"), types.Array(types.float64, 1, "C")


@pytest.fixture
def notice(monkeypatch):
    """A clean notice state, restored afterwards."""
    monkeypatch.setitem(_compile_notice._state, "enabled", True)
    monkeypatch.setitem(_compile_notice._state, "first", True)
    monkeypatch.setattr(_compile_notice, "_printed", set())
    monkeypatch.setattr(_compile_notice._local, "depth", 0, raising=False)


def _compile(name, args, module="fastbn._kernels.ops", nested=()):
    _compile_notice._on_start({"dispatcher": _FakeDispatcher(name, module), "args": args})
    for inner in nested:
        _compile(*inner)
    _compile_notice._on_end()


def test_notice_once_per_operation_dtype_and_target(notice, capsys):
    # the plan (int64) and running tuple (floats, float64 counts) do not make it float64
    running = types.Tuple((F32, F32, types.float64, types.boolean))
    plan, counts = types.Array(types.int64, 1, "C"), F64
    _compile("forward_train_parallel", (plan, counts, F32, F32, running), nested=[("x", (F64,))])
    _compile("forward_train_parallel", (plan, counts, F32, running))  # same key: silent
    _compile("forward_train_serial", (plan, F64, F64))
    _compile("helper", (F64,), module="user_code")  # not fastbn's
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("fastbn: compiling forward_train (float32, parallel target)")
    assert "FASTBN_QUIET_COMPILE=1" in lines[0] and "python -m fastbn warmup" in lines[0]
    assert lines[1] == (
        "fastbn: compiling forward_train (float64, serial target) for this machine, "
        "about 5 s (once; cached)"
    )


def test_notice_silenced(notice, capsys, monkeypatch):
    fastbn.set_compile_notice(False)
    assert not _compile_notice.compile_notice_enabled()
    _compile("backward_serial", (F32,))
    assert capsys.readouterr().err == ""
    with pytest.raises(TypeError, match="enabled must be a bool"):
        fastbn.set_compile_notice("no")
    for value, quiet in [("1", True), ("yes", True), ("0", False), ("", False), ("no", False)]:
        monkeypatch.setenv("FASTBN_QUIET_COMPILE", value)
        assert _compile_notice._quiet_from_environment() is quiet


def test_listener_is_installed_and_fastbn_sees_real_dispatchers():
    assert _compile_notice.INSTALLED
    backward = ops.TARGETS["backward"]
    assert _compile_notice._is_fastbn(backward[True, False, False])
    key = _compile_notice._describe(backward[True, False, False], (types.int64, F32, F64))
    assert key == ("backward", "float32", "parallel")
    key = _compile_notice._describe(backward[False, True, True], (types.int64, F64))
    assert key == ("backward", "float64", "serial, fused planes, with ReLU")


@pytest.mark.parametrize("itemsize", [4, 8])
def test_warmup_cases_reach_every_target(itemsize):
    """The warmup's shapes still make the plans they are meant to (``_plan``'s thresholds)."""
    seen = set()
    for family, target, shape in _warmup.CASES:
        outer, C, inner = shape if len(shape) == 3 else (*shape, 1)
        plan = _plan.Plan(outer, C, inner, itemsize)
        got_family = "rows" if inner == 1 else "fused planes" if plan.fused else "planes"
        assert (got_family, plan.parallel) == (family, target == "parallel"), shape
        seen.add((family, target))
    assert len(seen) == 6


def test_warmup_arguments():
    with pytest.raises(ValueError, match="dtype must be one of"):
        fastbn.warmup("float16")
    with pytest.raises(TypeError, match="serial_only must be a bool"):
        fastbn.warmup(serial_only="yes")
    with pytest.raises(TypeError, match="quiet must be a bool"):
        fastbn.warmup(quiet=1)
    with pytest.raises(TypeError, match="relu must be a bool"):
        fastbn.warmup(relu="relu")


def test_warmup_in_process(capsys):
    before = _compile_notice.compile_notice_enabled()
    result = fastbn.warmup("float32", serial_only=True)
    assert _compile_notice.compile_notice_enabled() == before
    assert [s[:3] for s in result["steps"]] == [
        ("float32", "rows", "serial"),
        ("float32", "planes", "serial"),
        ("float32", "fused planes", "serial"),
    ]
    assert result["seconds"] >= sum(s[3] for s in result["steps"])
    err = capsys.readouterr().err.splitlines()
    assert [line[:21] for line in err[:3]] == ["fastbn warmup: [ 1/3]"] + [
        f"fastbn warmup: [ {i}/3]" for i in (2, 3)
    ]
    assert err[3].startswith("fastbn warmup: done in")
    again = fastbn.warmup("float32", serial_only=True, quiet=True)
    assert again["compiled"] == 0  # all in memory now
    assert capsys.readouterr().err == ""


def test_warmup_relu_reaches_the_relu_targets(capsys):
    from fastbn._kernels import ops

    result = fastbn.warmup("float32", serial_only=True, relu=True)
    assert [s[5] for s in result["steps"]] == [None] * 3 + ["relu"] * 3
    err = capsys.readouterr().err.splitlines()
    assert sum(" ReLU:" in line for line in err) == 3, err
    targets = [("forward_train", True), ("forward_train", False), ("forward_eval", False)]
    for name, fused in targets + [("backward", True), ("backward", False)]:
        assert ops.TARGETS[name][False, fused, True].signatures, (name, fused)


_LOOP = textwrap.dedent(
    """
    import json
    import numpy as np
    import fastbn
    from fastbn import _warmup
    rng = np.random.default_rng(1)
    for dtype in (np.float32, np.float64):
        for shape in [(32, 10), (256, 1024), (8, 16, 6, 6), (64, 64, 28, 28), (1000, 64)]:
            x = rng.standard_normal(shape).astype(dtype)
            bn = fastbn.BatchNorm(shape[1], dtype=dtype)
            y = bn(x)
            dx = bn.backward(np.ones_like(y))
            bn.eval()
            bn.backward(np.ones_like(bn(x)))
            y, c = fastbn.batch_norm(np.moveaxis(x, 1, -1), axis=-1)  # channels-last, no affine
            fastbn.batch_norm_backward(y, c)
    print(json.dumps(_warmup.kernel_cache_stats()))
    """
)


def test_after_warmup_a_training_loop_compiles_nothing():
    """``python -m fastbn warmup`` (this session's cache), then a fresh process running
    training loops over both dtypes, every family and both targets: Numba's dispatcher
    stats count no compilation, only loads."""
    warm = subprocess.run(
        [sys.executable, "-m", "fastbn", "warmup", "--dtype", "both"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert warm.returncode == 0, warm.stderr
    lines = warm.stderr.splitlines()
    assert len(lines) == 13 and lines[-1].startswith("fastbn warmup: done in"), warm.stderr
    assert all(re.match(r"fastbn warmup: \[\s*\d+/12\] float(32|64) ", s) for s in lines[:-1])
    loop = _python(_LOOP)
    assert loop.returncode == 0, loop.stderr
    stats = json.loads(loop.stdout.splitlines()[-1])
    assert stats["compiled"] == 0 and stats["loaded"] > 0, stats
    assert loop.stderr == ""  # nothing compiled, so no notice
