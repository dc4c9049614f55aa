"""fastbn.examples: the NumPy MLP, the reference-backed layer, and the demo (python -m fastbn demo).

The demo's tests need the ``examples`` extra (scikit-learn, matplotlib) and skip without it.
"""

import importlib.util
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import fastbn
from fastbn.examples import mlp


def _digits(n_train):
    pytest.importorskip("sklearn")
    from fastbn.examples import load_digits

    return load_digits(n_train, seed=0)


def test_import_fastbn_needs_neither_sklearn_nor_matplotlib():
    code = (
        "import sys, fastbn, fastbn.examples, fastbn.examples.mlp, fastbn.examples.demo\n"
        "bad = [m for m in ('sklearn', 'matplotlib') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_extra_says_how_to_install(monkeypatch):
    from fastbn.examples import load_digits

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"needs scikit-learn.*pip install 'fastbn\[examples\]'"):
        load_digits()


def test_reference_batchnorm_matches_fastbn_batchnorm():
    rng = np.random.default_rng(0)
    fast = fastbn.BatchNorm(7, dtype=np.float64)
    ref = mlp.ReferenceBatchNorm(7, dtype=np.float64)
    for layer in (fast, ref):
        layer.gamma[:] = np.linspace(0.5, 2.0, 7)
        layer.beta[:] = np.linspace(-1.0, 1.0, 7)
    for _ in range(3):
        x = rng.standard_normal((16, 7)) * 3 + 1
        dy = rng.standard_normal((16, 7))
        np.testing.assert_allclose(ref(x), fast(x), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ref.backward(dy), fast.backward(dy), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(ref.dgamma, fast.dgamma, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ref.dbeta, fast.dbeta, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ref.running_var, fast.running_var, rtol=1e-12)
    assert ref.num_batches_tracked == fast.num_batches_tracked == 3
    fast.eval(), ref.eval()
    x = rng.standard_normal((5, 7))
    np.testing.assert_allclose(ref(x), fast(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch_norm", [None, "fastbn", "reference"])
def test_mlp_gradients_match_finite_differences(batch_norm):
    rng = np.random.default_rng(1)
    x, t = rng.standard_normal((12, 5)), rng.integers(0, 3, 12)
    net = mlp.MLP(5, [6, 4], 3, weight_scale=0.7, batch_norm=batch_norm, seed=2)
    for p in net.parameters():  # non-trivial gamma/beta and biases
        p += 0.1 * rng.standard_normal(p.shape)
    net.loss(x, t)
    net.backward()
    grads = [g.copy() for g in net.gradients()]
    h = 1e-6
    for p, g in zip(net.parameters(), grads):
        for i in rng.choice(p.size, min(p.size, 4), replace=False):
            old = p.flat[i]
            p.flat[i] = old + h
            up = net.loss(x, t)
            p.flat[i] = old - h
            down = net.loss(x, t)
            p.flat[i] = old
            assert abs((up - down) / (2 * h) - g.flat[i]) < 1e-6, (p.shape, i)


def test_adam_and_sgd_reduce_the_loss():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 8))
    t = np.argmax(x[:, :3], axis=1)
    for make in (lambda ps: mlp.SGD(ps, lr=0.1), lambda ps: mlp.Adam(ps, lr=1e-2)):
        net = mlp.MLP(8, [16, 16], 3, weight_scale="he", batch_norm="fastbn", seed=0)
        opt = make(net.parameters())
        first = net.loss(x, t)
        for _ in range(30):
            net.loss(x, t)
            net.backward()
            opt.step(net.gradients())
        assert net.loss(x, t) < 0.5 * first


def test_batch_norm_learns_at_a_poor_initial_scale_where_plain_sgd_does_not():
    data = _digits(500)
    acc = {}
    for batch_norm in ("fastbn", None):
        net = mlp.MLP(64, [100] * 5, 10, weight_scale=0.01, batch_norm=batch_norm, seed=1)
        hist = mlp.fit(
            net,
            mlp.SGD(net.parameters(), lr=0.1),
            *data,
            epochs=4,
            batch_size=50,
            seed=2,
            test_every_epoch=False,
        )
        assert len(hist.train_acc) == 5 and len(hist.test_acc) == 1
        acc[batch_norm] = hist.train_acc[-1]
    # measured: 0.92 with batch norm, 0.11 (chance) without
    assert acc["fastbn"] >= 0.8, acc
    assert acc["fastbn"] - acc[None] >= 0.5, acc


def test_demo_prints_the_summary_and_writes_the_figure(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from fastbn.examples import demo

    out = tmp_path / "demo.png"
    argv = ["--out", str(out), "--epochs", "2", "--scales", "2", "--train-size", "300"]
    argv += ["--overfit-size", "200", "--overfit-epochs", "2"]
    assert demo.main(argv) == 0
    assert out.stat().st_size > 10_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr()
    assert "with batch norm (fastbn)" in printed.out
    assert "time inside batch-norm calls" in printed.out
    assert "fastbn.reference" in printed.out
    assert "overfitting check" in printed.out
    assert "[ 2/2] weight scale" in printed.err  # progress on stderr


def test_demo_warm_up_loads_every_kernel_its_runs_call():
    """The demo times its batch-norm calls: the warm-up must load (or compile) every
    target that the runs' layers (BatchNorm fused with ReLU) then call, so that no
    timed call loads one. In a fresh interpreter: in this one, other tests may have
    loaded them already."""
    pytest.importorskip("sklearn")
    code = (
        "from fastbn.examples import demo\n"
        "from fastbn._kernels import ops\n"
        "def loaded():\n"
        "    return {(name, key) for name, targets in ops.TARGETS.items()\n"
        "            for key, target in targets.items() if target.overloads}\n"
        "config = demo.DemoConfig(epochs=1, scales=1, train_size=300, overfit_epochs=0)\n"
        "demo.warm_up(config)\n"
        "before = loaded()\n"
        "assert before, 'the warm-up loaded nothing'\n"
        "demo.sweep(config)\n"
        "missed = loaded() - before\n"
        "assert not missed, f'loaded inside the timed runs: {sorted(missed)}'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)


def test_demo_rejects_bad_options(capsys):
    from fastbn.examples import demo

    assert demo.main(["--scales", "0"]) == 2
    assert "--scales" in capsys.readouterr().err


def _bench_script(name):
    """A script of bench/ as a module (bench/ is not a package)."""
    path = pathlib.Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    if not path.exists():  # tests/ copied without the source tree (tox -e wheel)
        pytest.skip(f"no bench/{name}.py beside this tests/")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mlp_step_script_trains_each_kind():
    """bench/mlp_step.py (the README's whole-training figures): each kind trains the same
    network (fastbn and the reference reach the same accuracy on separable data), the
    time inside batch norm is part of the whole, and the 1-thread kind leaves the
    thread count as it was."""
    script = _bench_script("mlp_step")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 30)
    x = np.eye(10)[labels] @ rng.standard_normal((10, 64)) + 0.1 * rng.standard_normal((300, 64))
    threads = fastbn.get_num_threads()
    results = {kind: script.run(x, labels, kind) for kind in script.KINDS}
    assert fastbn.get_num_threads() == threads
    for seconds, inside, accuracy in results.values():
        assert 0 < inside < seconds
        assert accuracy > 0.9
    assert results["fastbn"][2] == results["reference"][2] == results["fastbn 1 thread"][2]
