"""Streaming data from files larger than memory, with exact checkpoint / resume.

Text files are read line by line and JSONL files record by record, lazily, through a small read
buffer. After every record the stream knows its ``position`` (epoch, file index, byte offset, line
number, records read); a new stream opened at that position yields exactly the records an
uninterrupted read would have yielded next. Images come from ``.npy`` files (memory-mapped, so only
the rows of a batch are read) and ``.npz`` archives.

Bad data raises ``DataError`` naming the file and the record: empty files, bytes that are not
valid in the encoding (with line and byte offset), invalid JSON (file:line), a missing JSONL field,
images of the wrong shape / dtype (file) or with non-finite values (file + index).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class DataError(ValueError):
    """Bad input data; the message names the file and the record (line, byte offset or index)."""

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None, line: int | None = None,
                 byte_offset: int | None = None, index: int | None = None) -> None:
        self.path = None if path is None else str(path)
        self.line, self.byte_offset, self.index = line, byte_offset, index
        where = []
        if line is not None:
            where.append(f"line {line}")
        if index is not None:
            where.append(f"index {index}")
        if byte_offset is not None:
            where.append(f"byte offset {byte_offset}")
        prefix = "" if self.path is None else self.path
        if where:
            prefix += (", " if prefix else "") + ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


def _as_paths(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], what: str) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = [Path(p) for p in paths]
    if not out:
        raise ValueError(f"{what} needs at least one file")
    missing = [str(p) for p in out if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{what}: files not found: {missing}")
    return out


# --------------------------------------------------------------------------------------------
# line streams


@dataclass(frozen=True)
class StreamPosition:
    """Where a line stream resumes: the next record starts at ``byte_offset`` of file
    ``file_index`` in pass ``epoch``. ``line`` counts the lines of that file already consumed (so
    error messages keep true line numbers after a resume) and ``records`` the records yielded in
    all (files and epochs). Save it with ``to_dict`` (plain ints, JSON-ready)."""

    epoch: int = 0
    file_index: int = 0
    byte_offset: int = 0
    line: int = 0
    records: int = 0

    def to_dict(self) -> dict[str, int]:
        """The fields as a dict of ints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> StreamPosition:
        """Inverse of ``to_dict``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown StreamPosition fields {sorted(unknown)}; expected {sorted(names)}")
        values = {k: data[k] for k in names if k in data}
        for k, v in values.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"StreamPosition.{k} must be a non-negative int, got {v!r}")
        return cls(**values)


class _LineStream:
    """Shared machinery of ``TextLineStream`` and ``JsonlStream``: subclasses parse one line."""

    kind = "line stream"

    def __init__(
        self,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        position: StreamPosition | dict[str, int] | None = None,
        epochs: int | None = 1,
        encoding: str = "utf-8",
        buffer_size: int = 1 << 20,
        max_line_bytes: int = 1 << 26,
        allow_empty_files: bool = False,
    ) -> None:
        self.paths = _as_paths(paths, self.kind)
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
            raise ValueError(f"epochs must be a positive int or None (forever), got {epochs!r}")
        if buffer_size < 1 or max_line_bytes < 1:
            raise ValueError(f"buffer_size and max_line_bytes must be >= 1, got {buffer_size}, {max_line_bytes}")
        self.epochs, self.encoding = epochs, encoding
        self.buffer_size, self.max_line_bytes = buffer_size, max_line_bytes
        self.allow_empty_files = allow_empty_files
        if isinstance(position, dict):
            position = StreamPosition.from_dict(position)
        self._position = position or StreamPosition()
        self._check_position(self._position)

    @property
    def position(self) -> StreamPosition:
        """Where the next record starts; pass it as ``position=`` to resume."""
        return self._position

    def _check_position(self, pos: StreamPosition) -> None:
        if pos.file_index >= len(self.paths):
            raise ValueError(f"position.file_index={pos.file_index} but the stream has {len(self.paths)} files")
        path = self.paths[pos.file_index]
        size = path.stat().st_size
        if pos.byte_offset > size:
            raise DataError(f"resume offset is past the end of the file ({size} bytes); did the file change?",
                            path=path, byte_offset=pos.byte_offset)
        if 0 < pos.byte_offset < size:
            with open(path, "rb") as f:
                f.seek(pos.byte_offset - 1)
                if f.read(1) != b"\n":
                    raise DataError("resume offset is not at the start of a line; did the file change?",
                                    path=path, byte_offset=pos.byte_offset)

    def _parse(self, text: str, path: Path, line: int) -> Any:
        """The record of one decoded line (without its line ending), or ``_SKIP``."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        pos = self._position
        epoch, file_index, offset, line, records = (pos.epoch, pos.file_index, pos.byte_offset, pos.line,
                                                    pos.records)
        while self.epochs is None or epoch < self.epochs:
            records_at_start = records if (file_index, offset) == (0, 0) else None
            while file_index < len(self.paths):
                path = self.paths[file_index]
                if offset == 0 and path.stat().st_size == 0 and not self.allow_empty_files:
                    raise DataError("empty file", path=path)
                with open(path, "rb", buffering=self.buffer_size) as f:
                    f.seek(offset)
                    while True:
                        raw = f.readline(self.max_line_bytes + 1)
                        if not raw:
                            break
                        start = offset
                        line += 1
                        offset += len(raw)
                        if len(raw) > self.max_line_bytes and not raw.endswith(b"\n"):
                            raise DataError(f"line is longer than max_line_bytes={self.max_line_bytes}",
                                            path=path, line=line, byte_offset=start)
                        body = raw[:-1] if raw.endswith(b"\n") else raw
                        if body.endswith(b"\r"):
                            body = body[:-1]
                        if start == 0 and body.startswith(b"\xef\xbb\xbf"):
                            body = body[3:]  # a UTF-8 byte-order mark is not part of the text
                        try:
                            text = body.decode(self.encoding)
                        except UnicodeDecodeError as e:
                            raise DataError(f"cannot decode as {self.encoding}: {e.reason} (bytes "
                                            f"{body[e.start:e.end]!r})", path=path, line=line,
                                            byte_offset=start + e.start) from None
                        record = self._parse(text, path, line)
                        if record is _SKIP:
                            self._position = StreamPosition(epoch, file_index, offset, line, records)
                            continue
                        records += 1
                        # Updated before the yield: a consumer that saves `position` after receiving
                        # this record resumes right after it.
                        self._position = StreamPosition(epoch, file_index, offset, line, records)
                        yield record
                file_index, offset, line = file_index + 1, 0, 0
                if file_index < len(self.paths):
                    self._position = StreamPosition(epoch, file_index, 0, 0, records)
            if self.epochs is None and records_at_start == records:
                raise DataError(f"a whole pass over {len(self.paths)} files gave no records; with epochs=None "
                                "the stream would loop forever")
            epoch, file_index = epoch + 1, 0
            self._position = StreamPosition(epoch, 0, 0, 0, records)


_SKIP = object()


class TextLineStream(_LineStream):
    """Lines of text files (line endings removed), lazily, resumable from ``position``.

    Args:
        paths: one file or a list, read in the given order.
        position: a ``StreamPosition`` (or its dict) to resume from.
        epochs: passes over the files (``None`` = forever).
        skip_blank: skip lines that are empty or whitespace only (still counted for line numbers).
        encoding: the files' text encoding; undecodable bytes raise ``DataError`` with file, line
            and byte offset.
        buffer_size: the read buffer in bytes (memory use does not grow with the file).
        max_line_bytes: a longer line is an error rather than an unbounded read.
        allow_empty_files: otherwise an empty file is an error.
    """

    kind = "TextLineStream"

    def __init__(self, paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
                 skip_blank: bool = False, **kwargs: Any) -> None:
        super().__init__(paths, **kwargs)
        self.skip_blank = skip_blank

    def _parse(self, text: str, path: Path, line: int) -> Any:
        return _SKIP if self.skip_blank and not text.strip() else text


class JsonlStream(_LineStream):
    """Records of JSON Lines files, lazily, resumable from ``position``.

    Blank lines are skipped. With ``field`` (a name or a list of names) each record must be a JSON
    object holding those fields and the stream yields the value (or a tuple of values); without it,
    the parsed JSON value. Invalid JSON and missing fields raise ``DataError`` with file and line.
    Other arguments as ``TextLineStream``.
    """

    kind = "JsonlStream"

    def __init__(self, paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
                 field: str | Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(paths, **kwargs)
        self.field = field

    def _parse(self, text: str, path: Path, line: int) -> Any:
        if not text.strip():
            return _SKIP
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg} at column {e.colno}", path=path, line=line) from None
        if self.field is None:
            return record
        names = [self.field] if isinstance(self.field, str) else list(self.field)
        if not isinstance(record, dict):
            raise DataError(f"record is a JSON {type(record).__name__}, expected an object with field(s) {names}",
                            path=path, line=line)
        missing = [n for n in names if n not in record]
        if missing:
            raise DataError(f"record has no field {missing[0]!r} (its fields: {sorted(record)})",
                            path=path, line=line)
        return record[names[0]] if isinstance(self.field, str) else tuple(record[n] for n in names)


# --------------------------------------------------------------------------------------------
# images


_IMAGE_KINDS = "uf"  # unsigned ints (uint8 pixels) and floats


class ImageArrays:
    """Images (N, C, H, W) from ``.npy`` and ``.npz`` files, concatenated in the given order.

    ``.npy`` files are memory-mapped (``mmap_mode="r"``), so a data set larger than memory costs
    only the rows of each batch; ``.npz`` members cannot be mapped and are loaded when opened.
    An ``.npz`` holds ``images_key`` and optionally ``labels_key``; an ``.npy`` holds the images
    and its labels may come from ``label_paths`` (one ``.npy`` per image file).

    Args:
        paths: image files.
        image_shape: the expected (C, H, W) per image (in the file's layout order, see ``layout``);
            ``None`` takes the first file's and requires the rest to match. A 3-D array (N, H, W)
            is read as one channel.
        layout: "NCHW" or "NHWC" in the files; ``get`` always returns NCHW, as our ViT takes.
    Raises:
        DataError: naming the file for a wrong shape, dtype, missing key or label mismatch.
    """

    def __init__(
        self,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        image_shape: tuple[int, int, int] | None = None,
        layout: str = "NCHW",
        images_key: str = "images",
        labels_key: str | None = "labels",
        label_paths: Sequence[str | os.PathLike[str]] | None = None,
    ) -> None:
        if layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
        self.paths = _as_paths(paths, "ImageArrays")
        self.layout = layout
        if label_paths is not None:
            label_paths = _as_paths(label_paths, "ImageArrays labels")
            if len(label_paths) != len(self.paths):
                raise ValueError(f"label_paths has {len(label_paths)} files for {len(self.paths)} image files")
        self._arrays: list[np.ndarray] = []
        labels: list[np.ndarray | None] = []
        for i, path in enumerate(self.paths):
            images, lab = self._open(path, images_key, labels_key)
            if label_paths is not None:
                lab = self._load_npy(label_paths[i])
            if images.ndim == 3:  # (N, H, W) grayscale: add the channel axis
                images = images[:, None] if layout == "NCHW" else images[..., None]
            if images.ndim != 4:
                raise DataError(f"images have shape {images.shape}; expected (N, C, H, W), (N, H, W, C) "
                                "or (N, H, W)", path=path)
            if images.dtype.kind not in _IMAGE_KINDS or images.dtype.kind == "u" and images.dtype != np.uint8:
                raise DataError(f"images have dtype {images.dtype}; expected uint8 (0..255) or float",
                                path=path)
            if image_shape is None:
                image_shape = tuple(int(s) for s in images.shape[1:])
            if tuple(images.shape[1:]) != tuple(image_shape):
                raise DataError(f"images have shape {images.shape}, expected (N, {', '.join(map(str, image_shape))})"
                                f" in {layout} layout", path=path)
            if lab is not None:
                lab_path = label_paths[i] if label_paths is not None else path
                if lab.ndim != 1 or lab.dtype.kind not in "iu":
                    raise DataError(f"labels must be a 1-D integer array, got {lab.dtype} {lab.shape}", path=lab_path)
                if lab.shape[0] != images.shape[0]:
                    raise DataError(f"{lab.shape[0]} labels for {images.shape[0]} images", path=lab_path)
                if lab.size and lab.min() < 0:
                    raise DataError(f"negative label {int(lab.min())}", path=lab_path,
                                    index=int(np.argmin(lab)))
            self._arrays.append(images)
            labels.append(lab)
        self.image_shape = tuple(image_shape)  # (C, H, W) or (H, W, C), as in the files
        have = [lab is not None for lab in labels]
        if any(have) and not all(have):
            missing = [str(p) for p, h in zip(self.paths, have) if not h]
            raise DataError(f"some files have labels and these do not: {missing}")
        self.labels = np.concatenate(labels).astype(np.int64) if all(have) else None  # (N,)
        self._starts = np.cumsum([0] + [a.shape[0] for a in self._arrays])

    @staticmethod
    def _load_npy(path: Path) -> np.ndarray:
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"cannot read as .npy: {e}", path=path) from None

    def _open(self, path: Path, images_key: str, labels_key: str | None) -> tuple[np.ndarray, np.ndarray | None]:
        if path.stat().st_size == 0:
            raise DataError("empty file", path=path)
        if path.suffix == ".npy":
            return self._load_npy(path), None
        if path.suffix != ".npz":
            raise DataError("unsupported image file; expected .npy or .npz", path=path)
        try:
            with np.load(path, allow_pickle=False) as archive:
                keys = list(archive.keys())
                if images_key not in keys:
                    raise DataError(f"no array {images_key!r} in the archive (it has {keys})", path=path)
                images = archive[images_key]
                labels = archive[labels_key] if labels_key is not None and labels_key in keys else None
        except (ValueError, OSError, EOFError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"cannot read as .npz: {e}", path=path) from None
        return images, labels

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[Path, int]:
        """The file holding global image ``index`` and the index inside that file."""
        if not 0 <= index < len(self):
            raise IndexError(f"image index {index} out of range [0, {len(self)})")
        f = int(np.searchsorted(self._starts, index, side="right") - 1)
        return self.paths[f], int(index - self._starts[f])

    def get(self, indices: Any, dtype: Any = np.float32) -> np.ndarray:
        """Images at ``indices`` (B,) as (B, C, H, W) ``dtype``: uint8 scaled to [0, 1], floats as
        stored. A non-finite value raises ``DataError`` with the file and the index in it."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"image indices must lie in [0, {len(self)}), got {int(idx.min())}..{int(idx.max())}")
        files = np.searchsorted(self._starts, idx, side="right") - 1
        shape = self.image_shape if self.layout == "NCHW" else (self.image_shape[2], *self.image_shape[:2])
        out = np.empty((idx.size, *shape), dtype)
        for f in np.unique(files):  # a loop over files, not images
            rows = np.flatnonzero(files == f)
            local = idx[rows] - self._starts[f]
            arr = self._arrays[f]
            x = np.asarray(arr[np.sort(local)])[np.argsort(np.argsort(local))]  # sorted reads suit mmap
            if x.dtype.kind == "f":
                bad = ~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)
                if bad.any():
                    raise DataError("image contains NaN or infinity", path=self.paths[f],
                                    index=int(local[np.flatnonzero(bad)[0]]))
                x = x.astype(dtype)
            else:
                x = x.astype(dtype) / np.asarray(255, dtype)
            if self.layout == "NHWC":
                x = np.transpose(x, (0, 3, 1, 2))
            out[rows] = x
        return out
