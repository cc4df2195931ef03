"""Training and validation images: folders of image files cut into fixed-size patches, with clear errors.

``resolve_dataset_folders(dataset, val_dataset)`` finds the training and validation folders (``DIR/train`` with
``DIR/val`` or ``DIR/test``, CompressAI's layout, or a flat folder plus a separate validation folder).
``PatchDataset`` returns random crops (training) or centre crops (validation) of every usable image; the crop of
image ``i`` in epoch ``e`` depends only on ``(seed, e, i)``, and ``EpochSampler`` draws a permutation per epoch from
``(seed, e)``, so a run resumed in the middle of an epoch sees exactly the data the uninterrupted run saw, whatever
the number of loader workers.
"""

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from utils.image import IMAGE_EXTENSIONS, ImageReadError, load_rgb8, to_float

log = logging.getLogger("csm.data")

VAL_SUBFOLDERS = ("val", "test")  # in order of preference: a validation split before a test split
SCAN_THREADS = 16  # reading image headers is I/O bound


class DataError(ValueError):
    """A dataset folder or image that cannot be used for training; the message names the folder or file."""


def resolve_dataset_folders(dataset, val_dataset=None):
    """(train folder, validation folder) for ``-d dataset`` and an optional ``--val-dataset``.

    ``dataset`` holds ``train/`` (validation then comes from ``val/`` or ``test/`` beside it unless
    ``val_dataset`` is given), or is itself a folder of training images, in which case ``val_dataset`` is required.
    """
    root = Path(dataset)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist or is not a folder")
    train = root / "train" if (root / "train").is_dir() else root
    if val_dataset is not None:
        val = Path(val_dataset)
        if not val.is_dir():
            raise DataError(f"validation folder {val} does not exist or is not a folder")
        return train, val
    if train == root:
        raise DataError(
            f"dataset folder {root} has no train/ subfolder, so it is used as the training set, and no validation "
            "set was given: add train/ and val/ (or test/) subfolders or pass --val-dataset"
        )
    for name in VAL_SUBFOLDERS:
        if (root / name).is_dir():
            return train, root / name
    raise DataError(f"dataset folder {root} has train/ but no val/ or test/ subfolder; pass --val-dataset")


def find_images(folder):
    """Image files under ``folder``, recursively (ImageNet keeps one subfolder per class), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist or is not a folder")
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        # Names starting with "." are skipped: macOS leaves "._name.jpg" resource forks that are not images.
        found += [
            Path(parent) / f for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS and not f.startswith(".")
        ]
    if not found:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder {folder}")
    return sorted(found)


def _displayed_size(path, with_orientation):
    """(width, height) of an image file as ``load_image`` will return it, read from its header."""
    with Image.open(path) as img:
        width, height = img.size
        # EXIF orientations 5-8 turn the picture by 90 degrees; only matters for non-square patches.
        if with_orientation and img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):
            width, height = height, width
    return width, height


def _probe(path, with_orientation):
    try:
        return _displayed_size(path, with_orientation), None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return None, f"{type(err).__name__}: {err}"


def usable_images(folder, patch_size, role="training"):
    """Images under ``folder`` that are readable and at least ``patch_size`` = (height, width), as a sorted list.

    Unreadable files and images smaller than the patch are skipped with one warning naming them; a folder left
    with no image is a DataError.
    """
    files = find_images(folder)
    patch_h, patch_w = patch_size
    with ThreadPoolExecutor(SCAN_THREADS) as pool:
        probes = list(pool.map(lambda p: _probe(p, patch_h != patch_w), files))
    usable, unreadable, small = [], [], []
    for path, (size, error) in zip(files, probes):
        if size is None:
            unreadable.append(f"{path} ({error})")
        elif size[0] < patch_w or size[1] < patch_h:
            small.append(f"{path} ({size[0]}x{size[1]})")
        else:
            usable.append(path)
    for items, what in ((unreadable, "unreadable"), (small, f"smaller than the {patch_w}x{patch_h} patch")):
        if items:
            shown = ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
            log.warning("%s set: skipping %d of %d images %s: %s", role, len(items), len(files), what, shown)
    if not usable:
        reasons = []
        if small:
            reasons.append(f"{len(small)} smaller than the {patch_w}x{patch_h} patch (e.g. {small[0]})")
        if unreadable:
            reasons.append(f"{len(unreadable)} unreadable (e.g. {unreadable[0]})")
        raise DataError(f"no usable {role} images in {folder}: " + "; ".join(reasons))
    return usable


class PatchDataset(Dataset):
    """Patches of the images in a folder: ``dataset[i]`` is a 3xHxW float32 tensor in [0, 1], (H, W) = patch.

    ``random_crop=True`` (training): a crop at a position drawn from ``(seed, epoch, i)``; call ``set_epoch``
    before each epoch's loader iterator is created. ``random_crop=False`` (validation): the centre crop.
    A file that fails to decode (a truncated file whose header read fine) is reported once and replaced by the
    next readable image.

    ``cache_bytes``: decoded images (8-bit, 3 bytes a pixel) are kept in memory up to this many bytes, so that an
    image is decoded once instead of once per crop (0: none). Only the process that made the dataset caches (a data
    loader's worker processes, made anew every epoch, decode every time).
    """

    def __init__(self, folder, patch_size, random_crop, seed=0, role="training", cache_bytes=0):
        self.folder = Path(folder)
        self.patch_size = tuple(int(s) for s in patch_size)
        self.random_crop = random_crop
        self.seed = int(seed)
        self.epoch = 0
        self.role = role
        self.files = usable_images(folder, self.patch_size, role)
        self._broken = set()
        self.cache_bytes = int(cache_bytes)
        self._cache, self._cached_bytes = {}, 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.files)

    def _pixels(self, index):
        """Image ``index`` as 3xHxW uint8, from the cache or decoded (and cached while the budget allows)."""
        pixels = self._cache.get(index)
        if pixels is not None:
            return pixels
        pixels = load_rgb8(self.files[index])[0].contiguous()
        if self._cached_bytes + pixels.numel() <= self.cache_bytes and torch.utils.data.get_worker_info() is None:
            self._cache[index] = pixels
            self._cached_bytes += pixels.numel()
        return pixels

    def _crop(self, image, index):
        height, width = image.shape[-2:]
        patch_h, patch_w = self.patch_size
        if self.random_crop:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            top, left = int(rng.integers(0, height - patch_h + 1)), int(rng.integers(0, width - patch_w + 1))
        else:
            top, left = (height - patch_h) // 2, (width - patch_w) // 2
        return to_float(image[:, top : top + patch_h, left : left + patch_w]).contiguous()

    def __getitem__(self, index):
        for offset in range(len(self.files)):
            candidate = (index + offset) % len(self.files)
            path = self.files[candidate]
            if path in self._broken:
                continue
            try:
                image = self._pixels(candidate)
            except (ImageReadError, OSError) as err:
                self._broken.add(path)
                log.warning("%s set: skipping unreadable image %s (%s)", self.role, path, err)
                continue
            if image.shape[-2] < self.patch_size[0] or image.shape[-1] < self.patch_size[1]:
                self._broken.add(path)
                log.warning("%s set: skipping %s, smaller than the patch once decoded", self.role, path)
                continue
            return self._crop(image, candidate)
        raise DataError(f"no readable {self.role} image left in {self.folder}")


class EpochSampler(Sampler):
    """Indices of one epoch for one of ``world_size`` processes: a permutation drawn from ``(seed, epoch)``.

    The permutation is padded (by wrapping around) to a multiple of ``world_size`` and process ``rank`` takes every
    ``world_size``-th index, as DistributedSampler does. ``set_epoch(epoch, skip)`` starts the epoch ``skip``
    indices into this process's share, to resume in the middle of an epoch.
    """

    def __init__(self, length, shuffle=True, seed=0, rank=0, world_size=1):
        self.length, self.shuffle, self.seed = int(length), shuffle, int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = int(epoch), int(skip)

    def per_rank(self):
        """Indices each process gets in a full epoch."""
        return math.ceil(self.length / self.world_size)

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        total = self.per_rank() * self.world_size
        order = (order * math.ceil(total / self.length))[:total]
        return iter(order[self.rank :: self.world_size][self.skip :])

    def __len__(self):
        return max(self.per_rank() - self.skip, 0)


class ShardSampler(Sampler):
    """Every ``world_size``-th index from ``rank``, in order, without padding: each item is seen exactly once."""

    def __init__(self, length, rank=0, world_size=1):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
