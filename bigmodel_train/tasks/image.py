"""Task ``image``: ViT image classification on NCHW float images (scaled to [0, 1]), by default
the shipped 8x8 digits (UCI optdigits, as bundled by scikit-learn), or a user's ``.npz`` /
``.npy`` files (read lazily, memory-mapped).
Metrics: those of the classification task.

Dims: N examples, B batch, C channels, H x W image size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_port.atomic import atomic_write_text
from bigmodel_train.config import ConfigError, RunConfig
from bigmodel_train.data.builtin import digits
from bigmodel_train.data.packing import stratified_split
from bigmodel_train.data.stream import ImageArrays
from bigmodel_train.tasks.classification import classification_metrics, collect_logits
from bigmodel_train.tasks.splits import ArraySplit, Split
from bigmodel_train.tasks.task import Task, model_base, with_model_overrides
from reference_numpy.configs import ViTConfig
from reference_numpy.tree import Tree

__all__ = ["ImageSplit", "ImageTask"]


class ImageSplit(Split):
    """Images read lazily from ``bigmodel_train.data.stream.ImageArrays`` (memory-mapped .npy)."""

    def __init__(self, images: Any, labels: np.ndarray, indices: np.ndarray, scale: float = 1.0) -> None:
        self.images, self.labels, self.indices, self.scale = images, labels, np.asarray(indices), scale

    def __len__(self) -> int:
        return int(self.indices.size)

    def batch(self, indices: Any) -> dict[str, np.ndarray]:
        rows = self.indices[np.asarray(indices)]
        px = self.images.get(rows) * np.float32(self.scale)
        return {"pixel_values": px.astype(np.float32), "labels": self.labels[rows].astype(np.int32)}


class ImageTask(Task):
    """ViT image classification on NCHW float images (scaled to [0, 1])."""

    unit = "images"

    def __init__(self, cfg: RunConfig, run_dir: str | os.PathLike[str] | None) -> None:
        super().__init__(cfg, run_dir)
        self._data: tuple[dict[str, Split], list[str], tuple[int, int, int]] | None = None
        saved = None if run_dir is None else Path(run_dir) / "labels.json"
        if saved is not None and saved.exists():
            meta = json.loads(saved.read_text(encoding="utf-8"))
            self.label_names, shape = meta["labels"], tuple(meta["image_shape"])
        else:
            _, self.label_names, shape = self.data()
        C, H, W = shape
        if H != W:
            raise ConfigError(f"ViT takes square images; data={cfg.data!r} has {H}x{W}")
        self.image_shape = shape
        base = model_base(cfg, ViTConfig)
        patch = cfg.model_overrides.get("patch_size", base.patch_size)
        if isinstance(patch, int) and patch > 0 and H % patch:  # said before ViTConfig's own, generic check
            raise ConfigError(f"image size {H} is not divisible by model.patch_size={patch}")
        self.model_config = with_model_overrides(base, cfg, num_labels=len(self.label_names), image_size=H,
                                                  n_channels=C)

    def data(self) -> tuple[dict[str, Split], list[str], tuple[int, int, int]]:
        if self._data is None:
            self._data = _image_data(self.cfg)
        return self._data

    def build_splits(self) -> dict[str, Split]:
        return self.data()[0]

    def save_artifacts(self) -> None:
        if self.run_dir is not None:
            atomic_write_text(self.run_dir / "labels.json",
                              json.dumps({"labels": self.label_names, "image_shape": list(self.image_shape)}))

    def jax_loss(self, params: Tree, batch: dict[str, Any], *, dropout_key: Any = None, masks: Any = None) -> Any:
        # pixels follow the parameters' dtype (bf16 under mixed precision)
        dtype = params["patch_embed"]["kernel"].dtype
        batch = {**batch, "pixel_values": batch["pixel_values"].astype(dtype)}
        return super().jax_loss(params, batch, dropout_key=dropout_key, masks=masks)

    def forward_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"pixel_values": batch["pixel_values"]}

    def evaluate(self, params: Tree, split: str = "val", backend: str = "jax", *, max_examples: int | None = None
                 ) -> dict[str, Any]:
        cap = self.cfg.max_eval_examples if max_examples is None else max_examples
        logits, labels = collect_logits(self, params, split, backend, cap)
        return classification_metrics(logits, labels, self.label_names)


def _image_data(cfg: RunConfig) -> tuple[dict[str, Split], list[str], tuple[int, int, int]]:
    """Splits, class names and (C, H, W) from the shipped 8x8 digits or the user's .npz / .npy files."""
    fractions = [1 - cfg.val_fraction - cfg.test_fraction, cfg.val_fraction, cfg.test_fraction]
    if cfg.data == "digits":
        # the built-in train / test split (stratified), then validation carved out of train
        ds = digits(test_fraction=cfg.test_fraction or 0.2, seed=cfg.seed)
        names = list(ds.class_names)
        val_share = cfg.val_fraction / (1 - (cfg.test_fraction or 0.2))
        tr, va = stratified_split(ds.y_train, [1 - val_share, val_share], cfg.seed)
        train = ArraySplit({"pixel_values": ds.x_train, "labels": ds.y_train.astype(np.int32)})
        splits: dict[str, Split] = {"train": train.subset(tr), "val": train.subset(va),
                                    "test": ArraySplit({"pixel_values": ds.x_test,
                                                        "labels": ds.y_test.astype(np.int32)})}
        shape = tuple(ds.x_train.shape[1:])
    else:
        spec = cfg.data.split(",")
        paths = [Path(p) for p in spec]
        for p in paths:
            if not p.is_file():
                raise ConfigError(f"data={cfg.data!r}: {p} does not exist (image task: 'digits', an .npz with "
                                  f"'images' and 'labels', or 'images.npy,labels.npy')")
        if len(paths) == 2 and paths[1].suffix == ".npy" and paths[0].suffix == ".npy":
            arrays = ImageArrays([paths[0]], label_paths=[paths[1]])
        else:
            arrays = ImageArrays(paths)
        if arrays.labels is None:
            raise ConfigError(f"data={cfg.data!r}: no labels (an .npz needs a 'labels' array; .npy images need "
                              f"a labels .npy: data=images.npy,labels.npy)")
        labels = arrays.labels
        n_classes = int(labels.max()) + 1
        names = [str(i) for i in range(n_classes)]
        parts = stratified_split(labels, fractions, cfg.seed)
        splits = {n: ImageSplit(arrays, labels, p) for n, p in zip(("train", "val", "test"), parts)}
        c, h, w = arrays.image_shape if arrays.layout == "NCHW" else (arrays.image_shape[2], *arrays.image_shape[:2])
        shape = (c, h, w)
    if not cfg.test_fraction:
        splits.pop("test", None)
    return splits, names, shape
