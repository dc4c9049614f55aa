"""``BatchNorm``: a batch-normalization layer for NumPy networks.

Mirrors ``torch.nn.BatchNorm1d/2d/3d`` (one class: the channel axis is a
parameter), with explicit ``forward``/``backward`` in place of autograd.
"""

import numpy as np

from .functional import batch_norm, batch_norm_backward

__all__ = ["BatchNorm"]


class BatchNorm:
    """Batch normalization over channel ``axis`` of inputs with ``num_features`` channels.

    Parameters
    ----------
    num_features : int
        C, the size of the channel axis.
    eps : float
        Added to the variance for stability.
    momentum : float in [0, 1] or None
        Running statistics update factor; None means a cumulative moving average
        (factor ``1 / num_batches_tracked``).
    affine : bool
        Learn ``gamma`` (init 1) and ``beta`` (init 0). False: no scale/shift.
    track_running_stats : bool
        Keep ``running_mean`` (init 0) and ``running_var`` (init 1) for eval mode.
        False: eval mode normalizes with batch statistics too.
    axis : int
        Channel axis of the inputs (1 for ``(N, C, ...)``, -1 for channels-last).
    dtype : float32 or float64
        dtype of the parameters and running statistics.

    Usage: ``y = bn(x)`` (or ``bn.forward(x)``), then ``dx = bn.backward(dy)``,
    which sets ``bn.dgamma``/``bn.dbeta`` (also in ``bn.grads``). ``bn.train()`` and
    ``bn.eval()`` switch mode; ``bn.params`` maps names to the parameter arrays
    that an optimizer updates in place.
    """

    def __init__(
        self,
        num_features,
        *,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        axis=1,
        dtype=np.float32,
    ):
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)):
            raise TypeError(f"num_features must be an int, got {type(num_features).__name__}")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        if momentum is not None and not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
        if not float(eps) > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = axis
        self.dtype = dtype
        self.training = True
        C = self.num_features
        self.gamma = np.ones(C, dtype) if self.affine else None
        self.beta = np.zeros(C, dtype) if self.affine else None
        self.dgamma = None
        self.dbeta = None
        if self.track_running_stats:
            self.running_mean = np.zeros(C, dtype)
            self.running_var = np.ones(C, dtype)
        else:
            self.running_mean = None
            self.running_var = None
        self.num_batches_tracked = 0
        self._cache = None

    # -- mode -------------------------------------------------------------------
    def train(self, mode=True):
        """Training mode (batch statistics, running stats updated). Returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Evaluation mode (running statistics). Returns self."""
        return self.train(False)

    # -- compute ----------------------------------------------------------------
    def forward(self, x, *, out=None):
        """Normalize ``x`` (shape ``(N, C, ...)`` or channels-last per ``axis``) -> ``y``."""
        use_batch_stats = self.training or not self.track_running_stats
        momentum = self.momentum
        update = self.training and self.track_running_stats
        if update:
            self.num_batches_tracked += 1
            if momentum is None:
                momentum = 1.0 / self.num_batches_tracked
        y, self._cache = batch_norm(
            x,
            self.gamma,
            self.beta,
            training=use_batch_stats,
            running_mean=self.running_mean if (update or not use_batch_stats) else None,
            running_var=self.running_var if (update or not use_batch_stats) else None,
            momentum=momentum if momentum is not None else 0.0,
            eps=self.eps,
            axis=self.axis,
            out=out,
        )
        return y

    __call__ = forward

    def backward(self, dy, *, out=None):
        """Gradient w.r.t. the last forward's input; sets ``dgamma``/``dbeta``."""
        if self._cache is None:
            raise RuntimeError("BatchNorm.backward called before forward")
        dx, self.dgamma, self.dbeta = batch_norm_backward(dy, self._cache, out=out)
        return dx

    # -- parameters and state ----------------------------------------------------
    @property
    def params(self):
        """``{"gamma": gamma, "beta": beta}`` (empty when not affine)."""
        return {"gamma": self.gamma, "beta": self.beta} if self.affine else {}

    @property
    def grads(self):
        """``{"gamma": dgamma, "beta": dbeta}`` from the last backward (empty when not affine)."""
        return {"gamma": self.dgamma, "beta": self.dbeta} if self.affine else {}

    def state_dict(self):
        """Copies of the parameters and running statistics (PyTorch's names too)."""
        state = {}
        if self.affine:
            state["gamma"] = self.gamma.copy()
            state["beta"] = self.beta.copy()
        if self.track_running_stats:
            state["running_mean"] = self.running_mean.copy()
            state["running_var"] = self.running_var.copy()
            state["num_batches_tracked"] = self.num_batches_tracked
        return state

    def load_state_dict(self, state):
        """Load what ``state_dict`` returned; shapes must match. PyTorch's ``weight``
        and ``bias`` keys are accepted for ``gamma`` and ``beta``."""
        state = dict(state)
        if "weight" in state and "gamma" not in state:
            state["gamma"] = state.pop("weight")
        if "bias" in state and "beta" not in state:
            state["beta"] = state.pop("bias")
        expected = set(self.state_dict())
        missing = expected - set(state)
        unexpected = set(state) - expected
        if missing or unexpected:
            raise KeyError(
                f"state_dict mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        for name in ("gamma", "beta", "running_mean", "running_var"):
            if name in state:
                value = np.asarray(state[name])
                target = getattr(self, name)
                if value.shape != target.shape:
                    raise ValueError(f"{name} must have shape {target.shape}, got {value.shape}")
                target[...] = value  # in place: optimizers keep their references
        if "num_batches_tracked" in state:
            self.num_batches_tracked = int(state["num_batches_tracked"])

    def __repr__(self):
        return (
            f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
            f"axis={self.axis}, dtype={self.dtype.name})"
        )
