"""A full disk or unwritable folder: one clear line, no temporaries, earlier files intact."""
import errno
import io
import json

import pytest
import torch

import ablate.checkpoint
from ablate.checkpoint import atomic_torch_save, load_checkpoint
from ablate.record import RunRecord, WriteError, write_atomic
from ablate.train import run
from conftest import TINY, compose_cfg, run_script


def no_space(*args):
    raise OSError(errno.ENOSPC, "No space left on device")


class FillingFile(io.FileIO):
    """A file on a disk that fills up after `room` bytes."""

    room = 1000

    def write(self, data):
        if self.tell() + len(data) > self.room:
            no_space()
        return super().write(data)


def test_a_failed_text_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    write_atomic(path, "good\n")
    monkeypatch.setattr("os.fsync", no_space)  # a full disk often shows only when flushing
    with pytest.raises(WriteError) as caught:
        write_atomic(path, "new\n")
    assert str(caught.value) == f"cannot write {path}: No space left on device"
    assert path.read_text() == "good\n" and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_a_failed_torch_save_is_a_write_error_not_torchs_runtime_error(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"w": torch.zeros(3)}, path)
    # the real torch.save, writing into a file that runs out of room: its zip writer then fails
    # again while closing the archive, with a RuntimeError that hides the OSError
    monkeypatch.setattr(ablate.checkpoint, "open", lambda p, mode: FillingFile(p, "w"),
                        raising=False)
    with pytest.raises(WriteError, match="No space left on device"):
        atomic_torch_save({"w": torch.ones(10_000)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_disk_full_mid_run_keeps_the_record_and_checkpoint_then_resumes(tmp_path, monkeypatch):
    cfg, run_dir = compose_cfg(TINY), tmp_path / "run"
    run_dir.mkdir()
    checkpoints = []

    def open_filling_on_second_checkpoint(path, mode):
        if path.name.startswith(".checkpoint.pt"):
            checkpoints.append(path)
            if len(checkpoints) == 2:
                return FillingFile(path, "w")
        return open(path, mode)

    monkeypatch.setattr(ablate.checkpoint, "open", open_filling_on_second_checkpoint,
                        raising=False)
    with pytest.raises(WriteError, match="checkpoint.pt: No space left on device"):
        run(cfg, run_dir, choices={}, overrides=[])
    record = json.loads((run_dir / "result.json").read_text())
    assert record["status"] == "failed" and "No space left" in record["error"]
    assert record["epochs_run"] == 2 and record["final_test_acc"] is not None  # not wiped
    assert load_checkpoint(run_dir)["state"]["epoch"] == 1
    assert not list(run_dir.glob(".*.tmp"))

    monkeypatch.undo()
    # Still full when re-run: the resumed run fails again, but its record keeps epoch 1's numbers
    monkeypatch.setattr("ablate.loop.write_metrics", no_space)
    with pytest.raises(OSError):
        run(compose_cfg(TINY), run_dir, choices={}, overrides=[])
    record = json.loads((run_dir / "result.json").read_text())
    assert record["epochs_run"] == 1 and record["final_test_acc"] is not None

    monkeypatch.undo()  # room again: the same run redoes epoch 2 from epoch 1's checkpoint
    again = run(compose_cfg(TINY), run_dir, choices={}, overrides=[])
    assert again.status == "completed" and again.epochs_run == 2
    assert RunRecord.load(run_dir).status == "completed"


@pytest.mark.slow
def test_an_unwritable_file_ends_the_run_with_one_line(tmp_path):
    (tmp_path / "checkpoint.pt").mkdir()  # where the checkpoint goes; root ignores chmod
    proc = run_script("ablate/train.py", *TINY, "epochs=1", f"hydra.run.dir={tmp_path}",
                      check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        f"error: cannot write {tmp_path / 'checkpoint.pt'}: Is a directory"
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "failed"
    assert not list(tmp_path.glob(".*.tmp"))
