"""A run folder's guards: one process at a time, one config (identity) for good, and nothing
written into it (.hydra/, train.log) before both are settled."""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ablate.checkpoint import peek_checkpoint
from ablate.record import (CHECKPOINT_FILE, HYDRA_CONFIG, HYDRA_DIR, HYDRA_OVERRIDES, HYDRA_RUNTIME,
                           LOCK_FILE, RESULT_FILE, differences, identity, write_atomic)
from ablate.validation import ConfigError


class FolderRefused(Exception):
    """This run may not use the folder: another process has it, or it holds another config."""


@contextlib.contextmanager
def locked(run_dir: Path):
    """Hold run_dir's lock (fcntl.flock) for the block; FolderRefused at once if another process holds it."""
    path = Path(run_dir) / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderRefused(f"{run_dir} is in use by another run{_holder(path)}; wait for it "
                                "to end or choose another folder") from None
        # The holder removes the file when it is done; a lock on a removed file guards nothing.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        with contextlib.suppress(OSError):  # the pid only names the holder; a full disk refuses it
            os.write(fd, f"{os.getpid()}\n".encode())
        for stale in Path(run_dir).glob(".*.tmp"):  # half-written files of a killed writer: with
            stale.unlink(missing_ok=True)           # the lock held, nobody else writes here
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # before the lock goes, so a newcomer never locks this file
        os.close(fd)


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError):
        pid = path.read_text().strip()
        if pid:
            return f" (pid {pid})"
    return ""


def stored_identities(run_dir: Path) -> dict[str, str]:
    """The identity each of the folder's artifacts was made with: record, checkpoint, .hydra config
    (ConfigError when the checkpoint cannot be read)."""
    run_dir = Path(run_dir)
    found = {}
    with contextlib.suppress(OSError, ValueError, AttributeError):  # damaged: rebuilt or replaced later
        found[RESULT_FILE] = json.loads((run_dir / RESULT_FILE).read_text()).get("config_hash")
    ckpt = peek_checkpoint(run_dir)
    if ckpt is not None:
        # One written before checkpoints carried an identity cannot be trusted to be this config's.
        found[CHECKPOINT_FILE] = ckpt.get("identity") or "unknown"
    config = stored_config(run_dir)
    if config is not None:
        found[HYDRA_CONFIG] = identity(config)
    return {where: digest for where, digest in found.items() if digest}


def stored_config(run_dir: Path) -> dict | None:
    """The resolved config .hydra/config.yaml holds, or None."""
    try:
        return OmegaConf.to_container(OmegaConf.load(Path(run_dir) / HYDRA_CONFIG),
                                      resolve=True)
    except Exception:  # absent, damaged, or unresolvable: it cannot say which config it was
        return None


def accept(run_dir: Path, cfg: DictConfig) -> None:
    """Raise FolderRefused, in one line naming the settings that differ, unless every identity
    the folder holds is this config's (and its checkpoint, if any, can be read)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    digest = identity(config)
    try:
        stored = stored_identities(run_dir)
    except ConfigError as err:  # an unreadable checkpoint: the run's progress is never replaced
        raise FolderRefused(str(err)) from None
    other = {where: d for where, d in stored.items() if d != digest}
    if not other:
        return
    configs = recorded_configs(run_dir)
    changed = next((d for d in (differences(c, config) for c in configs) if d), [])
    if changed:
        why = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
        why = f"there -> here: {why}"
    else:
        made = " and ".join(other) + (" was" if len(other) == 1 else " were")
        ids = ", ".join(sorted(set(other.values())))
        why = (f"{made} made by another config (identity {ids}; this run's is {digest}), and "
               + ("the settings recorded there equal this run's: made by another version of ablate?"
                  if configs else "the folder keeps no copy of its settings to compare"))
    raise FolderRefused(f"{run_dir} holds a run of another config ({why}); refused, the folder "
                        "is left as it was: choose another folder (hydra.run.dir=... or "
                        "hydra.sweep.dir=...)")


def recorded_configs(run_dir: Path) -> list[dict]:
    """The resolved configs the folder keeps, to name what differs: .hydra/config.yaml, result.json's
    `config`, and that of the record a finished checkpoint holds (result.json may be lost)."""
    found = [stored_config(run_dir)]
    with contextlib.suppress(OSError, ValueError, AttributeError):
        found.append(json.loads((Path(run_dir) / RESULT_FILE).read_text()).get("config"))
    with contextlib.suppress(ConfigError, ValueError, TypeError, AttributeError):
        ckpt = peek_checkpoint(run_dir) or {}
        found.append(json.loads(ckpt.get("finished_record") or "{}").get("config"))
    return [c for c in found if isinstance(c, dict) and c]


def write_hydra(run_dir: Path, task_cfg: DictConfig, hydra_cfg: DictConfig, overrides) -> None:
    """Write .hydra/{config,hydra,overrides}.yaml as Hydra does, keeping any already there: they
    describe the run that made the folder (conf/config.yaml sets hydra.output_subdir: null)."""
    (Path(run_dir) / HYDRA_DIR).mkdir(exist_ok=True)
    for name, cfg in ((HYDRA_CONFIG, task_cfg), (HYDRA_RUNTIME, hydra_cfg),
                      (HYDRA_OVERRIDES, overrides)):
        if not (Path(run_dir) / name).exists():
            write_atomic(Path(run_dir) / name, OmegaConf.to_yaml(cfg))


@contextlib.contextmanager
def logging_to(path: Path):
    """Also send the log to `path` for the block, formatted like the console (Hydra's job log)."""
    root = logging.getLogger()
    handler = logging.FileHandler(path)
    if root.handlers:
        handler.setFormatter(root.handlers[0].formatter)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
