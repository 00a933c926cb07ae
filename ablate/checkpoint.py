"""Per-epoch training checkpoints (everything needed to resume bit for bit), saved atomically."""
from __future__ import annotations

import copy
import io
import json
import os
import re
import shutil
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ablate.record import BEST_WEIGHTS, CHECKPOINT_FILE, replacing


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename (see record.replacing)."""
    # Through a Python file, so that a full disk raises OSError (ENOSPC) rather than torch's
    # RuntimeError from its C++ writer.
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def config_error(message: str) -> Exception:
    """A ConfigError: refused in one line, as a config that cannot work is."""
    from ablate.validation import ConfigError  # validation imports data, which imports this module

    return ConfigError(message)


def _read(path: Path, mmap: bool) -> dict:
    # Never start over in its place: the file is the run's progress (or its finished record),
    # and a run that silently retrains every epoch looks like one that resumed.
    if not zipfile.is_zipfile(path):
        raise _unreadable(path, "no zip archive in it, which torch.save writes: cut short or overwritten?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused:  # e.g. a numpy number, saved before checkpoints were made plain
            raise _unreadable(path, f"it holds a {refused.group(1)}, which torch.load(weights_only=True) "
                                    "refuses") from None
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
        raise _unreadable(path, lines[0][:200]) from None


def _unreadable(path: Path, why: str) -> Exception:
    return config_error(f"{path} cannot be read ({why}); the run is not started over without it: "
                        f"to start the run over on purpose, delete it (rm '{path}')")


def load_checkpoint(run_dir: Path) -> dict | None:
    """The run's last checkpoint, or None when there is none; ConfigError when it cannot be read."""
    path = Path(run_dir) / CHECKPOINT_FILE
    return _read(path, mmap=False) if path.is_file() else None  # a folder there: saving says so


def peek_checkpoint(run_dir: Path) -> dict | None:
    """The checkpoint's entries with its tensors memory-mapped, not read; None when absent,
    ConfigError when it cannot be read."""
    path = Path(run_dir) / CHECKPOINT_FILE
    return _read(path, mmap=True) if path.is_file() else None


def plain(value):
    """`value` with numpy numbers as Python numbers and numpy arrays as tensors (or lists, for
    text): checkpoints are read back with torch.load(weights_only=True), which refuses numpy
    objects. Containers in which nothing changes are returned as they are (a state_dict keeps its
    _metadata)."""
    if isinstance(value, dict):
        pairs = [(plain(k), plain(v)) for k, v in value.items()]
        if all(k is a and v is b for (k, v), (a, b) in zip(value.items(), pairs)):
            return value
        out = copy.copy(value)
        out.clear()
        out.update(pairs)
        return out
    if type(value) in (list, tuple):
        items = [plain(v) for v in value]
        return value if all(a is b for a, b in zip(value, items)) else type(value)(items)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biufc":  # numbers: a tensor of the same dtype and shape
            return torch.from_numpy(value.copy())
        return plain(value.tolist())
    return value


def loadable(value) -> bool:
    """Whether torch.load(weights_only=True) reads `value` back."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except Exception:
        return False
    return True


def _first_unloadable(value, where: str) -> tuple[str, object] | None:
    """(key path, value) of the first thing in `value` a checkpoint cannot hold."""
    if isinstance(value, dict):
        children = [(f"{where}[{k!r}]", v) for k, v in value.items()]
    elif type(value) in (list, tuple):
        children = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    else:
        return None if loadable(value) else (where, value)
    for path, child in children:
        found = _first_unloadable(child, path)
        if found is not None:
            return found
    return None if loadable(value) else (where, value)  # e.g. a dict subclass


def resume_state(identity: str, entries: dict, callbacks) -> dict:
    """A resume checkpoint's contents: `entries` (Loop.state_dict) with the per-epoch state and
    each callback's state made plain (see `plain`); ConfigError, naming the callback, when a
    callback's state still holds something torch.load(weights_only=True) refuses, since the
    run could never resume from it."""
    out = {"identity": identity, **entries, "state": plain(entries["state"])}
    for key in callbacks:
        out[key] = plain(entries.get(key))
        if out[key] is not None and not loadable(out[key]):
            where, value = _first_unloadable(out[key], "state_dict()") or ("state_dict()", out[key])
            raise config_error(
                f"callback {key!r}: its {where} is a {type(value).__module__}.{type(value).__name__}, "
                "which a checkpoint cannot hold (torch.load(weights_only=True) refuses it, so the run "
                "could not resume); give it numbers, strings, lists, dicts and tensors")
    return out


def save_finished(run_dir: Path, *, identity: str, state, record) -> None:
    """Replace the resume checkpoint (about 3x the model) by a few kilobytes once the run completed:
    its identity, the per-epoch rows and the completed record, from which a lost or damaged
    result.json is rebuilt without training."""
    atomic_torch_save({"identity": identity, "state": plain(asdict(state)),
                       "finished_record": json.dumps(asdict(record))},  # as result.json holds it
                      Path(run_dir) / CHECKPOINT_FILE)


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
