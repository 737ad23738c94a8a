"""Applications on top of the stack: the ``bigmodel`` command line (``bigmodel_apps.cli``), the
benchmark suite (``bigmodel_apps.bench``) and the NumPy-vs-JAX parity report
(``bigmodel_apps.parity``).

The top of the package stack (see the README's "Layout"): it may import ``bigmodel_train``,
``bigmodel_port``, ``bigmodel_jax`` and ``reference_numpy``; nothing imports it.
"""
