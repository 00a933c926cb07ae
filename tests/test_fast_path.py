"""The fast path (device-resident data, batched augmentation, mixed precision, N jobs at once)
must train like the plain torchvision pipeline in benchmarks/plain.py."""
from __future__ import annotations

import os
import sys
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image
from scipy.stats import chisquare
from torch import nn

from ablate.data import batches, make_synthetic, normalize, random_crop_flip
from ablate.loop import Precision, evaluate, pick_precision, train_one_epoch
from ablate.models import CNN
from ablate import train
from ablate.compose import spread_device
from ablate.validation import ConfigError, validate
from benchmarks import plain

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from more threads, and on a shared machine more threads are slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def plain_augmented(x: torch.Tensor, seed: int) -> torch.Tensor:
    """x (N, 3, 32, 32) uint8 through torchvision's PIL transforms, as the plain DataLoader does."""
    torch.manual_seed(seed)  # torchvision's random transforms draw from the global generator
    transform = plain.train_transform()
    return torch.stack([transform(Image.fromarray(im)) for im in x.permute(0, 2, 3, 1).numpy()])


def fast_augmented(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([inputs for inputs, _ in batches(x, y, 256, generator=g, augment=True)])


# ----------------------------------------------------------------------------- augmentation

def test_augmented_batches_have_the_plain_pipelines_statistics():
    data = make_synthetic(train_size=2048, test_size=10)
    fast = fast_augmented(data.train_x, data.train_y, seed=0)
    ref = plain_augmented(data.train_x, seed=0)
    assert fast.shape == ref.shape and fast.dtype == ref.dtype == torch.float32
    dims = (0, 2, 3)
    # Seed-to-seed noise is ~0.003; leaving augmentation out moves the means by ~0.25.
    torch.testing.assert_close(fast.mean(dims), ref.mean(dims), atol=0.015, rtol=0)
    torch.testing.assert_close(fast.std(dims), ref.std(dims), atol=0.015, rtol=0)
    unaugmented = normalize(data.train_x)
    assert (unaugmented.mean(dims) - ref.mean(dims)).abs().min() > 0.1  # the test can tell


def coordinate_images(n: int) -> torch.Tensor:
    """Channel 0 holds row + 1, channel 1 column + 1 (0 is padding), so a crop reveals its offset."""
    rows = torch.arange(1, 33, dtype=torch.uint8).view(32, 1).expand(32, 32)
    x = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    x[:, 0], x[:, 1] = rows, rows.T
    return x


def test_crop_offsets_and_flips_are_uniform_and_independent():
    n, pad = 18 * 9 * 9 * 20, 4  # 20 expected per (dy, dx, flip) cell
    out = random_crop_flip(coordinate_images(n), pad, torch.Generator().manual_seed(0))
    # Output pixel 16 always comes from inside the image, whatever the offset (0..8) and flip.
    dy = out[:, 0, 16, 16].long() - 1 + pad - 16
    flip = out[:, 1, 16, 17] < out[:, 1, 16, 16]  # flipped columns run backwards
    dx = out[:, 1, 16, 16].long() - 1 + pad - torch.where(flip, 15, 16)
    assert dy.min() == dx.min() == 0 and dy.max() == dx.max() == 2 * pad
    cells = torch.bincount((dy * 9 + dx) * 2 + flip.long(), minlength=162)
    assert chisquare(cells.numpy()).pvalue > 1e-3
    assert abs(flip.float().mean().item() - 0.5) < 4 * 0.5 / n ** 0.5


def test_crop_is_a_zero_padded_translation_then_flip():
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(coordinate_images(64), 4, torch.Generator().manual_seed(1))
    got = random_crop_flip(x, 4, torch.Generator().manual_seed(1))  # same draws, real pixels
    padded = nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(64):
        dy = int(out[i, 0, 16, 16]) - 1 + 4 - 16
        flip = bool(out[i, 1, 16, 17] < out[i, 1, 16, 16])
        dx = int(out[i, 1, 16, 16]) - 1 + 4 - (15 if flip else 16)
        want = padded[i, :, dy:dy + 32, dx:dx + 32]
        assert torch.equal(got[i], want.flip(-1) if flip else want)


# ----------------------------------------------------------------------------- both learn

def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return CNN(partial(nn.LeakyReLU, negative_slope=0.1), filters=(8, 16, 32))


@pytest.mark.slow
def test_fast_and_plain_pipelines_learn_alike():
    data = make_synthetic(train_size=1024, test_size=500, seed=3)
    cpu, epochs, loss_fn = torch.device("cpu"), 3, nn.CrossEntropyLoss()

    model = small_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train = plain.make_loader(data.train_x, data.train_y, batch_size=64, workers=0, train=True,
                              device=cpu)
    for _ in range(epochs):
        plain.train_epoch(model, train, loss_fn=loss_fn, optimizer=optimizer, device=cpu)
    test = plain.make_loader(data.test_x, data.test_y, batch_size=500, workers=0, train=False,
                             device=cpu)
    plain_acc = plain.accuracy(model, test, cpu)

    # The CUDA default's settings, on the CPU: bf16 autocast and channels_last.
    precision = Precision(torch.bfloat16, channels_last=True)
    model = small_cnn().to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        train_one_epoch(model, data.train_x, data.train_y, loss_fn=loss_fn, optimizer=optimizer,
                        batch_size=64, generator=g, precision=precision)
    fast_acc = evaluate(model, data.test_x, data.test_y, loss_fn=loss_fn, precision=precision)["acc"]

    assert plain_acc > 0.6 and fast_acc > 0.6  # chance is 0.1
    assert abs(plain_acc - fast_acc) < 0.15


def test_fp16_with_a_loss_scaler_trains_and_clips():
    data = make_synthetic(train_size=256, test_size=10, seed=1)
    precision = pick_precision("fp16", torch.device("cpu"))
    assert precision.autocast_dtype == torch.float16 and precision.scaler.is_enabled()
    model = small_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    losses = [train_one_epoch(model, data.train_x, data.train_y, loss_fn=nn.CrossEntropyLoss(),
                              optimizer=optimizer, batch_size=32, generator=g, grad_clip=1.0,
                              precision=precision)["loss"] for _ in range(2)]
    assert losses[1] < losses[0]


def test_auto_precision_falls_back_to_fp16_without_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a CUDA GradScaler on a machine without CUDA warns
        p = pick_precision("auto", torch.device("cuda"))
    assert p.autocast_dtype == torch.float16 and p.channels_last and p.scaler is not None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    p = pick_precision("auto", torch.device("cuda"))
    assert p.autocast_dtype == torch.bfloat16 and p.channels_last and p.scaler is None
    # a CPU computes in bf16 only where it has bf16 instructions (tests/test_precision.py)
    from ablate.loop import cpu_computes_bf16
    assert pick_precision("auto", torch.device("cpu")).name == ("bf16" if cpu_computes_bf16() else "fp32")


# ----------------------------------------------------------------------------- several runs per GPU

@pytest.mark.parametrize("job_num, gpus, expected", [
    (None, 0, "cpu"), (3, 0, "cpu"), (None, 2, "cuda"),
    (0, 1, "cuda:0"), (5, 1, "cuda:0"), (0, 4, "cuda:0"), (5, 4, "cuda:1"), (7, 4, "cuda:3"),
    (8, 4, "cuda:0"),
])
def test_sweep_jobs_take_the_gpus_in_turn(job_num, gpus, expected):
    assert spread_device(job_num, gpus) == torch.device(expected)


@pytest.mark.parametrize("override", ["threads=0", "cuda_memory_fraction=1.5",
                                      "cuda_memory_fraction=0", "compile=yes", "precision=fp8"])
def test_bad_speed_settings_are_rejected(override):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[override])
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        validate(cfg)


def sweep(sweep_dir: Path, *extra: str) -> None:
    """`python ablate/train.py -m ...` through the real entry point, in this process (no start-up)."""
    argv = ["ablate/train.py", "-m", "data=synthetic", "data.train_size=256", "data.test_size=128",
            "epochs=2", "model.filters=[8,16,32]", "threads=1", "save_weights=false", "seed=0,1",
            f"hydra.sweep.dir={sweep_dir}", *extra]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", argv)
        try:
            train.main()
        finally:
            GlobalHydra.instance().clear()


@pytest.mark.slow
def test_joblib_sweep_equals_sequential_sweep(tmp_path, monkeypatch):
    # The joblib workers are separate processes that must import this checkout's ablate.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    sweep(tmp_path / "basic")
    sweep(tmp_path / "joblib", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    jobs = sorted(p.name for p in (tmp_path / "basic").glob("[!.]*") if p.is_dir())
    assert [job[-7:] for job in jobs] == [",seed=0", ",seed=1"] and "threads" not in jobs[0]
    for job in jobs:
        basic, joblib = (metrics_without_seconds(tmp_path / name / job / "metrics.csv")
                         for name in ("basic", "joblib"))
        assert len(basic) == 3  # header + 2 epochs
        assert joblib == basic
    assert metrics_without_seconds(tmp_path / "joblib" / jobs[0] / "metrics.csv") != \
        metrics_without_seconds(tmp_path / "joblib" / jobs[1] / "metrics.csv")  # the seeds differ


def metrics_without_seconds(path: Path) -> list[list[str]]:
    """metrics.csv rows without the wall-clock column, which differs between any two runs."""
    rows = [line.split(",") for line in path.read_text().splitlines()]
    drop = rows[0].index("seconds")
    return [r[:drop] + r[drop + 1:] for r in rows]
