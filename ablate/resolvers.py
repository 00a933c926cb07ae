"""The OmegaConf resolvers conf/ uses: ${scaled:N} for epoch counts, ${job_folder:...} for sweep folders.

Registered when the ablate package is imported, so that the entry point, launcher worker
processes and tests resolve the same config. Torch-free.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import re
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from ablate.record import SWEEP_FILE, operational

MAX_ITEM, MAX_NAME = 40, 200  # under the 255 bytes file systems allow for one name
UNSAFE = re.compile(r"[^A-Za-z0-9._=,+\-~@\[\]]")  # '/', quotes, spaces, '\', ':', '*', '$', ...


def scaled(epochs: int, *, _root_) -> int:
    """`epochs` times the config's `scale`, at least 1 (0 stays 0): a quick look keeps proportions."""
    scale = _root_.get("scale", 1.0)
    if epochs == 0 or isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        return epochs  # a bad scale is reported by validation, naming the key
    if not math.isfinite(epochs * scale):  # scale=inf (or 1e400, which YAML reads as inf)
        return epochs  # as above; and a finished folder that says so still resolves for analysis
    return max(1, round(epochs * scale))


def job_folder(overrides, *, _root_=None) -> str:
    """A sweep job's folder name: its overrides sorted by key, without operational ones
    (threads, device, ...), made file-system safe; with a short hash of them all when a value
    had to be changed (a/b and a_b would otherwise share a folder) or an override (e.g. a path)
    or the whole had to be cut. A name too long for MAX_NAME puts the keys the sweep varies first
    (`swept_keys`), so that the cut takes fixed settings and each job keeps its swept values.

    E.g. ['seed=1', 'loss=focal', 'threads=4'] -> 'loss=focal,seed=1'. Hydra's own
    launcher choice (hydra/launcher=joblib) is not a task override, so it never appears.
    """
    parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides])
    kept = sorted((o.key_or_group, o.input_line) for o in parsed
                  if not operational(o.key_or_group))
    lines = [line for _, line in kept]
    safe = [UNSAFE.sub("_", line) for line in lines]
    # Cutting each long override first keeps every key, and so the swept values, in sight.
    items = [item[:MAX_ITEM] for item in safe]
    if len(",".join(items)) > MAX_NAME - 9:  # the whole is cut too: what it cuts must be fixed
        swept = swept_keys(_root_)
        items = [item for _, item in sorted(zip(kept, items), key=lambda pair: pair[0][0] not in swept)]
    name = ",".join(items)[:MAX_NAME - 9]
    # A group's '/' (model/activation=elu) is safe to replace: group names are ours, not typed
    # values. A changed value is not: 'é' and 'ü' both become '_'.
    changed = any(UNSAFE.search(line.partition("=")[2]) for line in lines)
    if changed or name != ",".join(safe):
        name += "-" + hashlib.sha256("\n".join(lines).encode()).hexdigest()[:8]  # of the sorted lines
    return name or "defaults"


def swept_keys(root) -> set[str]:
    """The keys the job's sweep varies: its sweeper's params (a preset's grid, Optuna's search
    space) and the sweeps typed on the command line, which only the sweep's multirun.yaml keeps
    (a job's config holds its own values; Hydra's sweeper writes the file before the first job)."""
    keys: set[str] = set()
    if root is None:
        return keys
    with contextlib.suppress(Exception):  # naming a folder never fails on these
        keys |= set(OmegaConf.select(root, "hydra.sweeper.params", default=None) or {})
    with contextlib.suppress(Exception):  # no sweep file (Optuna writes none)
        sweep_file = Path(str(OmegaConf.select(root, "hydra.sweep.dir"))) / SWEEP_FILE
        typed = [str(o) for o in OmegaConf.load(sweep_file).hydra.overrides.task]
        keys |= {o.key_or_group for o in OverridesParser.create().parse_overrides(typed)
                 if o.is_sweep_override()}
    return keys


OmegaConf.register_new_resolver("scaled", scaled, replace=True)
OmegaConf.register_new_resolver("job_folder", job_folder, replace=True)
