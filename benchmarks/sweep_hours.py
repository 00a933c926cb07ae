"""What a sweep would train and for how long at the speeds of committed records, without training.

    python benchmarks/sweep_hours.py +ablation=report
    python benchmarks/sweep_hours.py +ablation=report seed=0,1,2 --records docs/results

Takes the overrides of `python ablate/train.py -m ...` and expands them as Hydra's basic sweeper
does (the sweep's own `hydra.sweeper.params` first, then the command line), composes every job
and counts its training FLOPs per image (torch.utils.flop_counter: one forward and backward
pass). Jobs with the same resolved config are one run, as a sweep trains them.

Speeds come from the completed records under --records: a record's `images_per_second` (training
passes only) times its own model's FLOPs per image is a FLOP rate for its device and precision
(the median when several records share them). A job's hours are its epochs x training images x
FLOPs per image over that rate. A model no record trained (another width, ResNet-18) is assumed
to run at the same FLOP rate: an estimate, since a CPU's FLOP rate differs between models.
Evaluation and start-up are not counted (11-13% more in the records so far).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# Run as a script from anywhere: the repository root holds `ablate` and `benchmarks`.
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import ablate.resolvers  # noqa: E402,F401  (${scaled:N} and ${job_folder:...})

CONF = REPO / "conf"
FULL_TRAIN_IMAGES = 50_000


@dataclass(frozen=True)
class Job:
    """One run a sweep would train."""

    overrides: tuple[str, ...]
    epochs: int
    train_images: int        # per epoch
    flops_per_image: float   # one training step's forward + backward, per image
    identity: str            # equal for jobs that are the same run

    @property
    def flops(self) -> float:
        return self.epochs * self.train_images * self.flops_per_image


def expand(overrides: list[str]) -> list[list[str]]:
    """The job overrides `ablate/train.py -m <overrides>` launches, in its order."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    fixed = [o.input_line for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        params = compose("config", overrides=fixed, return_hydra_config=True).hydra.sweeper.params
    # Hydra's own overrides (hydra/launcher=fused, hydra.sweep.dir=...) choose how, not what
    task = [o.input_line for o in parser.parse_overrides(overrides)
            if not o.key_or_group.startswith("hydra")]
    swept = [f"{k}={v}" for k, v in (params or {}).items()] + task
    # the basic sweeper's own expansion (hydra-core is pinned below 1.4), not a copy of it
    return BasicSweeper.split_arguments(parser.parse_overrides(swept), None)[0]


@lru_cache(maxsize=None)
def model_flops(model_json: str) -> float:
    """Training FLOPs per image of a model config (JSON of its resolved `model` node)."""
    import torch
    from hydra.utils import instantiate
    from torch.utils.flop_counter import FlopCounterMode

    model = instantiate(json.loads(model_json))
    batch = 2  # BatchNorm needs more than one image per batch in training mode
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(batch, 3, 32, 32)).sum().backward()
    return counter.get_total_flops() / batch


def flops_of(model: dict) -> float:
    return model_flops(json.dumps(model, sort_keys=True))


def job(overrides: list[str]) -> Job:
    """Compose one job and measure what it costs."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ablate.record import identity

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    data = cfg["data"]
    train = data.get("train_size")
    if train is None:  # all of CIFAR-10's training set but the held-out validation images
        train = FULL_TRAIN_IMAGES - data["val_size"]
    if train >= cfg["batch_size"]:  # an epoch drops the last partial batch (49,920 of 50,000)
        train -= train % cfg["batch_size"]
    return Job(tuple(overrides), cfg["epochs"], train, flops_of(cfg["model"]), identity(cfg))


def plan(overrides: list[str]) -> list[Job]:
    """The distinct runs of a sweep, in the order it trains them (a repeat is trained once)."""
    jobs, seen = [], set()
    for overrides_of_job in expand(overrides):
        j = job(overrides_of_job)
        if j.identity not in seen:
            seen.add(j.identity)
            jobs.append(j)
    return jobs


def speeds(records: Path) -> dict[str, tuple[float, list[str]]]:
    """FLOP/s per 'device precision' of the completed records under `records`, and which ones."""
    from omegaconf import OmegaConf

    from ablate.record import RunRecord

    rates: dict[str, list[tuple[float, str]]] = {}
    for result in sorted(records.rglob("result.json")):
        run = RunRecord.load(result.parent)
        config = result.parent / ".hydra" / "config.yaml"
        fused = "fused_members" in run.extra  # its clock is the whole stack's: not one run's speed
        if run.status != "completed" or not run.images_per_second or fused or not config.exists():
            continue
        model = OmegaConf.to_container(OmegaConf.load(config), resolve=True)["model"]
        flops = flops_of(model)
        name = (f"{result.parent.relative_to(records)} ({run.images_per_second:,.0f} images/s x "
                f"{flops / 1e9:.3f} GFLOP)")
        rates.setdefault(f"{run.device} {run.precision}", []).append(
            (run.images_per_second * flops, name))
    return {key: (statistics.median(rate for rate, _ in found), [name for _, name in found])
            for key, found in rates.items()}


def table(jobs: list[Job], rates: dict[str, tuple[float, list[str]]]) -> str:
    """A markdown listing: one line per run, hours per device and precision, and the totals."""
    keys = sorted(rates)
    shared = set.intersection(*(set(j.overrides) for j in jobs)) if len(jobs) > 1 else set()
    head = ["#", "run (overrides besides those of every run)", "epochs", "train images",
            "GFLOP / image", *(f"h, {k}" for k in keys)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for i, j in enumerate(jobs, 1):
        hours = [f"{j.flops / rates[k][0] / 3600:.1f}" for k in keys]
        own = " ".join(o for o in j.overrides if o not in shared) or "(none)"
        lines.append(f"| {i} | `{own}` | {j.epochs} | {j.train_images:,} | "
                     f"{j.flops_per_image / 1e9:.3f} | " + " | ".join(hours) + " |")
    totals = [f"**{sum(j.flops for j in jobs) / rates[k][0] / 3600:.1f}**" for k in keys]
    lines.append(f"| | **{len(jobs)} runs** | | | | " + " | ".join(totals) + " |")
    if shared:
        common = " ".join(o for o in jobs[0].overrides if o in shared)
        lines.append(f"\nEvery run also has `{common}`.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*",
                   help="as for `python ablate/train.py -m`, e.g. +ablation=report seed=0,1,2")
    p.add_argument("--records", type=Path, default=REPO / "docs" / "results",
                   help="the completed run records whose speeds to use (default docs/results)")
    args = p.parse_args(argv)
    rates = speeds(args.records)
    shown = args.records.resolve()
    shown = shown.relative_to(REPO) if shown.is_relative_to(REPO) else shown  # no machine's paths
    print(f"Speeds: the completed records under {shown} (training passes only)")
    for key, (rate, names) in sorted(rates.items()):
        print(f"- {key}: {rate / 1e9:.0f} GFLOP/s, the median of {'; '.join(names)}")
    if not any(k.startswith("cuda") for k in rates):
        print("- cuda: no record yet, so no GPU hours (benchmarks/gpu_suite.py measures a GPU)")
    print()
    print(table(plan(args.overrides), rates))


if __name__ == "__main__":
    main()
