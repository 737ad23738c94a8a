"""Test set-up: x64 JAX (so float64 parity is possible), hypothesis profiles.

Profiles: ``ci`` (default; bounded examples, no deadline, so a slow compile never flakes) and
``thorough`` (many examples) selected with ``BIGMODEL_HYPOTHESIS_PROFILE=thorough``.
"""

from __future__ import annotations

import os

import jax
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)

# No network at run time: transformers / huggingface_hub must never try the hub in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("BIGMODEL_HYPOTHESIS_PROFILE", "ci"))
