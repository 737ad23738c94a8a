"""The benchmark suite (issue #6): our JAX models, HF transformers on PyTorch (eager and
``torch.compile``) and our NumPy reference, measured side by side on the same weights.

Modules: ``flops`` (analytic FLOP / byte counts), ``hardware`` (published and measured peaks,
bandwidth, peak memory), ``timing``, ``workloads`` (configs, batches, shared weights), one module
per side (``jax_side``, ``torch_side``, ``numpy_side``), ``suite`` (one run), ``plans`` (named
runs and the issue's targets), ``report`` (JSON / Markdown / PNG) and ``cli``
(``bigmodel bench``; ``benchmarks/bench.py`` is a thin entry script to the same code).
"""
