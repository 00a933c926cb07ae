"""Sweeps on a real SLURM cluster: the one-node cluster `.ci/slurm-cluster start` runs on this
machine (CI starts it before pytest). Jobs are scheduled by slurmctld, run by slurmd, and their
states are read by submitit through sacct; nothing is mocked. A job cancelled with scancel is
counted in the sweep summary, and `.ci/slurm-cluster status` reports this cluster whatever state
folder it is asked about.

Skipped where no cluster answers (sinfo missing or failing), and where the cluster that answers
is not that local one: these tests submit jobs that write to this machine's temporary folders.
The time-limit test starts first, in the background, so the other tests use the node while it
waits for SLURM.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from ablate.record import RunRecord
from conftest import REPO, run_script

CLUSTER = "ablateci"  # ClusterName in the slurm.conf that .ci/slurm-cluster writes
# One CPU and 1 GB per job: the node is this machine (two CPUs in CI), with no GPUs.
SLURM = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=1"]
TINY = ["data=synthetic", "data.train_size=200", "data.test_size=100", "epochs=1",
        "model.filters=[8,16,32]", "threads=1"]
# Long enough to be stopped mid-run: about a second an epoch on two CPU cores.
LONGER = ["data=synthetic", "data.train_size=1500", "data.test_size=100", "epochs=8",
          "model.filters=[8,16,32]", "threads=1"]
USR2 = 1 << (signal.SIGUSR2 - 1)  # its bit in /proc/<pid>/status's pending masks


def _why_not() -> str | None:
    if shutil.which("sinfo") is None:
        return "sinfo not found: no SLURM here (CI starts one with `.ci/slurm-cluster start`)"
    try:
        info = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15)
        config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                                timeout=15)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"no SLURM cluster answers ({err}); start one with `.ci/slurm-cluster start`"
    if info.returncode != 0 or not info.stdout.strip():
        return (f"no SLURM cluster answers (sinfo: {(info.stderr or info.stdout).strip()[:200]}); "
                "start one with `.ci/slurm-cluster start`")
    name = re.search(r"^ClusterName\s*=\s*(\S+)", config.stdout, re.M)
    if name is None or name.group(1) != CLUSTER:
        return (f"the SLURM cluster here ({name.group(1) if name else 'unknown'}) is not the local "
                f"test cluster `.ci/slurm-cluster start` runs ({CLUSTER}): these tests would submit "
                "jobs that write to this machine's temporary folders")
    if not {"idle", "mix", "alloc"} & set(info.stdout.split()):
        return f"the SLURM node is not up (sinfo says {info.stdout.split()})"
    return None


try:
    import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    REASON = _why_not()
except ImportError:
    REASON = 'hydra-submitit-launcher is not installed (pip install -e ".[launchers]")'
pytestmark = [pytest.mark.slow,  # a one-node cluster: about 110 s
              pytest.mark.skipif(REASON is not None, reason=REASON or "")]


def start_sweep(*args: str, log: Path) -> subprocess.Popen:
    """`python ablate/train.py -m ...` in the background, its output into `log`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, str(REPO / "ablate/train.py"), "-m", *args],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    """Wait for a sweep started by start_sweep; its output, or a failure that shows it."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the sweep did not end within {timeout:.0f}s:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    assert proc.returncode == 0, f"the sweep exited {proc.returncode}:\n{text[-3000:]}"
    return text


def job_ids(sweep: Path) -> list[str]:
    """The SLURM ids of a sweep's jobs, as submitit names its files (<id>[_<task>]_submitted.pkl)."""
    return sorted(p.name[: -len("_submitted.pkl")] for p in (sweep / ".submitit").glob("*/*_submitted.pkl"))


def sacct(*args: str) -> list[list[str]]:
    out = subprocess.run(["sacct", "-n", "-P", *args], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    return [line.split("|") for line in out.splitlines() if line]


def wait_for_states(ids: list[str], want: str = "COMPLETED", timeout: float = 60) -> dict:
    """The jobs' states in SLURM's accounting, once all of them say `want` (slurmdbd may lag the
    job's end by a moment); failing with what sacct said after `timeout` s."""
    deadline = time.time() + timeout
    while True:
        states = dict(sacct("-X", "-j", ",".join(ids), "-o", "JobID,State"))
        if set(ids) <= set(states) and all(states[i] == want for i in ids):
            return states
        if time.time() > deadline:
            pytest.fail(f"sacct says {states}, wanted {want} for {ids}")
        time.sleep(1)


def submitit_log(sweep: Path, job: str) -> str:
    return "".join(p.read_text() for p in sorted((sweep / ".submitit" / job).glob("*_log.out")))


def run_folder(sweep: Path, timeout: float = 120) -> Path:
    """The one job folder of a one-job sweep, once its first epoch is checkpointed."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(sweep.glob("*/checkpoint.pt"))
        if found:
            return found[0].parent
        time.sleep(0.1)
    pytest.fail(f"no epoch of {sweep} was checkpointed within {timeout}s")


def job_process(sweep: Path) -> int | None:
    """The pid of the python process a sweep's SLURM job runs on this machine."""
    folder = str(sweep / ".submitit")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # python -u -m submitit.core._submit <folder>; srun's own command line holds the same words
        if (Path(argv[0].decode(errors="replace")).name.startswith("python")
                and b"submitit.core._submit" in argv
                and any(a.decode(errors="replace").startswith(folder) for a in argv)):
            return int(proc.name)
    return None


def usr2_pending(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    masks = re.findall(r"^(?:SigPnd|ShdPnd):\s*([0-9a-f]+)", status, re.M)
    return any(int(m, 16) & USR2 for m in masks)


class TimeLimitedJob:
    """A one-job sweep with a one-minute time limit, started in the background.

    SLURM warns a job before its time limit with submitit's signal (USR2, signal_delay_s before
    the limit, checked every 30 s by slurmctld: here between 20 s and 50 s into the job); submitit
    then checkpoints the call and requeues the job, which resumes from its last epoch. For the
    first run of the job to be certain to meet its limit on any machine, the job's process is
    stopped (SIGSTOP) after its first epoch until SLURM's warning is pending, then continued: a
    run as long as it needs to be, without training for a minute.
    """

    def __init__(self, sweep: Path):
        self.sweep, self.log = sweep, sweep.parent / "time_limit.log"
        sweep.mkdir(parents=True)
        self.proc = start_sweep(*SLURM, "hydra.launcher.timeout_min=1",
                                "hydra.launcher.signal_delay_s=10", *LONGER[:3], "epochs=4",
                                *LONGER[4:], f"hydra.sweep.dir={sweep}", log=self.log)
        self.events: list[str] = []
        self.thread = threading.Thread(target=self._hold_first_run, daemon=True)
        self.thread.start()

    def _hold_first_run(self) -> None:
        deadline = time.time() + 180
        job = pid = None
        try:
            while time.time() < deadline and job is None:
                job = job_process(self.sweep)
                time.sleep(0.2)
            while time.time() < deadline and not list(self.sweep.glob("*/checkpoint.pt")):
                time.sleep(0.02)
            if job is None or time.time() > deadline:
                self.events.append("the job did not start, or saved no epoch, within 180 s")
                return
            os.kill(job, signal.SIGSTOP)
            pid = job
            self.events.append(f"stopped pid {pid} after its first epoch")
            while time.time() < deadline and not usr2_pending(pid):
                time.sleep(0.1)
            self.events.append("SLURM's time-limit warning (USR2) is pending")
        except (OSError, ValueError) as err:
            self.events.append(f"{type(err).__name__}: {err}")
        finally:
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGCONT)
                except OSError:
                    pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        ids = job_ids(self.sweep)
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def time_limited(tmp_path_factory):
    job = TimeLimitedJob(tmp_path_factory.mktemp("slurm_time_limit") / "sweep")
    yield job
    job.stop()


@pytest.fixture(autouse=True, scope="module")
def _start_the_long_test_first(request):
    """Start the time-limit job before the other tests when it is among the selected ones: it
    spends most of its minute waiting for SLURM, while they use the node's other CPU."""
    if any(item.name == "test_a_job_past_its_time_limit_is_requeued_and_completes"
           for item in request.session.items):
        request.getfixturevalue("time_limited")


def test_a_sweep_runs_as_slurm_jobs_and_tables_them(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_script("ablate/train.py", "-m", *SLURM, "loss=ce,focal", *TINY,
                      f"hydra.sweep.dir={sweep}", timeout=300)
    out = proc.stdout + proc.stderr
    assert "Submitit 'slurm' sweep output dir" in out
    assert "2 jobs: 2 completed" in out  # the sweep summary counts its jobs

    ids = job_ids(sweep)  # slurmctld scheduled them and slurmdbd accounted for them
    assert len(ids) == 2, ids
    wait_for_states(ids)

    folders = sorted(p.parent for p in sweep.glob("*/result.json"))
    assert [f.name for f in folders] == [
        f"data=synthetic,data.test_size=100,data.train_size=200,epochs=1,loss={loss},"
        "model.filters=[8,16,32]" for loss in ("ce", "focal")]  # one folder per job, by name
    records = [RunRecord.load(f) for f in folders]
    assert [r.status for r in records] == ["completed", "completed"]
    assert [r.choices["loss"] for r in records] == ["ce", "focal"]
    assert all(r.epochs_run == 1 and (f / "metrics.csv").exists() for r, f in zip(records, folders))

    tables = run_script("analysis/make_tables.py", "--root", str(sweep))
    rows = [ln.split("|")[1].strip() for ln in tables.stdout.splitlines()
            if ln.startswith("| ") and "---" not in ln]
    assert rows[0] == "Loss" and rows[1:] == ["ce", "focal"], tables.stdout
    assert (sweep / "tables" / "tables.md").exists()


def test_a_requeued_job_resumes_and_ends_as_an_uninterrupted_run(tmp_path):
    sweep = tmp_path / "sweep"
    sweeping = start_sweep(*SLURM, *LONGER, f"hydra.sweep.dir={sweep}", log=tmp_path / "sweep.log")
    # the same run, uninterrupted and outside SLURM, at the same time
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    whole = subprocess.Popen([sys.executable, str(REPO / "ablate/train.py"), *LONGER,
                              f"hydra.run.dir={tmp_path / 'whole'}"], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        run_dir = run_folder(sweep)  # its first epoch is saved: requeue it (as pre-emption does)
        [job] = job_ids(sweep)
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, timeout=30)
        finish(sweeping, tmp_path / "sweep.log", timeout=240)
        assert whole.wait(timeout=240) == 0
    finally:
        for proc in (sweeping, whole):
            if proc.poll() is None:
                proc.kill()

    wait_for_states([job])
    runs = [state for jid, state in sacct("-D", "-X", "-j", job, "-o", "JobID,State")]
    assert runs == ["REQUEUED", "COMPLETED"], runs  # one run stopped, one to the end
    assert submitit_log(sweep, job).count("Starting with JobEnvironment") == 2
    log = (run_dir / "train.log").read_text()
    assert "interrupted by SIGTERM" in log
    resumed = re.search(r"resuming after epoch (\d+)", log)
    assert resumed and 1 <= int(resumed.group(1)) < 8, log

    expected = pd.read_csv(tmp_path / "whole" / "metrics.csv").drop(columns="seconds")
    got = pd.read_csv(run_dir / "metrics.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(expected, got, check_exact=True)  # bit for bit
    record, reference = RunRecord.load(run_dir), RunRecord.load(tmp_path / "whole")
    assert record.status == "completed" and record.epochs_run == 8
    for key in ("final_test_acc", "best_test_acc", "best_epoch", "final_train_loss", "config_hash",
                "params", "precision"):
        assert getattr(record, key) == getattr(reference, key), key


def test_a_job_past_its_time_limit_is_requeued_and_completes(time_limited):
    text = finish(time_limited.proc, time_limited.log, timeout=300)
    assert "1 job: 1 completed" in text, text[-3000:]
    [job] = job_ids(time_limited.sweep)
    log = submitit_log(time_limited.sweep, job)
    assert "Caught signal SIGUSR2" in log and "this job is timed-out" in log, (
        time_limited.events, log[-3000:])
    assert re.search(r"Requeued job \S+ \(\d+ remaining timeouts\)", log), log[-3000:]
    assert log.count("Starting with JobEnvironment") == 2, log[-3000:]
    wait_for_states([job])
    runs = [state for jid, state in sacct("-D", "-X", "-j", job, "-o", "JobID,State")]
    assert runs == ["REQUEUED", "COMPLETED"], runs
    limit = sacct("-X", "-j", job, "-o", "TimelimitRaw")[0][0]
    assert limit == "1"  # minutes

    [run_dir] = [p.parent for p in time_limited.sweep.glob("*/result.json")]
    record = RunRecord.load(run_dir)
    assert record.status == "completed" and record.epochs_run == 4
    assert "resuming after epoch" in (run_dir / "train.log").read_text()
    assert len(pd.read_csv(run_dir / "metrics.csv")) == 4


def test_a_cancelled_job_is_named_in_the_summary_and_the_same_command_resumes_it(tmp_path):
    sweep = tmp_path / "sweep"
    args = [*SLURM, "loss=ce,focal", *LONGER, f"hydra.sweep.dir={sweep}"]
    sweeping = start_sweep(*args, log=tmp_path / "sweep.log")
    try:
        deadline = time.time() + 180
        while not list(sweep.glob("*loss=ce*/checkpoint.pt")):  # its first epoch is saved
            if time.time() > deadline or sweeping.poll() is not None:
                log = (tmp_path / "sweep.log").read_text()
                pytest.fail(f"no epoch of loss=ce was saved:\n{log[-3000:]}")
            time.sleep(0.1)
        [array] = {job.split("_")[0] for job in job_ids(sweep)}
        cancelled = f"{array}_0"  # the array's first task: loss=ce, the first job of the sweep
        subprocess.run(["scancel", cancelled], check=True, capture_output=True, timeout=30)
        sweeping.wait(timeout=300)
    finally:
        if sweeping.poll() is None:
            sweeping.kill()
            sweeping.wait()
    out = (tmp_path / "sweep.log").read_text()
    [run_dir] = [p.parent for p in sweep.glob("*loss=ce*/checkpoint.pt")]
    # the other job's result is kept, and the summary names the cancelled one; a job that did not
    # finish makes the sweep exit 1, as a failed one does
    assert sweeping.returncode == 1, out[-3000:]
    assert "Traceback" not in out and "UncompletedJobError" not in out, out[-3000:]
    assert "2 jobs: 1 cancelled, 1 completed" in out, out[-3000:]
    assert (f"cancelled {run_dir.name}: SLURM job {cancelled}: it ended CANCELLED; run the same "
            "command again to resume it") in out, out[-3000:]
    assert dict(sacct("-X", "-j", array, "-o", "JobID,State"))[cancelled].startswith("CANCELLED")
    wait_for_states([f"{array}_1"])
    assert RunRecord.load(run_dir).status == "interrupted"

    again = run_script("ablate/train.py", "-m", *args, timeout=300)
    text = again.stdout + again.stderr
    assert "2 jobs: 1 completed, 1 skipped" in text, text[-3000:]
    assert re.search(r"resuming after epoch [1-7]\b", (run_dir / "train.log").read_text())
    record = RunRecord.load(run_dir)
    assert record.status == "completed" and record.epochs_run == 8


def test_status_reports_the_running_cluster_when_asked_with_another_state_folder(tmp_path):
    env = {**os.environ, "ABLATE_SLURM_STATE": str(tmp_path / "elsewhere")}
    proc = subprocess.run([str(REPO / ".ci/slurm-cluster"), "status"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for daemon in ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd"):
        assert re.search(rf"^{daemon}: running \(pid \d+", proc.stdout, re.M), proc.stdout
    assert re.search(r"^debug\*?\s+up\b", proc.stdout, re.M), proc.stdout  # sinfo's partition line
    assert "was written for the state folder" in proc.stderr  # it says which folder it used
    assert not (tmp_path / "elsewhere").exists()  # and wrote nothing into the one asked about


def test_a_job_that_raised_outside_its_run_is_named_by_its_exception(tmp_path):
    """What the sweep summary says of a job whose submitit wrapper raised (after too many
    timeouts, say): the exception line of the traceback submitit brings back."""
    import submitit

    from hydra_plugins.slurm_launcher.slurm_launcher import raised

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(cpus_per_task=1, mem_gb=1, timeout_min=2)
    job = executor.submit(int, "no number")  # raises in the job, as a builtin, pickled by name
    with pytest.raises(submitit.core.utils.FailedJobError) as err:
        job.results()
    assert raised(err.value) == "ValueError: invalid literal for int() with base 10: 'no number'"
