"""The examples MLP for inference, with every batch norm folded into the Affine before it.

``fold_mlp(net)`` (also ``net.folded()``) returns a ``FoldedMLP``: ``Affine -> ReLU`` blocks
whose weights absorbed the eval-mode ``BatchNorm`` (``fastbn.fold`` with ``out_axis=1``, the
``(fan_in, fan_out)`` layout of ``Affine``), then the final ``Affine``. It predicts what the
trained network predicts in eval mode, with one layer fewer per block.

>>> import numpy as np
>>> from fastbn.examples.mlp import MLP
>>> rng = np.random.default_rng(0)
>>> x = rng.standard_normal((64, 8))
>>> net = MLP(8, [16], 3, weight_scale="he", batch_norm="fastbn", seed=0)
>>> _ = net.forward(x)                      # a training step: running statistics move
>>> fast = net.folded()
>>> bool(np.array_equal(fast.predict(x), net.predict(x)))
True
"""

import numpy as np

import fastbn

from .mlp import Affine, ReLU, TimedLayer

__all__ = ["FoldedMLP", "fold_mlp"]


class FoldedMLP:
    """An inference-only network of ``Affine`` and ``ReLU`` layers (no batch norm).

    ``forward(x)``: ``x`` of shape ``(N, n_in)`` -> logits ``(N, n_out)``, float64.
    """

    def __init__(self, layers):
        self.layers = layers

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def predict(self, x, batch_size=2048):
        """Class predictions, batch by batch as ``MLP.predict`` does."""
        out = [
            np.argmax(self.forward(x[i : i + batch_size]), axis=1)
            for i in range(0, len(x), batch_size)
        ]
        return np.concatenate(out)

    def accuracy(self, x, labels):
        return float(np.mean(self.predict(x) == labels))


def fold_mlp(net):
    """A ``FoldedMLP`` equal to ``net`` in eval mode; ``net`` is left as it is.

    Each ``Affine`` followed by a batch norm (``fastbn.BatchNorm`` or ``ReferenceBatchNorm``,
    possibly inside a ``TimedLayer``) becomes one ``Affine`` with the folded weights; every
    other layer is copied, so training ``net`` further does not change the result.
    """
    layers = []
    pending = None  # the last Affine, until we know whether a batch norm follows
    for layer in net.layers:
        inner = layer.layer if isinstance(layer, TimedLayer) else layer
        if isinstance(inner, fastbn.BatchNorm):
            if pending is None:
                raise ValueError(f"{inner!r} does not follow an Affine layer: cannot fold it")
            pending = Affine(*fastbn.fold(pending.W, pending.b, inner, out_axis=1))
            if inner.activation == "relu":  # fold takes the normalization; the ReLU stays
                layers += [pending, ReLU()]
                pending = None
            continue
        if pending is not None:
            layers.append(pending)
            pending = None
        if isinstance(inner, Affine):
            pending = Affine(inner.W.copy(), inner.b.copy())
        elif isinstance(inner, ReLU):
            layers.append(ReLU())
        else:
            raise TypeError(f"fold_mlp does not know the layer {type(inner).__name__}")
    if pending is not None:
        layers.append(pending)
    return FoldedMLP(layers)
