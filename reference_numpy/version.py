"""The version of bigmodel-jax: the one place it is written.

pyproject.toml reads it (``[tool.setuptools.dynamic]``, statically: the build does not import
it) and ``bigmodel --version`` prints it. The module imports nothing; importing it loads only the
``reference_numpy`` package (numpy), not jax, so ``--version`` answers in a fraction of a second.
"""

__version__ = "0.2.0"
