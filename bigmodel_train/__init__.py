"""Training pipeline shared by the JAX and NumPy-reference trainers: data, metrics, checkpoints."""
