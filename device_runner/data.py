"""Training data on the device: an ImageFolder-style directory or an .npz (numpy + Pillow).

- directory: one sub-folder per class (sorted names = class order), JPEG/PNG files inside;
  files that are not readable images are skipped and counted (``Dataset.skipped``), never fatal;
- .npz: ``images`` uint8 (N, H, W, 3), ``labels`` int (N,), optional ``classes``.

Images are resized (bilinear) to the artifact's input size once, at load time, and kept as
uint8; ``Dataset.batch`` normalises a batch to float32 NCHW: (pixel / 255 - mean) / std.
"""
from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class DataError(ValueError):
    """A dataset that cannot be used (one-line message)."""


@dataclass
class Dataset:
    images: np.ndarray           # uint8 (N, H, W, 3)
    labels: np.ndarray           # int64 (N,)
    classes: list
    skipped: list = field(default_factory=list)   # (path, reason) of unreadable files
    stretched: list = field(default_factory=list)  # paths whose aspect ratio the resize changed
    #                                                more than STRETCH_NOTED times
    names_given: bool = True     # False: an .npz without ``classes`` (names are indices)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices, mean, std, out: np.ndarray | None = None,
              augment: np.random.Generator | None = None) -> tuple:
        """(float32 (B, 3, H, W) normalised, int64 (B,)). ``out``: a float32 (>= B, 3, H, W)
        buffer the batch is written into (its first B rows are returned), so a training loop
        reuses one batch of memory instead of allocating one per step. Each channel is
        converted in place: no full-batch temporaries. ``augment``: each image is
        random_resized_crop'ed and flipped with this generator."""
        indices = np.asarray(indices)
        mean = np.broadcast_to(np.asarray(mean, np.float32), (3,))
        std = np.broadcast_to(np.asarray(std, np.float32), (3,))
        shape = (len(indices), 3) + self.images.shape[1:3]
        if out is None:
            x = np.empty(shape, np.float32)
        elif out.dtype != np.float32 or out.shape[1:] != shape[1:] or len(out) < shape[0]:
            raise ValueError(f"batch buffer {out.dtype} {out.shape} cannot hold {shape} float32")
        else:
            x = out[:shape[0]]
        images, rows = self.images, indices
        if augment is not None:  # a uint8 batch of crops; otherwise no batch copy
            images = np.stack([random_resized_crop(images[i], augment) for i in indices])
            rows = np.arange(len(indices))
        for c in range(3):
            channel = x[:, c]
            channel[...] = images[rows, :, :, c]
            channel /= np.float32(255.0)
            channel -= mean[c]
            channel /= std[c]
        return x, self.labels[indices]

    def split(self, fraction: float, seed: int) -> tuple:
        """(train, held-out) with a seeded shuffle; the held-out part has >= 1 sample."""
        order = np.random.default_rng(seed).permutation(len(self))
        n_val = min(len(self) - 1, max(1, int(round(fraction * len(self)))))
        val, train = order[:n_val], order[n_val:]
        return (Dataset(self.images[train], self.labels[train], self.classes, self.skipped),
                Dataset(self.images[val], self.labels[val], self.classes))


def random_resized_crop(image: np.ndarray, rng: np.random.Generator,
                        scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (H, W, 3): a random box of scale * H * W pixels (area) and
    aspect w/h in ratio (log-uniform), resized back to (H, W), then flipped left-right with
    probability 1/2 (torchvision's RandomResizedCrop + RandomHorizontalFlip)."""
    from PIL import Image
    h, w = image.shape[:2]
    area = rng.uniform(*scale) * h * w
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    box_w = min(w, max(1, round(math.sqrt(area * aspect))))
    box_h = min(h, max(1, round(math.sqrt(area / aspect))))
    left, top = rng.integers(0, w - box_w + 1), rng.integers(0, h - box_h + 1)
    crop = np.asarray(Image.fromarray(image).resize(
        (w, h), Image.BILINEAR, box=(left, top, left + box_w, top + box_h)))
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def resize(image: np.ndarray, size: tuple) -> np.ndarray:
    """uint8 (h, w, 3) -> uint8 (H, W, 3), bilinear."""
    from PIL import Image
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def load(path, size: tuple, num_classes: int | None = None,
         classes: list | None = None) -> Dataset:
    """The dataset at path, resized to size (H, W). ``classes``: the artifact's class names;
    a folder (or an .npz with ``classes``) must have as many, and the same names unless the
    artifact's are the default indices "0", "1", ..."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset {path} does not exist")
    data = _load_npz(path, size) if path.is_file() else _load_folder(path, size)
    if len(data) == 0:
        raise DataError(f"dataset {path} has no usable images")
    named = classes is not None and list(classes) != [str(i) for i in range(len(classes))]
    if classes is not None and data.names_given and (len(data.classes) != len(classes) or
                                              (named and list(data.classes) != list(classes))):
        raise DataError(f"dataset {path} has the classes {data.classes}, the artifact "
                        f"{list(classes)}")
    if num_classes is not None:
        bad = data.labels[(data.labels < 0) | (data.labels >= num_classes)]
        if len(bad):
            raise DataError(f"dataset {path}: label {int(bad[0])} is out of range for an artifact "
                            f"with {num_classes} classes")
    return data


def _load_npz(path: Path, size: tuple) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as d:
            images, labels = d["images"], d["labels"]
            classes = [str(c) for c in d["classes"]] if "classes" in d.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read dataset {path}: {e}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"{path}: images must be uint8 (N, H, W, 3), got {images.dtype} "
                        f"{images.shape}")
    if labels.shape != (len(images),):
        raise DataError(f"{path}: labels must be ({len(images)},), got {labels.shape}")
    resized = np.empty((len(images),) + tuple(size) + (3,), np.uint8)
    for i, image in enumerate(images):  # into one array: a list of images then np.stack left
        resized[i] = resize(image, size)  # the list's pages on the heap (+35 MiB at 224 px)
    del images
    if labels.dtype.kind not in "iuf":
        raise DataError(f"{path}: labels must be integers, got {labels.dtype}")
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        bad = labels[labels != np.round(labels)][0]
        raise DataError(f"{path}: labels must be class indices, got {float(bad)!r}")
    labels = labels.astype(np.int64)
    names_given = classes is not None
    if classes is None:
        classes = [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []
    return Dataset(resized, labels, classes, names_given=names_given)


def _load_folder(path: Path, size: tuple) -> Dataset:
    from PIL import Image, UnidentifiedImageError
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{path} has no class sub-folders (expected {path}/<class>/<image>)")
    files, skipped, stretched = [], [], []
    for label, name in enumerate(classes):
        for file in sorted((path / name).rglob("*")):
            if not file.is_file():
                continue
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append((str(file), "not an image file"))
            else:
                files.append((file, label))
    images = np.empty((len(files),) + tuple(size) + (3,), np.uint8)  # one array, as in .npz
    labels = []
    for file, label in files:
        try:
            with Image.open(file) as im:
                rgb = np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            skipped.append((str(file), f"unreadable: {e}".splitlines()[0]))
            continue
        images[len(labels)] = resize(rgb, size)
        labels.append(label)
        if stretch(rgb.shape[:2], size) > STRETCH_NOTED:
            stretched.append(str(file))
    return Dataset(images[:len(labels)], np.asarray(labels, np.int64), classes, skipped,
                   stretched=stretched)


STRETCH_NOTED = 2.0  # an aspect ratio changed more than this by the resize is said


def stretch(hw: tuple, size: tuple) -> float:
    """How many times the bilinear resize of an (h, w) image to size (H, W) changes its
    aspect ratio (1: not at all; the whole image is kept, no crop)."""
    ratio = (hw[1] / hw[0]) / (size[1] / size[0])
    return max(ratio, 1 / ratio)
