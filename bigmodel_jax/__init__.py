"""bigmodel-jax: Transformer models in JAX + Flax, checked against the NumPy reference."""

from bigmodel_jax.tree import to_jax, to_numpy
from reference_numpy.version import __version__

__all__ = ["__version__", "to_jax", "to_numpy"]
