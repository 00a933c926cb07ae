"""CIFAR-10 as uint8 tensors: loading (official pickles, image folders, download), subsets, batches."""
from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import pickle
import shutil
import socket
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ablate.checkpoint import atomic_torch_save

log = logging.getLogger(__name__)

# Per-channel statistics of the CIFAR-10 training set (RGB, on the 0..1 scale).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
CACHE_VERSION = 1
DOWNLOAD_TIMEOUT_S = 60
VERIFY_MD5 = True  # tests turn this off to read tiny hand-made batches
SPLIT_SEED = 0  # subsets and the validation split are the same for every run seed


class DataError(RuntimeError):
    """The data set could not be found, read or trusted."""


@dataclass
class ImageData:
    """Images as (N, 3, 32, 32) uint8 and labels as (N,) int64, per split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    classes: tuple[str, ...]
    source: str

    def fingerprint(self) -> str:
        """sha256 of every split's images and labels and the class names: equal exactly when
        two runs train and test on the same data, wherever it was read from."""
        h = hashlib.sha256(repr(self.classes).encode())
        for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
            tensor = getattr(self, name).detach().cpu().contiguous()
            h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
            h.update(tensor.view(torch.uint8).numpy() if tensor.numel() else b"")
        return h.hexdigest()

    def to(self, device: torch.device | str) -> "ImageData":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return ImageData(**moved)


# ----------------------------------------------------------------------------- subsets

def stratified_indices(labels: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of `size` samples whose class proportions match `labels` (largest remainder rounding)."""
    n = len(labels)
    if not 0 < size <= n:
        raise DataError(f"subset size {size} must be between 1 and {n}")
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * size / n
    quota = exact.floor().long()
    short = size - int(quota.sum())
    quota[torch.argsort(exact - quota, descending=True)[:short]] += 1
    picked = []
    for cls, k in zip(classes.tolist(), quota.tolist()):
        members = torch.nonzero(labels == cls).flatten()
        picked.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.sort(torch.cat(picked)).values


def make_splits(train_x, train_y, test_x, test_y, *, train_size, test_size, val_size,
                classes, source) -> ImageData:
    """Carve the validation split out of training, then take stratified subsets."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    val_x, val_y = train_x[:0], train_y[:0]
    if val_size >= len(train_y):  # nothing would be left to train on
        raise DataError(f"data.val_size={val_size} leaves no training images: the training set "
                        f"has {len(train_y)} ({source}); hold out fewer")
    if val_size:
        val_idx = stratified_indices(train_y, val_size, g)
        keep = torch.ones(len(train_y), dtype=torch.bool)
        keep[val_idx] = False
        val_x, val_y = train_x[val_idx], train_y[val_idx]
        train_x, train_y = train_x[keep], train_y[keep]
    if train_size is not None:
        idx = stratified_indices(train_y, train_size, g)
        train_x, train_y = train_x[idx], train_y[idx]
    if test_size is not None:
        idx = stratified_indices(test_y, test_size, g)
        test_x, test_y = test_x[idx], test_y[idx]
    return ImageData(train_x, train_y, test_x, test_y, val_x, val_y, tuple(classes), source)


# ----------------------------------------------------------------------------- synthetic

def make_synthetic(num_classes: int = 10, train_size: int = 2000, test_size: int = 500,
                   val_size: int = 0, noise: float = 48.0, seed: int = 0) -> ImageData:
    """A learnable CIFAR-shaped data set: each class has a colour and a smooth pattern, plus noise."""
    if num_classes < 1 or train_size < 1 or test_size < 1 or val_size < 0:
        raise ValueError(f"synthetic data needs num_classes, train_size, test_size >= 1 and "
                         f"val_size >= 0, got {num_classes}, {train_size}, {test_size}, {val_size}")
    if not (math.isfinite(noise) and noise >= 0):  # NaN noise would give constant images
        raise ValueError(f"synthetic data needs a finite noise >= 0, got noise={noise}")
    images = train_size + val_size + test_size
    # Drawing holds about three float32 copies of a split (template, noise, sum) at once.
    need, have = images * 3 * 32 * 32 * 13, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise ValueError(f"{images:,} synthetic images need about {need / 2**30:,.0f} GiB to draw; "
                         f"this machine has {have / 2**30:,.0f} GiB (lower train_size/test_size)")
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(num_classes, 3, 1, 1, generator=g) * 160 + 48
    # Low-frequency patterns survive the 4-pixel crops and flips of augmentation.
    patterns = F.interpolate(torch.randn(num_classes, 1, 4, 4, generator=g) * 40, size=32,
                             mode="bilinear", align_corners=False)
    templates = colours + patterns  # (C, 3, 32, 32)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        x = templates[y] + torch.randn(n, 3, 32, 32, generator=g) * noise
        return x.round().clamp(0, 255).to(torch.uint8), y

    train_x, train_y = draw(train_size + val_size)
    test_x, test_y = draw(test_size)
    names = tuple(f"class{i}" for i in range(num_classes))
    return make_splits(train_x, train_y, test_x, test_y, train_size=None, test_size=None,
                       val_size=val_size, classes=names, source="synthetic")


# ----------------------------------------------------------------------------- CIFAR-10

def load_cifar10(root: str = "./data", download: bool = True, num_classes: int = 10,
                 train_size: int | None = None, test_size: int | None = None,
                 val_size: int = 0) -> ImageData:
    """CIFAR-10 from `root`: official pickles, an image-folder tree, or torchvision's download."""
    if num_classes != 10:
        raise DataError(f"CIFAR-10 has 10 classes, data.num_classes={num_classes}")
    root_path = Path(root).expanduser().resolve()
    official = root_path / "cifar-10-batches-py"
    if official.is_dir():
        arrays, source = _read_official(root_path), f"cifar-10-batches-py in {root_path}"
    elif (root_path / "train").is_dir() and (root_path / "test").is_dir():
        arrays, source = _read_image_folder_cached(root_path), f"image folders in {root_path}"
    elif download:
        arrays, source = _download(root_path), f"downloaded to {root_path}"
    else:
        raise DataError(_not_found(root_path, "download is off (data.download=false)"))
    return make_splits(*arrays, train_size=train_size, test_size=test_size, val_size=val_size,
                       classes=CLASSES, source=source)


def _not_found(root: Path, why: str) -> str:
    return (f"CIFAR-10 not found in {root}: looked for {root}/cifar-10-batches-py/ (official "
            f"python version) and {root}/train/<class>/ + {root}/test/<class>/ (image folders), "
            f"and {why}. Point data.root at a copy, e.g. "
            f"`python ablate/train.py data.root=/path/to/cifar10`.")


# Roots whose download failed in this process: a sweep's later jobs fail at once instead of
# trying again (each try may wait DOWNLOAD_TIMEOUT_S) and repeating the long advice.
_FAILED_DOWNLOADS: set[Path] = set()


def _download(root: Path):
    from torchvision.datasets import CIFAR10

    if root in _FAILED_DOWNLOADS:
        raise DataError(f"CIFAR-10 not found in {root}, and its download failed earlier in this "
                        "process (see the first error); not tried again")
    log.info("CIFAR-10 not found in %s; downloading the official archive", root)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # a blocked network fails instead of hanging
    made = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
        CIFAR10(str(root), train=True, download=True)
        CIFAR10(str(root), train=False, download=True)
    except Exception as err:  # network errors come in many types (URLError, OSError, ...)
        _FAILED_DOWNLOADS.add(root)
        if made:  # a mistyped data.root leaves no folder (nor a partial archive) behind
            shutil.rmtree(root, ignore_errors=True)
        raise DataError(_not_found(root, f"the download failed ({type(err).__name__}: {err})")) from None
    finally:
        socket.setdefaulttimeout(previous)
    return _read_official(root)


def _read_official(root: Path):
    """The official python batches; md5 sums (torchvision's list) catch silently corrupted files."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    folder = root / "cifar-10-batches-py"
    out = []
    for listing in (CIFAR10.train_list, CIFAR10.test_list):
        xs, ys = [], []
        for name, md5 in listing:
            path = folder / name
            if not path.exists():
                raise DataError(f"{path} is missing; delete {folder} to download again, "
                                "or point data.root at a complete copy")
            if VERIFY_MD5 and not check_integrity(str(path), md5):
                raise DataError(f"{path} is corrupted (md5 mismatch); delete {folder} to "
                                "download again, or point data.root at a good copy")
            try:
                with open(path, "rb") as fh:
                    batch = pickle.load(fh, encoding="latin1")
                x = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                y = np.asarray(batch["labels"], dtype=np.int64)
            except Exception as err:
                raise DataError(f"cannot read {path}: {err}") from None
            if len(x) != len(y) or y.min() < 0 or y.max() > 9:
                raise DataError(f"{path} does not hold CIFAR-10 images and labels")
            xs.append(x)
            ys.append(y)
        out += [torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))]
    return tuple(out)


def _image_files(split_dir: Path) -> list[tuple[Path, int]]:
    class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir())
    names = tuple(d.name for d in class_dirs)
    if names != CLASSES:
        raise DataError(f"{split_dir} must hold one folder per CIFAR-10 class {CLASSES}, found {names}")
    return [(f, label) for label, d in enumerate(class_dirs)
            for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]


def _fingerprint(files: list[tuple[Path, int]]) -> str:
    """A key that changes whenever any image's content may have: names, sizes, mtimes and ctimes.

    The kernel sets a file's ctime on every write or replacement and no tool can set it back
    (unlike the mtime, which `touch -r`, `cp -p` and tar restore), so same-size new content is
    noticed without reading 60,000 files (one stat each: about 1 s; hashing them: 2-14 s).
    """
    h = hashlib.sha256()
    for f, label in files:
        st = f.stat()
        h.update(f"{f.parent.name}/{f.name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:"
                  f"{label}\n".encode())
    return h.hexdigest()


def _decode(files: list[tuple[Path, int]], split_dir: Path):
    from PIL import Image

    x = np.empty((len(files), 32, 32, 3), dtype=np.uint8)
    for i, (f, _) in enumerate(files):
        try:
            with Image.open(f) as im:
                x[i] = np.asarray(im.convert("RGB"))
        except Exception as err:
            raise DataError(f"cannot read image {f}: {err}") from None
    y = torch.tensor([label for _, label in files], dtype=torch.int64)
    if len(y) == 0:
        raise DataError(f"no images found under {split_dir}")
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), y


def _read_image_folder_cached(root: Path):
    """Decode the image tree once into a uint8 cache that is rebuilt when the tree changes."""
    files = {s: _image_files(root / s) for s in ("train", "test")}
    key = _fingerprint(files["train"] + files["test"])
    cache = root / "cifar10_uint8_cache.pt"
    cached = _load_cache(cache, key)
    if cached is not None:
        return cached
    log.info("decoding %d images under %s (once; cached in %s)",
             sum(map(len, files.values())), root, cache)
    arrays = (*_decode(files["train"], root / "train"), *_decode(files["test"], root / "test"))
    try:
        atomic_torch_save({"version": CACHE_VERSION, "key": key, "arrays": list(arrays)}, cache)
    except OSError as err:  # a read-only copy of the data still works, just without the cache
        log.warning("could not write the cache %s (%s); decoding again next time", cache, err)
    return arrays


def _load_cache(path: Path, key: str):
    if not path.exists():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        arrays = tuple(blob["arrays"])
        ok = (blob["version"] == CACHE_VERSION and blob["key"] == key and len(arrays) == 4
              and all(a.dtype == torch.uint8 and a.shape[1:] == (3, 32, 32) for a in arrays[::2])
              and all(len(x) == len(y) for x, y in zip(arrays[::2], arrays[1::2])))
    except Exception as err:  # truncated or corrupted file
        log.warning("ignoring unreadable cache %s (%s); rebuilding it", path, err)
        return None
    if not ok:
        log.warning("cache %s does not match the image folders; rebuilding it", path)
        return None
    return arrays


# ----------------------------------------------------------------------------- batches

def random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random `pad`-pixel translation (zero padding) and horizontal flip of a whole uint8 batch."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dev = x.device
    dy = torch.randint(0, 2 * pad + 1, (b, 1), device=dev, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), device=dev, generator=generator)
    rows = dy + torch.arange(h, device=dev)  # (B, H) source row of each output row
    cols = dx + torch.arange(w, device=dev)  # (B, W)
    flip = torch.rand(b, 1, device=dev, generator=generator) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)  # a flip is reversed column order
    batch = torch.arange(b, device=dev)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=None)
def _channel_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: a host-to-GPU copy every batch would stall the GPU pipeline.
    return (torch.tensor(MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(STD, device=device).view(1, 3, 1, 1))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 standardised with the CIFAR-10 channel statistics."""
    mean, std = _channel_stats(x.device)
    return (x.float() / 255 - mean) / std


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, generator=None,
            augment: bool = False):
    """Yield normalised (inputs, targets); shuffled and augmented when a generator is given.

    Training drops the last partial batch (when there is at least one full one) so that
    BatchNorm never sees a batch of one.
    """
    n = len(y)
    if generator is None:
        order, stop = torch.arange(n, device=x.device), n
    else:
        order = torch.randperm(n, device=x.device, generator=generator)
        stop = n - n % batch_size if n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        xb = x[idx]
        if augment:
            xb = random_crop_flip(xb, 4, generator)
        yield normalize(xb), y[idx]


def num_batches(n: int, batch_size: int, train: bool) -> int:
    if train and n >= batch_size:
        return n // batch_size
    return -(-n // batch_size)
