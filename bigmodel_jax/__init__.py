"""bigmodel-jax: Transformer models in JAX + Flax, checked against the NumPy reference."""

from bigmodel_jax.tree import to_jax, to_numpy

__all__ = ["to_jax", "to_numpy"]
__version__ = "0.1.0"
