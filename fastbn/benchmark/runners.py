"""The implementations under test, each as a zero-argument callable over one case's data.

``reference``   ``fastbn.reference``, the naive NumPy layer (the baseline);
``fastbn``      ``fastbn.batch_norm`` / ``batch_norm_backward`` allocating their outputs
                (``fastbn.BatchNorm``'s ``forward`` / ``backward`` for a layer case);
``fastbn_out``  the same writing into preallocated ``out=`` arrays;
``torch``       ``torch.nn.functional.batch_norm`` + autograd, when torch is importable,
                run with the same number of threads, on the same memory layout;
``copyto``      ``np.copyto`` of ``x``'s bytes into a preallocated array (small cases);
                it returns that array.

Fusion (when ``fastbn.batch_norm`` takes ``activation=``): ``relu`` / ``relu_out`` the
fused batch norm + ReLU, ``unfused`` fastbn's batch norm then NumPy's ReLU, forward
``np.maximum(y, 0)`` and backward ``dy * (y > 0)`` (allocating both), ``torch_relu``
torch's ``batch_norm`` then ``relu``.

Every runner returns what its operation computes: ``(y, cache)`` forward, ``(dx, dgamma,
dbeta)`` backward, so that tests can check that it does what it claims.
"""

import inspect

import numpy as np

from .. import functional, layer
from .. import reference as ref
from .cases import torch_or_none

FUSION_IMPLS = ("relu", "relu_out", "unfused", "torch_relu")


def fusion_available(fn=None):
    """True when ``fn`` (default ``fastbn.batch_norm``) takes ``activation=``."""
    fn = functional.batch_norm if fn is None else fn
    try:
        return "activation" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to inspect
        return False


def make_runner(impl, op, case, data, *, threads=None):
    """A zero-argument callable that performs ``op`` with ``impl`` on ``data``, or None
    when ``impl`` is not available (torch not installed, fusion not in this fastbn)."""
    if impl in ("torch", "torch_relu"):
        return _torch_runner(op, case, data, threads, relu=impl == "torch_relu")
    if impl == "copyto":
        src = np.ascontiguousarray(data["x"])
        dst = np.empty_like(src)

        def copy():
            np.copyto(dst, src)
            return dst

        return copy
    if impl in ("relu", "relu_out", "unfused") and not fusion_available():
        return None
    kinds = {
        "reference": ("reference", False, None),
        "fastbn": ("fastbn", False, None),
        "fastbn_out": ("fastbn", True, None),
        "relu": ("fastbn", False, "relu"),
        "relu_out": ("fastbn", True, "relu"),
        "unfused": ("fastbn", False, "numpy_relu"),
    }
    if impl not in kinds:
        raise ValueError(f"unknown implementation {impl!r}")
    source, with_out, activation = kinds[impl]
    if case.layer and source == "fastbn":
        calls = _LayerCalls(case, data, with_out, activation)
    else:
        calls = _FunctionalCalls(case, data, with_out, activation, source == "reference")
    return _compose(op, calls, data["dy"])


def _compose(op, calls, dy):
    if op == "forward_train":
        return lambda: calls.forward(True)
    if op == "forward_eval":
        return lambda: calls.forward(False)
    if op == "backward":
        _, cache = calls.forward(True, update=False)
        return lambda: calls.backward(dy, cache)
    if op == "forward_backward":

        def run():
            _, cache = calls.forward(True)
            return calls.backward(dy, cache)

        return run
    raise ValueError(f"unknown operation {op!r}")


class _FunctionalCalls:
    """``batch_norm`` / ``batch_norm_backward`` (fastbn's or the reference's) on one case;
    ``activation`` is None, ``"relu"`` (fused) or ``"numpy_relu"`` (NumPy after fastbn)."""

    def __init__(self, case, data, with_out, activation, reference):
        self.fwd = ref.batch_norm if reference else functional.batch_norm
        self.bwd = ref.batch_norm_backward if reference else functional.batch_norm_backward
        self.data, self.axis = data, case.axis
        self.y_out = np.empty_like(data["x"]) if with_out else None
        self.dx_out = np.empty_like(data["x"]) if with_out else None
        self.fused = activation == "relu"
        self.numpy_relu = activation == "numpy_relu"

    def forward(self, training, update=True):
        d = self.data
        kw = {"axis": self.axis, "out": self.y_out}
        if self.fused:
            kw["activation"] = "relu"
        if update or not training:
            kw.update(running_mean=d["running_mean"], running_var=d["running_var"])
        y, cache = self.fwd(d["x"], d["gamma"], d["beta"], training=training, **kw)
        if self.numpy_relu:
            y = np.maximum(y, 0)
            cache = (cache, y)
        return y, cache

    def backward(self, dy, cache):
        if self.numpy_relu:
            cache, y = cache
            dy = dy * (y > 0)
        return self.bwd(dy, cache, out=self.dx_out)


class _LayerCalls:
    """``fastbn.BatchNorm``'s ``forward`` / ``backward`` on one case; the layer holds the
    case's ``gamma``, ``beta`` and running statistics."""

    def __init__(self, case, data, with_out, activation):
        kw = {"activation": "relu"} if activation == "relu" else {}
        bn = layer.BatchNorm(case.C, axis=case.axis, dtype=data["x"].dtype, **kw)
        bn.load_state_dict(
            {k: data[k] for k in ("gamma", "beta", "running_mean", "running_var")}
            | {"num_batches_tracked": 0}
        )
        self.bn, self.x = bn, data["x"]
        self.y_out = np.empty_like(self.x) if with_out else None
        self.dx_out = np.empty_like(self.x) if with_out else None
        self.numpy_relu = activation == "numpy_relu"

    def forward(self, training, update=True):
        self.bn.train(training)
        y = self.bn.forward(self.x, out=self.y_out)
        if self.numpy_relu:
            y = np.maximum(y, 0)
        return y, y  # the layer keeps its own cache; y is what a NumPy ReLU backward needs

    def backward(self, dy, y):
        if self.numpy_relu:
            dy = dy * (y > 0)
        dx = self.bn.backward(dy, out=self.dx_out)
        return dx, self.bn.dgamma, self.bn.dbeta


def _torch_tensors(torch, case, data):
    """``x``, ``dy`` with the channel axis at 1 and the case's memory (an NHWC array
    becomes a ``channels_last`` tensor), and copies of the per-channel arrays."""
    channels_last = case.channels_last or (len(case.shape) == 4 and case.axis in (-1, 3))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def tensor(a):
        nc = np.ascontiguousarray(np.moveaxis(a, case.axis, 1))
        return torch.from_numpy(nc).contiguous(memory_format=memory_format)

    names = ("gamma", "beta", "running_mean", "running_var")
    per_channel = {k: torch.from_numpy(data[k].copy()) for k in names}
    return tensor(data["x"]), tensor(data["dy"]), per_channel


def _torch_runner(op, case, data, threads, *, relu=False):
    torch = torch_or_none()
    if torch is None:
        return None
    if threads is not None:
        torch.set_num_threads(threads)
    F = torch.nn.functional
    x, dy, p = _torch_tensors(torch, case, data)
    rm, rv = p["running_mean"], p["running_var"]

    def bn(x, gamma, beta, training, stats=True):
        y = F.batch_norm(x, rm if stats else None, rv if stats else None, gamma, beta, training)
        return F.relu(y) if relu else y

    if op in ("forward_train", "forward_eval"):
        training = op == "forward_train"

        def run():
            with torch.no_grad():
                return bn(x, p["gamma"], p["beta"], training)

        return run
    xg, gg, bg = (t.detach().requires_grad_(True) for t in (x, p["gamma"], p["beta"]))
    if op == "backward":
        y = bn(xg, gg, bg, True, stats=False)
        return lambda: torch.autograd.grad(y, (xg, gg, bg), dy, retain_graph=True)
    if op == "forward_backward":
        return lambda: torch.autograd.grad(bn(xg, gg, bg, True), (xg, gg, bg), dy)
    raise ValueError(f"unknown operation {op!r}")
