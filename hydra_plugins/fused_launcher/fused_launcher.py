"""A Hydra launcher that trains the seeds of one configuration together (ablate.fused).

    python ablate/train.py -m hydra/launcher=fused +ablation=loss seed=0,1,2

Jobs whose configs differ only in `seed` form a group; a group that `ablate.fused.fusable`
accepts trains as one stack, everything else runs one job after another exactly as with
Hydra's basic launcher. Every job of a group still goes through Hydra's `run_job` and gets
its own run folder, lock, `.hydra/`, log file and record as if it had run alone (what
train.main does for one job, ablate/folder.py); only the training itself is shared.
"""
# No `from __future__ import annotations`: Hydra executes plugin modules outside sys.modules,
# where dataclasses cannot resolve string annotations.
import contextlib
import copy
import json
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hydra._internal.callbacks import Callbacks
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)
OWN_TASK = "ablate.train.main"  # the task function (the one @hydra.main wraps) that fuses


@dataclass
class FusedLauncherConf:
    _target_: str = "hydra_plugins.fused_launcher.fused_launcher.FusedLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="fused", node=FusedLauncherConf,
                             provider="ablate")


def task_config(sweep_config: DictConfig) -> DictConfig:
    """What the task function would receive: the job's config without `hydra`."""
    cfg = copy.deepcopy(sweep_config)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def seedless_key(sweep_config: DictConfig) -> str | None:
    """The job's resolved config minus `seed`: equal keys mean the jobs differ only in seed."""
    cfg = task_config(sweep_config)
    if "seed" not in cfg:
        return None
    with open_dict(cfg):
        del cfg["seed"]
    try:
        return json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True, default=str)
    except Exception:  # something that resolves only inside a job: never grouped
        return None


class FusedLauncher(Launcher):
    def __init__(self) -> None:
        super().__init__()
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs locally, seeds of one config fused")
        configs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(
                self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            configs.append(sweep_config)

        groups: dict[str, list[int]] = {}
        for i, sweep_config in enumerate(configs):
            HydraConfig.instance().set_config(sweep_config)  # for ${hydra:...} in the job config
            groups.setdefault(seedless_key(sweep_config) or f"alone {i}", []).append(i)
        returns: list[JobReturn | None] = [None] * len(configs)
        foreign = self._foreign_task()
        repeats = []  # a job typed twice (seed=0,0): it runs after its group, as the basic
        for key, members in groups.items():  # launcher runs a repeat (and skips it, done)
            seeds = [str(configs[i].get("seed")) for i in members]
            repeats += [i for k, i in enumerate(members) if seeds[k] in seeds[:k]]
            groups[key] = [i for i in members if i not in repeats]
        for members in groups.values():
            reason = "one seed" if len(members) == 1 else foreign or self._why_not_fused(configs[members[0]])
            if reason is None:
                for i, ret in zip(members, self._run_fused([configs[i] for i in members])):
                    returns[i] = ret
                continue
            if len(members) > 1:
                log.info("jobs %s run one by one: %s", members, reason)
            for i in members:
                returns[i] = self._run_alone(configs[i])
        for i in repeats:
            returns[i] = self._run_alone(configs[i])
        return returns

    def _foreign_task(self) -> str | None:
        """Why jobs cannot fuse whatever their configs: fusing trains with ablate's own loop, so
        another application's task function (composed from this conf/) runs as it would alone."""
        # Told by name, not by importing ablate.train: its @hydra.main sets Hydra's process-wide
        # version_base, and a foreign app's jobs would then run under 1.3's rules, not its own.
        name = f"{getattr(self.task_function, '__module__', '?')}.{getattr(self.task_function, '__qualname__', '?')}"
        if name == OWN_TASK:
            return None
        return f"the task function is {name}, not {OWN_TASK}; only ablate's own training fuses"

    def _why_not_fused(self, sweep_config: DictConfig) -> str | None:
        from ablate.fused import fusable

        HydraConfig.instance().set_config(sweep_config)
        try:
            return fusable(task_config(sweep_config))
        except Exception as err:  # a broken config: let each job report it on its own
            return f"{type(err).__name__}: {err}"

    def _run_alone(self, sweep_config: DictConfig) -> JobReturn:
        """As Hydra's BasicLauncher runs a job."""
        ret = run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                      config=sweep_config, job_dir_key="hydra.sweep.dir",
                      job_subdir_key="hydra.sweep.subdir")
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret

    def _run_fused(self, sweep_configs: list[DictConfig]) -> list[JobReturn]:
        """Set every job up through run_job (its folder and Hydra's runtime config), then hold and
        accept each job's folder as train.main does, and train the accepted jobs as one stack."""
        from ablate.callbacks import JobOutcome
        from ablate.folder import FolderRefused, accept, locked, logging_to, write_hydra
        from ablate.compose import Interrupted, Job, raise_interrupted, read_record, settle_precision
        from ablate.fused import run_group

        entries = []  # (job, Hydra's config of the job, its task overrides, job name)

        def enlist(cfg: DictConfig) -> JobOutcome:  # the task function of the set-up pass
            hc = HydraConfig.get()
            settle_precision(cfg, hc.job.num)
            job = Job.from_hydra(cfg, hc, multirun=True)
            entries.append((job, copy.deepcopy(HydraConfig.instance().cfg), hc.overrides.task,
                            hc.job.name))
            return JobOutcome("running")  # replaced once the group has trained

        # The set-up pass tells no callback: they hear of each job around the training below.
        quiet = HydraContext(config_loader=self.hydra_context.config_loader, callbacks=Callbacks())
        returns = [run_job(hydra_context=quiet, task_function=enlist, config=c,
                           job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
                   for c in sweep_configs]
        callbacks = self.hydra_context.callbacks
        for c in sweep_configs:
            callbacks.on_job_start(config=c, task_function=self.task_function)
        outcomes: list[JobOutcome | None] = [None] * len(entries)
        handlers = {s: signal.signal(s, raise_interrupted) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            with contextlib.ExitStack() as held:  # every folder is held until the group is done
                accepted = []
                for k, (job, hydra_cfg, overrides, name) in enumerate(entries):
                    try:
                        held.enter_context(locked(job.run_dir))
                        accept(job.run_dir, job.cfg)
                    except FolderRefused as err:
                        log.error("refused: %s", err)
                        outcomes[k] = JobOutcome("refused", str(err))
                        continue
                    write_hydra(job.run_dir, job.cfg, hydra_cfg, overrides)
                    held.enter_context(logging_to(job.run_dir / f"{name}.log"))  # the group's lines
                    accepted.append(k)
                statuses = run_group([entries[k][0] for k in accepted])
            for k, status in zip(accepted, statuses):
                record = read_record(entries[k][0].run_dir)
                outcomes[k] = JobOutcome.of(record, status) if record else JobOutcome(status)
        except Interrupted as err:
            log.error("interrupted by %s; each job's last finished epoch is saved: run the same "
                      "command again to resume", err)
            sys.exit(130 if str(err) == "SIGINT" else 143)
        except Exception as err:  # the records say failed; the sweep's other jobs go on
            log.exception("fused jobs failed; continuing with the sweep")
            outcomes = [o or JobOutcome("failed", f"{type(err).__name__}: {err}") for o in outcomes]
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        for ret, outcome, c in zip(returns, outcomes, sweep_configs):
            ret.return_value = outcome
            HydraConfig.instance().set_config(c)
            callbacks.on_job_end(config=c, job_return=ret)
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return returns
