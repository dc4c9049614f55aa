"""The examples MLP with batch norm and ReLU fused in one layer, against the two layers."""

import numpy as np
import pytest

import fastbn
from fastbn.examples import mlp
from fastbn.examples.folded import fold_mlp


def _train(fuse_relu, batch_norm="fastbn", steps=5, seed=3):
    rng = np.random.default_rng(seed)
    x, t = rng.standard_normal((64, 10)), rng.integers(0, 4, 64)
    net = mlp.MLP(
        10, [32, 16], 4, weight_scale="he", batch_norm=batch_norm, seed=seed, fuse_relu=fuse_relu
    )
    opt = mlp.SGD(net.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        idx = rng.choice(64, 32, replace=False)
        losses.append(net.loss(x[idx], t[idx]))
        net.backward()
        opt.step(net.gradients())
    return net, np.array(losses), x


def test_layers_of_the_fused_and_unfused_networks():
    fused = mlp.MLP(4, [5, 6], 2, weight_scale=1.0, batch_norm="fastbn")
    plain = mlp.MLP(4, [5, 6], 2, weight_scale=1.0, batch_norm="fastbn", fuse_relu=False)
    inner = [getattr(layer, "layer", layer) for layer in fused.layers]
    assert [type(layer) for layer in inner] == [mlp.Affine, fastbn.BatchNorm] * 2 + [mlp.Affine]
    assert all(bn.layer.activation == "relu" for bn in fused.bn_layers)
    kinds = [type(getattr(layer, "layer", layer)) for layer in plain.layers]
    assert kinds == [mlp.Affine, fastbn.BatchNorm, mlp.ReLU] * 2 + [mlp.Affine]
    assert all(bn.layer.activation is None for bn in plain.bn_layers)
    # without batch norm there is nothing to fuse
    none = mlp.MLP(4, [5], 2, weight_scale=1.0)
    assert [type(layer) for layer in none.layers] == [mlp.Affine, mlp.ReLU, mlp.Affine]


@pytest.mark.parametrize("batch_norm", ["fastbn", "reference"])
def test_fused_and_unfused_networks_train_alike(batch_norm):
    """Same initial weights, same batches: the losses of 5 SGD steps, the trained
    parameters and the eval-mode predictions agree (float64)."""
    fused, losses_fused, x = _train(True, batch_norm)
    plain, losses_plain, _ = _train(False, batch_norm)
    assert losses_fused[-1] < losses_fused[0]  # it trains
    np.testing.assert_allclose(losses_fused, losses_plain, rtol=0, atol=1e-12)
    for p, q in zip(fused.parameters(), plain.parameters()):
        np.testing.assert_allclose(p, q, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(fused.predict(x), plain.predict(x))


def test_fused_network_against_the_reference_composition():
    """fastbn's fused layer against ``ReferenceBatchNorm`` + NumPy ReLU (naive formulas)."""
    _, losses_fast, _ = _train(True, "fastbn")
    _, losses_ref, _ = _train(False, "reference")
    np.testing.assert_allclose(losses_fast, losses_ref, rtol=0, atol=1e-10)


def test_fused_network_folds_to_affine_relu():
    """Folding keeps the ReLU of a fused layer: the folded network predicts what the
    eval-mode network predicts, with logits within 1e-12."""
    net, _, x = _train(True)
    fast = fold_mlp(net)
    assert [type(layer) for layer in fast.layers] == [mlp.Affine, mlp.ReLU] * 2 + [mlp.Affine]
    net.eval()
    np.testing.assert_allclose(fast.forward(x), net.forward(x), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(fast.predict(x), net.predict(x))


def test_reference_batchnorm_relu_is_the_composition():
    rng = np.random.default_rng(0)
    ref = mlp.ReferenceBatchNorm(7, dtype=np.float64, activation="relu")
    plain = mlp.ReferenceBatchNorm(7, dtype=np.float64)
    x, dy = rng.standard_normal((16, 7)), rng.standard_normal((16, 7))
    y_bn = plain(x)
    y = ref(x)
    np.testing.assert_array_equal(y, np.maximum(y_bn, 0))
    np.testing.assert_array_equal(ref.backward(dy), plain.backward(dy * (y_bn > 0)))
    np.testing.assert_array_equal(ref.dbeta, plain.dbeta)
