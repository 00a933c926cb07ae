"""Per-epoch training checkpoints (everything needed to resume bit for bit), saved atomically."""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from ablate.record import BEST_WEIGHTS, CHECKPOINT_FILE, replacing

log = logging.getLogger(__name__)

def atomic_torch_save(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename (see record.replacing)."""
    # Through a Python file, so that a full disk raises OSError (ENOSPC) rather than torch's
    # RuntimeError from its C++ writer.
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def load_checkpoint(run_dir: Path) -> dict | None:
    """The run's last checkpoint, or None when there is none (or it cannot be trusted)."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or corrupted: start over rather than train on garbage
        log.warning("checkpoint %s is unreadable (%s); starting the run from scratch", path, err)
        return None


def save_finished(run_dir: Path, *, identity: str, state, record) -> None:
    """Replace the resume checkpoint (about 3x the model) by a few kilobytes once the run completed:
    its identity, the per-epoch rows and the completed record, from which a lost or damaged
    result.json is rebuilt without training."""
    atomic_torch_save({"identity": identity, "state": asdict(state),
                       "finished_record": json.dumps(asdict(record))},  # as result.json holds it
                      Path(run_dir) / CHECKPOINT_FILE)


def peek_checkpoint(run_dir: Path) -> dict | None:
    """The checkpoint's entries with its tensors memory-mapped, not read; None when absent or unreadable."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # load_checkpoint says so when the run gets to it
        return None


# The seed report's words for some classes in its checkpoint names.
SEED_WORDS = {"SignSGD": "CustomSignSGD", "OneHotMSELoss": "MSELoss", "SiLU": "Swish",
              "ConstantLR": "NoScheduler"}


def seed_style_name(model, loss_fn, optimizer, scheduler, acc: float) -> str:
    """E.g. best_model_LeakyReLU_CrossEntropy_Adam_CosineAnnealingLR_8945.pth."""
    act = next((type(m).__name__ for m in model.modules()
                if type(m).__module__ == "torch.nn.modules.activation"), "Identity")
    loss = type(loss_fn).__name__
    if isinstance(loss_fn, torch.nn.CrossEntropyLoss):
        loss = "LabelSmoothingCrossEntropy" if loss_fn.label_smoothing > 0 else "CrossEntropy"
    words = [SEED_WORDS.get(n, n) for n in
             (act, loss, type(optimizer).__name__, type(scheduler).__name__)]
    return f"best_model_{'_'.join(words)}_{round(acc * 10000):04d}.pth"


def link_seed_name(run_dir: Path, model, loss_fn, optimizer, scheduler, acc: float | None) -> str | None:
    """Give BEST_WEIGHTS its seed-style name too (a hard link, or a copy where links fail)."""
    best = Path(run_dir) / BEST_WEIGHTS
    if acc is None or not best.exists():
        return None
    target = Path(run_dir) / seed_style_name(model, loss_fn, optimizer, scheduler, acc)
    target.unlink(missing_ok=True)
    try:
        os.link(best, target)
    except OSError:
        with replacing(target) as tmp:
            shutil.copyfile(best, tmp)
    return target.name
