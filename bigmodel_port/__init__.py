"""Porting layer shared by both implementations: HuggingFace-format checkpoints, tokenizers,
our native weight files and the per-layer divergence report.

Imports no autograd framework (numpy, safetensors, tokenizers; torch only when reading a
``pytorch_model.bin``), so ``reference_numpy``'s model classes can use it without jax.
HuggingFace parameter names are translated in exactly one place: ``bigmodel_port.hf.<arch>``.
"""

from bigmodel_port.errors import CheckpointError, ModelNotFoundError
from bigmodel_port.paths import local_model_dir

__all__ = ["CheckpointError", "ModelNotFoundError", "local_model_dir"]
