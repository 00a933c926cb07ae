"""Shared helpers: compose the real config, run the real entry points in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
# A run small enough for two CPU cores: synthetic data, narrow CNN, two epochs.
TINY = ["data=synthetic", "data.train_size=400", "data.test_size=200", "epochs=2",
        "model.filters=[8,16,32]", "batch_size=64"]


def compose_cfg(overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])


def run_script(script: str, *args: str, cwd: Path | None = None, check: bool = True,
               timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a repo script as a user would (`python ablate/train.py ...`), against this checkout."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def compose_config():
    return compose_cfg


def write_image_tree(root: Path, per_class: dict[str, int], seed: int = 0) -> None:
    """A CIFAR-10-shaped image-folder tree of random PNGs: root/<split>/<class>/<i>.png."""
    import numpy as np
    from PIL import Image

    from ablate.data import CLASSES

    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")


@pytest.fixture
def image_tree(tmp_path):
    root = tmp_path / "cifar"
    write_image_tree(root, {"train": 4, "test": 2})
    return root


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true",
                     help="also run the tests marked slow (what CI runs; plain pytest leaves them out)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--all") or config.getoption("-m"):  # an explicit -m chooses for itself
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
