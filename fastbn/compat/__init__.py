"""Drop-in replacements for the two textbook NumPy batch-norm layers.

Most NumPy networks that use batch normalization are built around one of two
interfaces. Each has a submodule here that keeps that interface and its quirks (the
exact ``eps``, the momentum convention, the biased running variance, output dtypes,
which arrays are replaced or updated in place) and computes with fastbn's kernels:
the same numbers, no ``(N, D)`` intermediates kept between forward and backward.

``fastbn.compat.dlfs``
    ``BatchNormalization``, the layer class of the book "Deep Learning from Scratch"
    (``common/layers.py``): ``from fastbn.compat.dlfs import BatchNormalization``.
``fastbn.compat.cs231n``
    The functions of the CS231n assignments' ``layers.py``: ``batchnorm_forward``,
    ``batchnorm_backward``, ``batchnorm_backward_alt``, ``spatial_batchnorm_forward``,
    ``spatial_batchnorm_backward``: ``from fastbn.compat import cs231n``.

This package imports neither submodule: ``import fastbn.compat`` costs nothing.
"""

__all__ = ["dlfs", "cs231n"]
