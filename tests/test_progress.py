"""Progress without a terminal: tqdm draws no bar into a launcher's log, so the training loop
logs a line now and then during an epoch (images done of the epoch's, images/s, running loss)."""
from __future__ import annotations

import functools
import io
import logging
import re

from tqdm import tqdm

import ablate.loop
from ablate.train import run
from conftest import compose_cfg

TINY = ["data=synthetic", "data.train_size=256", "data.test_size=64", "epochs=1", "batch_size=64",
        "model.filters=[4,8,16]", "save_weights=false", "device=cpu"]
LINE = re.compile(r"epoch 1/1: (\d+)/256 images \((\d+)%\) \| (\d+) images/s \| running loss (\d+\.\d{4})$")


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ablate.loop" and "images/s" in r.getMessage()]


def test_without_a_terminal_an_epoch_logs_its_progress(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(ablate.loop, "PROGRESS_SECONDS", 0.0)  # a line after every step but the last
    caplog.set_level(logging.INFO, logger="ablate.loop")
    assert run(compose_cfg(TINY), tmp_path, {}, []).status == "completed"
    lines = progress_lines(caplog)
    assert len(lines) == 3, lines  # 4 steps of 64 images; the epoch's own line follows the last
    done = [int(LINE.fullmatch(line)[1]) for line in lines]
    assert done == [64, 128, 192]
    assert all(float(LINE.fullmatch(line)[4]) > 0 for line in lines)


def test_the_default_interval_keeps_a_short_epoch_quiet(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ablate.loop")
    assert ablate.loop.PROGRESS_SECONDS == 30.0
    assert run(compose_cfg(TINY), tmp_path, {}, []).status == "completed"
    assert progress_lines(caplog) == []


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_with_a_terminal_the_bar_is_the_progress(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(ablate.loop, "PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr(ablate.loop, "tqdm", functools.partial(tqdm, file=Terminal()))
    caplog.set_level(logging.INFO, logger="ablate.loop")
    assert run(compose_cfg(TINY), tmp_path, {}, []).status == "completed"
    assert progress_lines(caplog) == []
