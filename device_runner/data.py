"""Training data on the device: an ImageFolder-style directory or an .npz (numpy; Pillow only
decodes and resizes files at load time).

- directory: one sub-folder per class (sorted names = class order), JPEG/PNG files inside;
  files that are not readable images are skipped and counted (``Dataset.skipped``), never fatal;
- .npz: ``images`` uint8 (N, H, W, 3), ``labels`` int (N,), optional ``classes``.

Images are not held in memory: they are read from disk per batch (``ImageFile``). An
uncompressed .npz (``np.savez``) whose images have the artifact's size is read in place;
a compressed one (``np.savez_compressed``), one of another size, or a folder is decoded and
resized (bilinear) once, at load time, into an unlinked spool file (``spool_dir``, default
the system's temp folder), and read from there. The OS's page cache keeps what was read
recently; it is not the process's memory. ``Dataset.batch`` normalises a batch to float32
NCHW: (pixel / 255 - mean) / std.
"""
from __future__ import annotations

import math
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from actcomp_edge.core.manifest import folder_classes

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class DataError(ValueError):
    """A dataset that cannot be used (one-line message)."""


class ImageFile:
    """uint8 images (N, H, W, 3) stored row after row in a file from byte ``offset`` on, read
    when indexed: ``images[i]`` (H, W, 3), ``images[rows]`` (len(rows), H, W, 3). ``take``
    gives the images of some rows without reading them (numpy's ``take(rows, axis=0)``)."""

    def __init__(self, file, offset: int, shape: tuple, rows: np.ndarray | None = None):
        self.file, self.offset, self.image_shape = file, int(offset), tuple(shape[1:])
        self.rows = np.arange(shape[0]) if rows is None else np.asarray(rows, np.int64)

    @property
    def shape(self) -> tuple:
        return (len(self.rows),) + self.image_shape

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> np.ndarray:
        rows = self.rows[index]
        out = np.empty((np.size(rows),) + self.image_shape, np.uint8)
        size = out[0].nbytes if len(out) else 0
        for image, row in zip(out, np.atleast_1d(rows)):
            self.file.seek(self.offset + int(row) * size)
            if self.file.readinto(memoryview(image).cast("B")) != size:
                raise DataError(f"{getattr(self.file, 'name', 'the image file')}: image {row} "
                                f"is cut short (the file changed while training?)")
        return out.reshape(np.shape(rows) + self.image_shape)

    def take(self, rows, axis: int = 0) -> ImageFile:
        assert axis == 0
        return ImageFile(self.file, self.offset, (0,) + self.image_shape, self.rows[rows])


@dataclass
class Dataset:
    images: np.ndarray | ImageFile  # uint8 (N, H, W, 3), in memory or read per batch
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
        reuses one batch of memory instead of allocating one per step. Images are read,
        cropped and converted one at a time, normalised in place: no batch-sized
        temporaries (at batch 64, 224 px they were 29 MiB). ``augment``: each image is
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
        for i, row in enumerate(indices):  # one image at a time: no uint8 batch either
            image = self.images[row]
            if augment is not None:
                image = random_resized_crop(image, augment)
            x[i] = image.transpose(2, 0, 1)
        x /= np.float32(255.0)
        x -= mean[:, None, None]
        x /= std[:, None, None]
        return x, self.labels[indices]

    def split(self, fraction: float, seed: int) -> tuple:
        """(train, held-out) with a seeded shuffle; the held-out part has >= 1 sample."""
        order = np.random.default_rng(seed).permutation(len(self))
        n_val = min(len(self) - 1, max(1, int(round(fraction * len(self)))))
        val, train = order[:n_val], order[n_val:]
        return (Dataset(self.images.take(train, axis=0), self.labels[train], self.classes,
                        self.skipped, names_given=self.names_given),
                Dataset(self.images.take(val, axis=0), self.labels[val], self.classes,
                        names_given=self.names_given))


def random_resized_crop(image: np.ndarray, rng: np.random.Generator,
                        scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (H, W, 3): a random box of scale * H * W pixels (area) and
    aspect w/h in ratio (log-uniform), resized back to (H, W), then flipped left-right with
    probability 1/2 (torchvision's RandomResizedCrop + RandomHorizontalFlip)."""
    h, w = image.shape[:2]
    area = rng.uniform(*scale) * h * w
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    box_w = min(w, max(1, round(math.sqrt(area * aspect))))
    box_h = min(h, max(1, round(math.sqrt(area / aspect))))
    left, top = rng.integers(0, w - box_w + 1), rng.integers(0, h - box_h + 1)
    crop = bilinear_box(image, int(left), int(top), box_w, box_h)
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def bilinear_taps(n_out: int, start: int, length: int, n_in: int) -> tuple:
    """Bilinear sampling of the span [start, start + length) of an axis of n_in pixels at
    n_out half-pixel centres: (i0, i1, weight of i1 (n_out, 1) float32), clamped to the axis."""
    centre = np.clip(start + (np.arange(n_out) + 0.5) * (length / n_out) - 0.5, 0, n_in - 1)
    i0 = np.floor(centre).astype(np.intp)
    return i0, np.minimum(i0 + 1, n_in - 1), (centre - i0).astype(np.float32)[:, None]


def bilinear_box(image: np.ndarray, left: int, top: int, box_w: int, box_h: int) -> np.ndarray:
    """uint8 (H, W, C) -> uint8 (H, W, C): the box (left, top, box_w, box_h) of the image
    resized to (H, W), bilinear, pixels outside the box read where a tap falls on them (as
    Pillow's BILINEAR with a box; within one level of it for a box no larger than the image).
    In numpy, so that augmentation needs no Pillow (2.1 MiB of RSS)."""
    h, w, c = image.shape
    y0, y1, wy = bilinear_taps(h, top, box_h, h)
    x0, x1, wx = bilinear_taps(w, left, box_w, w)
    first, last = int(y0[0]), int(y1[-1]) + 1  # the rows any tap reads
    rows = image[first:last].reshape(last - first, w * c)
    channel = np.arange(c)
    a = rows[:, (x0[:, None] * c + channel).ravel()].astype(np.float32)  # (rows, W * C)
    b = rows[:, (x1[:, None] * c + channel).ravel()].astype(np.float32)
    b -= a
    b *= np.repeat(wx[:, 0], c)
    a += b                                     # along x
    upper, lower = a[y0 - first], a[y1 - first]
    lower -= upper
    lower *= wy
    upper += lower                             # along y
    return np.rint(upper, out=upper).astype(np.uint8).reshape(h, w, c)


def resize(image: np.ndarray, size: tuple) -> np.ndarray:
    """uint8 (h, w, 3) -> uint8 (H, W, 3), bilinear (Pillow, imported only when needed)."""
    if image.shape[:2] == tuple(size):
        return image
    from PIL import Image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def load(path, size: tuple, num_classes: int | None = None, classes: list | None = None,
         spool_dir=None) -> Dataset:
    """The dataset at path, its images read per batch at size (H, W). ``classes``: the
    artifact's class names; a folder (or an .npz with ``classes``) must have as many, and the
    same names unless the artifact's are the default indices "0", "1", ...; ``spool_dir``:
    where images decoded at load time are spooled (an unlinked file; default: the system's
    temp folder)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset {path} does not exist")
    data = (_load_npz(path, size, spool_dir) if path.is_file() else
            _load_folder(path, size, spool_dir))
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


def _npy_header(f) -> tuple:
    """(shape, fortran_order, dtype) of the .npy stream f, left at the start of its data."""
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f".npy format version {version} is not supported")
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
            np.lib.format.read_array_header_2_0)
    return read(f)


def _stored_data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Byte offset in the .npz file of an uncompressed member's array data (after the zip
    local header and the .npy header)."""
    with open(path, "rb") as raw:
        raw.seek(info.header_offset)
        local = raw.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"{info.filename}: no zip local header at {info.header_offset}")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        raw.seek(info.header_offset + 30 + name_len + extra_len)
        _npy_header(raw)
        return raw.tell()


def _spool(images, size: tuple, spool_dir) -> ImageFile:
    """Write uint8 (h, w, 3) images, each resized to size (H, W), one after another into an
    unlinked file in spool_dir: it holds no memory and is gone when the process ends."""
    import tempfile  # only to spool: an npz read in place needs none (0.22 MiB of RSS)
    try:
        file = tempfile.TemporaryFile(dir=spool_dir)
    except OSError:  # a read-only folder: the system's temp folder
        file = tempfile.TemporaryFile()
    count = 0
    for image in images:
        file.write(np.ascontiguousarray(resize(image, size)).data)
        count += 1
    file.flush()
    return ImageFile(file, 0, (count,) + tuple(size) + (3,))


def _load_npz(path: Path, size: tuple, spool_dir) -> Dataset:
    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo("images.npy")
            with z.open(info) as f:
                shape, fortran_order, dtype = _npy_header(f)
                if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
                    raise DataError(f"{path}: images must be uint8 (N, H, W, 3), got {dtype} "
                                    f"{shape}")
                if fortran_order:
                    raise DataError(f"{path}: images are stored in Fortran order; save them "
                                    f"C-ordered (np.ascontiguousarray)")
                if info.compress_type == zipfile.ZIP_STORED and shape[1:3] == tuple(size):
                    images = ImageFile(open(path, "rb"), _stored_data_offset(path, info), shape)
                else:  # decompressed and resized once, image by image, into the spool
                    images = _spool(_read_images(f, shape), size, spool_dir)
        with np.load(path, allow_pickle=False) as d:
            labels = d["labels"]
            classes = [str(c) for c in d["classes"]] if "classes" in d.files else None
    except DataError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read dataset {path}: {e}") from None
    if labels.shape != (len(images),):
        raise DataError(f"{path}: labels must be ({len(images)},), got {labels.shape}")
    if labels.dtype.kind not in "iuf":
        raise DataError(f"{path}: labels must be integers, got {labels.dtype}")
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        bad = labels[labels != np.round(labels)][0]
        raise DataError(f"{path}: labels must be class indices, got {float(bad)!r}")
    labels = labels.astype(np.int64)
    names_given = classes is not None
    if classes is None:
        classes = [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []
    return Dataset(images, labels, classes, names_given=names_given)


def _read_images(f, shape: tuple):
    """The uint8 (H, W, 3) images of an .npy stream f at its data, one at a time."""
    size = int(np.prod(shape[1:]))
    for i in range(shape[0]):
        buffer = f.read(size)
        if len(buffer) != size:
            raise EOFError(f"images.npy is cut short at image {i} of {shape[0]}")
        yield np.frombuffer(buffer, np.uint8).reshape(shape[1:])


def _load_folder(path: Path, size: tuple, spool_dir) -> Dataset:
    from PIL import Image, UnidentifiedImageError
    classes = folder_classes(path)
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
    labels = []

    def decoded():
        for file, label in files:
            try:
                with Image.open(file) as im:
                    rgb = np.asarray(im.convert("RGB"))
            except (OSError, UnidentifiedImageError, ValueError) as e:
                skipped.append((str(file), f"unreadable: {e}".splitlines()[0]))
                continue
            labels.append(label)
            if stretch(rgb.shape[:2], size) > STRETCH_NOTED:
                stretched.append(str(file))
            yield rgb

    images = _spool(decoded(), size, spool_dir)
    return Dataset(images, np.asarray(labels, np.int64), classes, skipped,
                   stretched=stretched)


STRETCH_NOTED = 2.0  # an aspect ratio changed more than this by the resize is said


def stretch(hw: tuple, size: tuple) -> float:
    """How many times the bilinear resize of an (h, w) image to size (H, W) changes its
    aspect ratio (1: not at all; the whole image is kept, no crop)."""
    ratio = (hw[1] / hw[0]) / (size[1] / size[0])
    return max(ratio, 1 / ratio)
