"""JAX layers: pure functions taking the reference's parameter trees, plus Flax linen modules."""
