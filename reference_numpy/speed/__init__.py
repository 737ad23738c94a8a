"""Performance helpers of the NumPy reference: how the math is run fast, not the math.

The layer and model files read as equations; what they call from here computes exactly what the
plain NumPy expression would (the tests in ``tests/test_reference_kernels.py`` check it), only
faster on a CPU:

* ``contract``: ``einsum`` / ``rows_matmul``, two-operand contractions as one BLAS call on views
  instead of ``np.einsum``'s own loop or its transposing copies.
* ``chunks``: elementwise formulas evaluated a cache-sized chunk at a time on several threads
  (``BIGMODEL_NUMPY_THREADS`` sets the count; by default the CPUs this process may use).
* ``allocator``: ``keep_freed_memory()``, a glibc ``mallopt`` switch that keeps freed memory for
  reuse. It changes process-wide state, so nothing calls it on import or by default: the NumPy
  trainer backend calls it only when asked (``BIGMODEL_NUMPY_KEEP_FREED_MEMORY=1``) and the
  benchmark suite calls it for its NumPy side and records that it did.

Measurements that motivated each helper are in ``benchmarks/results/README.md``.
"""
