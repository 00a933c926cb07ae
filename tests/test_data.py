import os
import pickle
from urllib.error import URLError

import numpy as np
import pytest
import torch

import ablate.data as D
from conftest import write_image_tree


def test_synthetic_data_is_cifar_shaped_and_balanced():
    data = D.make_synthetic(train_size=300, test_size=100, val_size=50)
    assert data.train_x.shape == (300, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert len(data.test_y) == 100 and len(data.val_y) == 50
    assert torch.bincount(data.train_y).tolist() == [30] * 10


def test_stratified_subset_keeps_class_proportions():
    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    idx = D.stratified_indices(labels, 100, torch.Generator().manual_seed(0))
    assert len(idx) == len(set(idx.tolist())) == 100
    assert torch.bincount(labels[idx]).tolist() == [60, 30, 10]


def test_validation_split_is_disjoint_from_training():
    data = D.make_synthetic(train_size=200, test_size=20, val_size=40)
    train = {tuple(x.flatten()[:64].tolist()) for x in data.train_x}
    assert not any(tuple(x.flatten()[:64].tolist()) in train for x in data.val_x)


def test_random_crop_flip_takes_windows_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = D.random_crop_flip(x, 4, g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips = 0
    for i in range(len(x)):
        windows = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        plain = any(torch.equal(out[i], w) for w in windows)
        flipped = any(torch.equal(out[i], w.flip(2)) for w in windows)
        assert plain or flipped
        flips += flipped and not plain
    assert 10 < flips < 54  # about half are mirrored


def test_batches_cover_every_image_once_and_are_normalised():
    data = D.make_synthetic(train_size=250, test_size=10)
    seen = torch.cat([y for _, y in D.batches(data.train_x, data.train_y, 64)])
    assert torch.equal(seen, data.train_y)  # evaluation: all images, in order
    g = torch.Generator().manual_seed(0)
    train = list(D.batches(data.train_x, data.train_y, 64, generator=g, augment=True))
    assert [len(y) for _, y in train] == [64, 64, 64]  # the partial batch is dropped in training
    assert train[0][0].dtype == torch.float32 and abs(train[0][0].mean()) < 2


def test_image_folder_tree_is_read_in_class_order_and_cached(tmp_path, caplog):
    write_image_tree(tmp_path, {"train": 3, "test": 2})
    data = D.load_cifar10(str(tmp_path), download=False)
    assert data.train_x.shape == (30, 3, 32, 32) and len(data.test_y) == 20
    assert data.train_y.tolist() == sorted(data.train_y.tolist())
    from PIL import Image
    first = np.array(Image.open(tmp_path / "train" / "airplane" / "0000.png"))
    assert torch.equal(data.train_x[0], torch.from_numpy(first).permute(2, 0, 1))
    cache = tmp_path / "cifar10_uint8_cache.pt"
    assert cache.exists()
    again = D.load_cifar10(str(tmp_path), download=False)
    assert torch.equal(again.train_x, data.train_x)


def test_corrupted_cache_is_rebuilt_not_trained_on(tmp_path, caplog):
    write_image_tree(tmp_path, {"train": 2, "test": 1})
    good = D.load_cifar10(str(tmp_path), download=False)
    cache = tmp_path / "cifar10_uint8_cache.pt"
    cache.write_bytes(cache.read_bytes()[:1000])  # truncated
    rebuilt = D.load_cifar10(str(tmp_path), download=False)
    assert torch.equal(rebuilt.train_x, good.train_x)
    assert "unreadable cache" in caplog.text


def test_changed_image_tree_invalidates_the_cache(tmp_path):
    write_image_tree(tmp_path, {"train": 2, "test": 1})
    D.load_cifar10(str(tmp_path), download=False)
    write_image_tree(tmp_path, {"train": 3, "test": 1}, seed=1)
    assert len(D.load_cifar10(str(tmp_path), download=False).train_y) == 30


def _write_official(root, n_per_batch=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 "labels": list(rng.integers(0, 10, n_per_batch))}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
    return folder


def test_official_python_batches_are_read(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "VERIFY_MD5", False)  # hand-made batches cannot match the real md5s
    folder = _write_official(tmp_path)
    data = D.load_cifar10(str(tmp_path), download=False)
    assert data.train_x.shape == (100, 3, 32, 32) and data.test_x.shape == (20, 3, 32, 32)
    with open(folder / "data_batch_1", "rb") as fh:
        raw = pickle.load(fh)
    assert torch.equal(data.train_x[0].flatten(), torch.from_numpy(raw["data"][0]))


def test_official_batches_with_wrong_checksum_are_refused(tmp_path):
    _write_official(tmp_path)
    with pytest.raises(D.DataError, match="md5 mismatch"):
        D.load_cifar10(str(tmp_path), download=False)


def test_missing_data_without_download_says_where_it_looked(tmp_path):
    with pytest.raises(D.DataError) as err:
        D.load_cifar10(str(tmp_path / "nowhere"), download=False)
    msg = str(err.value)
    assert "cifar-10-batches-py" in msg and "data.root=" in msg and str(tmp_path) in msg


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets

    class Offline:
        def __init__(self, *args, **kwargs):
            raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(D.DataError, match="the download failed .*URLError.*data.root="):
        D.load_cifar10(str(tmp_path), download=True)


def test_same_size_new_content_rebuilds_the_cache(tmp_path):
    from PIL import Image

    write_image_tree(tmp_path, {"train": 2, "test": 1})
    image = tmp_path / "train" / "airplane" / "0000.png"
    before = np.zeros((32, 32, 3), dtype=np.uint8)
    Image.fromarray(before).save(image, compress_level=0)  # stored: the size depends on shape only
    stat = image.stat()
    assert torch.equal(D.load_cifar10(str(tmp_path), download=False).train_x[0],
                       torch.zeros(3, 32, 32, dtype=torch.uint8))
    Image.fromarray(before + 200).save(image, compress_level=0)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime put back
    assert image.stat().st_size == stat.st_size and image.stat().st_mtime_ns == stat.st_mtime_ns
    assert (D.load_cifar10(str(tmp_path), download=False).train_x[0] == 200).all()
