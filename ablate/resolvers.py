"""The OmegaConf resolvers conf/ uses: ${scaled:N} for epoch counts, ${job_folder:...} for sweep folders.

Registered when the ablate package is imported, so that the entry point, launcher worker
processes and tests resolve the same config. Torch-free.
"""
from __future__ import annotations

import hashlib
import re

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from ablate.record import OPERATIONAL_KEYS

MAX_ITEM, MAX_NAME = 40, 200  # under the 255 bytes file systems allow for one name
UNSAFE = re.compile(r"[^A-Za-z0-9._=,+\-~@\[\]]")  # '/', quotes, spaces, '\', ':', '*', '$', ...


def scaled(epochs: int, *, _root_) -> int:
    """`epochs` times the config's `scale`, at least 1 (0 stays 0): a quick look keeps proportions."""
    scale = _root_.get("scale", 1.0)
    if epochs == 0 or isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        return epochs  # a bad scale is reported by validation, naming the key
    return max(1, round(epochs * scale))


def job_folder(overrides) -> str:
    """A sweep job's folder name: its overrides sorted by key, without operational ones
    (threads, device, ...), made file-system safe; with a short hash of them all when a value
    had to be changed (a/b and a_b would otherwise share a folder) or an override (e.g. a path)
    or the whole had to be cut.

    E.g. ['seed=1', 'loss=focal', 'threads=4'] -> 'loss=focal,seed=1'. Hydra's own
    launcher choice (hydra/launcher=joblib) is not a task override, so it never appears.
    """
    parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides])
    kept = sorted((o.key_or_group, o.input_line) for o in parsed
                  if o.key_or_group not in OPERATIONAL_KEYS)
    lines = [line for _, line in kept]
    safe = [UNSAFE.sub("_", line) for line in lines]
    # Cutting each long override first keeps every key, and so the swept values, in sight.
    name = ",".join(item[:MAX_ITEM] for item in safe)[:MAX_NAME - 9]
    # A group's '/' (model/activation=elu) is safe to replace: group names are ours, not typed
    # values. A changed value is not: 'é' and 'ü' both become '_'.
    changed = any(UNSAFE.search(line.partition("=")[2]) for line in lines)
    if changed or name != ",".join(safe):
        name += "-" + hashlib.sha256("\n".join(lines).encode()).hexdigest()[:8]
    return name or "defaults"


OmegaConf.register_new_resolver("scaled", scaled, replace=True)
OmegaConf.register_new_resolver("job_folder", job_folder, replace=True)
