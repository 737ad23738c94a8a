"""Tasks: what one family trains on, how its loss is computed on each backend, how it is scored.

One module per task, on the shared ``Task`` interface of ``bigmodel_train.tasks.task`` (which
also holds the one table dispatching on the model family) and the splits of
``bigmodel_train.tasks.splits``:

===============  ==========================  ===================================================
task             model                       data (built-in) / metrics
===============  ==========================  ===================================================
lm               GPT / Llama (GPTConfig)     stdlib source, BPE or bytes / loss, perplexity,
                                             next-token top-1 / top-5 accuracy, a sample
classification   BERT seq. classification    stdlib docstrings by package / accuracy, P/R/F1
                 (MiniLM fine-tuning)        micro, macro, per class, confusion matrix, top-k
translation      encoder-decoder             number words EN -> other / loss, exact match and
                                             BLEU of greedy decoding
image            ViT                         8x8 digits (shipped) / accuracy, P/R/F1, confusion
                                             matrix, top-k
===============  ==========================  ===================================================
"""

from __future__ import annotations

import os

from bigmodel_train.config import RunConfig
from bigmodel_train.tasks.classification import ClassificationTask, classification_metrics
from bigmodel_train.tasks.image import ImageTask
from bigmodel_train.tasks.lm import ByteTokenizer, LMTask
from bigmodel_train.tasks.splits import ArraySplit, Split, eval_batches
from bigmodel_train.tasks.task import FAMILIES, Task
from bigmodel_train.tasks.translation import TranslationTask
from reference_numpy.losses import IGNORE_INDEX

__all__ = ["Split", "ArraySplit", "Task", "LMTask", "ClassificationTask", "TranslationTask", "ImageTask",
           "build_task", "ByteTokenizer", "IGNORE_INDEX", "FAMILIES", "TASK_CLASSES", "classification_metrics",
           "eval_batches"]

TASK_CLASSES: dict[str, type[Task]] = {
    "lm": LMTask, "classification": ClassificationTask, "translation": TranslationTask, "image": ImageTask,
}


def build_task(cfg: RunConfig, run_dir: str | os.PathLike[str] | None = None) -> Task:
    """The task of ``cfg``; artifacts saved in ``run_dir`` (tokenizer, vocabulary, label names)
    are reused, so a resumed or evaluated run sees exactly the training-time preprocessing."""
    return TASK_CLASSES[cfg.task](cfg, run_dir)
