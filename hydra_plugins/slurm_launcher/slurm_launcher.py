"""hydra-submitit-launcher's SLURM and local launchers, accounting for every job.

Its launcher waits for each job's result in turn, and a job that ended without one (cancelled
with scancel, its node failed, or submitit gave up after too many timeouts) raises
UncompletedJobError there: the sweep command ends in a traceback, the sweep summary is never
printed, and the other jobs' results are not collected. Here such a job becomes that job's
outcome (`cancelled`, or `failed`, with SLURM's word for how it ended); the other jobs are waited
for as usual, and the summary names it. Its run folder keeps its checkpoint, so the same command
again resumes it. conf/hydra/launcher/{slurm,local}.yaml select these classes.
"""
# No `from __future__ import annotations`: Hydra executes plugin modules outside sys.modules.
import logging
import os
from pathlib import Path
from typing import List, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf, open_dict

try:
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
except ImportError:  # pip install -e ".[launchers]"; Hydra's plugin scan must not warn without it
    submitit_launcher = None

log = logging.getLogger(__name__)


class EveryJobAccounted:
    """The launch of submitit's launchers, except that a job without a result is reported."""

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> List[JobReturn]:
        import submitit  # when a sweep launches: plugin discovery stays fast

        kind = self._EXECUTOR  # "slurm" | "local"
        params = dict(self.params)
        made_with = {}  # the folder and max_num_timeout (SLURM's only) make the executor
        if "max_num_timeout" in params:
            made_with[f"{kind}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster=kind, folder=params.pop("submitit_folder"),
                                         **made_with)
        # the queue settings every executor knows go as they are; the others are the executor's own
        common = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in common else f"{kind}_{k}": v
                                      for k, v in params.items()})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        log.info(f"Submitit '{kind}' sweep output dir : {sweep_dir}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))

        calls = []  # the arguments of each job's call of this launcher (__call__, in the job)
        for num, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
            calls.append((list(overrides), "hydra.sweep.dir", num, f"job_id_for_{num}",
                          Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*calls))
        return [self._result(job, overrides, num)
                for job, (overrides, _, num, _, _) in zip(jobs, calls)]

    def _result(self, job, overrides: List[str], num: int) -> JobReturn:
        """The job's JobReturn; for a job that ended without one, its outcome as the sweep
        summary counts it (reported here: the job never reached its own end)."""
        from submitit.core.utils import FailedJobError, UncompletedJobError

        try:
            return job.results()[0]
        except UncompletedJobError:  # no result at all: SLURM ended the job
            state = (job.state or "UNKNOWN").split()[0]  # CANCELLED (by uid), NODE_FAIL, ...
            status, why = ("cancelled" if state == "CANCELLED" else "failed"), f"it ended {state}"
        except FailedJobError as err:  # submitit's wrapper raised, e.g. after too many timeouts
            status, why = "failed", raised(err)
        from ablate.callbacks import JobOutcome

        name = f"{'SLURM' if self._EXECUTOR == 'slurm' else 'submitit'} job {job.job_id}"
        outcome = JobOutcome(status, f"{name}: {why}; run the same command again to resume it")
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.num = num
            config.hydra.job.id = job.job_id
            config.hydra.runtime.output_dir = str(Path(str(self.config.hydra.sweep.dir))
                                                  / config.hydra.sweep.subdir)
        ret = JobReturn(overrides=overrides, cfg=config, hydra_cfg=config,
                        working_dir=config.hydra.runtime.output_dir,
                        task_name=config.hydra.job.name, status=JobStatus.COMPLETED,
                        _return_value=outcome)
        self.hydra_context.callbacks.on_job_end(config=config, job_return=ret)
        return ret


def raised(err: Exception) -> str:
    """The exception line of a FailedJobError: its message is the job's traceback between two
    dashed lines, followed by where the job's logs are."""
    parts = str(err).split("\n" + "-" * 22 + "\n")
    trace = parts[1] if len(parts) == 3 else str(err)
    return [line.strip() for line in trace.splitlines() if line.strip()][-1]


if submitit_launcher is not None:
    class SlurmLauncher(EveryJobAccounted, submitit_launcher.SlurmLauncher):
        """hydra/launcher=slurm (conf/hydra/launcher/slurm.yaml)."""

    class LocalLauncher(EveryJobAccounted, submitit_launcher.LocalLauncher):
        """hydra/launcher=local (conf/hydra/launcher/local.yaml)."""
