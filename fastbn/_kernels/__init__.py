"""Numba kernels over the canonical ``(outer, C, inner)`` view of batch norm.

Every data array here is a flat, C-contiguous 1-D array; ``plan`` (int64, made by
``fastbn._plan.Plan``, rows named in ``layout``) gives its canonical 3-D shape and how the
work is cut into tasks. Two families of loops cover every layout: rows (``inner == 1``,
vectorized along a row of C channels) and planes (``inner > 1``, along one contiguous
``(o, c)`` plane); tiny planes run as rows of ``C * inner`` columns (``layout.FOLD``,
see ``fastbn._plan.TINY_PLANE_BYTES``), their columns merged per channel afterwards. A
task's cut depends on the shape only and partial results merge in block order, so the
bits are the same on 1 thread or many.

Modules, each one pass family (imports point down this list):

``jit``           decorators; serial and parallel targets made from one body
``layout``        the named rows of ``plan`` and of the coefficient array ``work``
``partition``     a task's ranges; how rows are swept
``stream``        streaming (non-temporal) stores as LLVM intrinsics
``moments``       statistics: shifted float64 sums per block, Chan's merge
``gradsums``      gradient sums ``sum(dy)``, ``sum(dy * (x - mean))`` per block, merged
``coefficients``  the elementwise pass's per-channel coefficients in the storage dtype
``affine``        the elementwise pass ``(x - m) * p + q (+ (dy - d) * g)``
``fused``         planes that fit in L2: statistics (or sums) then outputs, per channel
``ops``           whole operations (one dispatch each): forward_train, forward_eval,
                  backward, grad_sums, moments; ``*_serial`` and ``*_parallel`` targets
"""
