"""Fused seeds (ablate/fused.py, hydra/launcher=fused): each member ends as its seed's run alone."""
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from torch import nn

import ablate.loop
from ablate import fused, savers
from ablate.fused import Job, Stack, fusable, optimizer_acts_per_member, run_group
from ablate.loop import Callback, step_scheduler
from ablate.record import RunRecord, WriteError
from ablate.compose import build
from ablate.train import run
from conftest import CONF, REPO, TINY, compose_cfg, run_script

CASES = {
    "ce-adam-cosine": ["loss=ce", "optim=adam", "sched=cosine"],
    "label_smoothing-sgd-step": ["loss=label_smoothing", "optim=sgd", "optim.lr=0.05", "sched=step",
                                 "sched.step_size=1", "l1_lambda=1e-4"],
}
SEEDS = (0, 1)
# Pinned to fp32: the tolerances below are fp32's. precision=auto is bf16 on a CPU with bf16
# instructions, where fused and alone differ as much as two precisions do (the bf16 tests below).
SMALL = [*TINY, "data.train_size=256", "precision=fp32"]  # 4 steps an epoch
LAUNCH = [*TINY, "data.train_size=128", "data.test_size=100"]  # the launcher's tests: 2 steps
# fp32 on CPU: a stacked model runs grouped convolutions and batched matmuls, whose sums round
# differently from one model's (~1e-7 per op); two epochs of training grow that to 1e-5..2e-3 in
# the losses and now and then a test image or two (0.5% each) changing class.
LOSS_TOL, ACC_TOL = 5e-3, 0.02
COMPARED = ["train_loss", "test_loss", "train_acc", "test_acc"]


def metrics(run_dir):
    return pd.read_csv(run_dir / "metrics.csv")


def single_runs(root, overrides, seeds=SEEDS):
    for seed in seeds:
        run_dir = root / f"alone{seed}"
        run_dir.mkdir()
        run(compose_cfg([*SMALL, *overrides, f"seed={seed}"]), run_dir, {}, [])
    return {seed: metrics(root / f"alone{seed}") for seed in seeds}


def fused_jobs(root, overrides, seeds=SEEDS):
    jobs = [Job(compose_cfg([*SMALL, *overrides, f"seed={s}"]), root / f"fused{s}") for s in seeds]
    for job in jobs:
        job.run_dir.mkdir()
    return jobs


def assert_close(fused_rows, alone_rows):
    assert list(fused_rows["epoch"]) == list(alone_rows["epoch"])
    assert list(fused_rows["lr"]) == list(alone_rows["lr"])  # the schedule exactly
    for col in COMPARED:
        tol = LOSS_TOL if "loss" in col else ACC_TOL
        diff = (fused_rows[col] - alone_rows[col]).abs().max()
        assert diff <= tol, f"{col} differs by {diff}"


@pytest.fixture(scope="module")
def alone_ce(tmp_path_factory):
    root = tmp_path_factory.mktemp("alone_ce")
    return single_runs(root, CASES["ce-adam-cosine"])


@pytest.mark.parametrize("case", CASES)
def test_each_fused_seed_matches_its_run_alone(case, tmp_path, alone_ce):
    alone = alone_ce if case == "ce-adam-cosine" else single_runs(tmp_path, CASES[case])
    jobs = fused_jobs(tmp_path, CASES[case])
    assert run_group(jobs) == ["completed"] * len(SEEDS)
    for seed, job in zip(SEEDS, jobs):
        record = RunRecord.load(job.run_dir)
        assert record.status == "completed" and record.seed == seed
        assert record.extra["fused_members"] == 2
        assert (job.run_dir / "best_model.pth").exists() and record.weights_file
        assert json.loads((job.run_dir / "result.json").read_text())["status"] == "completed"
        assert_close(metrics(job.run_dir), alone[seed])
    # The tolerance tells seeds apart: a member is not within it of the other seed's run.
    with pytest.raises(AssertionError, match="differs by"):
        assert_close(metrics(jobs[0].run_dir), alone[1])


def test_a_diverged_member_is_recorded_and_the_others_go_on(tmp_path, alone_ce, monkeypatch):
    real = fused.train_stack_epoch

    def poison_the_last_member(stack, *args, **kwargs):
        if stack.size == 3:  # epoch 1, before the member is dropped
            with torch.no_grad():
                next(iter(stack.params.values()))[2].fill_(math.inf)
        return real(stack, *args, **kwargs)

    monkeypatch.setattr(fused, "train_stack_epoch", poison_the_last_member)
    jobs = fused_jobs(tmp_path, CASES["ce-adam-cosine"], seeds=(0, 1, 7))
    assert run_group(jobs) == ["completed", "completed", "diverged"]
    assert RunRecord.load(jobs[2].run_dir).error == "training loss became nan in epoch 1"
    assert not (jobs[2].run_dir / "metrics.csv").exists()  # as alone: no finished epoch
    # Epoch 2 ran on a stack of two with the survivors' optimizer state carried over.
    for seed, job in zip(SEEDS, jobs):
        assert_close(metrics(job.run_dir), alone_ce[seed])


def test_a_member_whose_loss_explodes_diverges_as_it_would_alone(tmp_path, monkeypatch):
    real = fused.train_stack_epoch

    def explode_the_last_member(stack, *args, **kwargs):
        out = real(stack, *args, **kwargs)
        if stack.size == 3:  # finite, but far above its first step: loop.divergence's rule
            out["loss"][2] = 20 * out["first_loss"][2]
        return out

    monkeypatch.setattr(fused, "train_stack_epoch", explode_the_last_member)
    jobs = fused_jobs(tmp_path, CASES["ce-adam-cosine"], seeds=(0, 1, 7))
    assert run_group(jobs) == ["completed", "completed", "diverged"]
    assert "exploded" in RunRecord.load(jobs[2].run_dir).error


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "optim").glob("*.yaml")))
def test_one_optimizer_over_the_stack_equals_one_per_member(option):
    cfg = compose_cfg([f"optim={option}"])
    assert optimizer_acts_per_member(lambda ps: build(cfg, "optim", ps))


def test_an_optimizer_with_per_tensor_statistics_is_refused():
    # Adafactor factors a matrix's second moment by rows and columns but keeps a vector's
    # whole: a stacked bias is a matrix, so one Adafactor over the stack is not N Adafactors.
    assert not optimizer_acts_per_member(lambda ps: torch.optim.Adafactor(ps, lr=1e-2))
    cfg = compose_cfg([*SMALL, "optim._target_=torch.optim.Adafactor", "~optim.weight_decay"])
    assert "differs from one per member" in fusable(cfg)


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "sched").glob("*.yaml")))
def test_schedulers_fuse_unless_they_follow_a_members_loss(option):
    extra = ["sched.step_size=2"] if option == "step" else []
    cfg = compose_cfg([*SMALL, f"sched={option}", "epochs=6", *extra])
    # Two members whose monitored losses differ (one improves, one stalls), each with its own
    # optimizer and scheduler stepped as loop.fit steps them: when their learning rates agree
    # at every epoch, the one scheduler over the stack gives each member its own schedule.
    lrs = []
    for losses in ([1.0 / (e + 1) for e in range(6)], [1.0] * 6):
        optimizer = build(cfg, "optim", [torch.zeros(1, requires_grad=True)])
        scheduler = build(cfg, "sched", optimizer)
        lrs.append([])
        for loss in losses:
            lrs[-1].append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            step_scheduler(scheduler, loss)
    if option == "plateau":
        assert lrs[0] != lrs[1]
        assert "plateau" in fusable(cfg)
    else:
        assert lrs[0] == lrs[1]
        assert fusable(cfg) is None


@pytest.mark.parametrize("overrides, reason", [
    (["swa.start_epoch=2"], "SWA"),
    (["+probe=landscape"], "probe"),
    (["compile=true"], "compile"),
])
def test_swa_the_probe_and_compile_are_not_fused(overrides, reason):
    assert reason in fusable(compose_cfg([*SMALL, *overrides]))


def test_a_model_drawing_other_random_numbers_is_refused():
    class Noisy(nn.Module):  # noise drawn inside the forward, from the global generator
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))

        def forward(self, x):
            return self.net(x + 0.1 * torch.randn_like(x))

    stack = Stack([Noisy(), Noisy()], nn.CrossEntropyLoss())
    rngs = [torch.Generator().manual_seed(i) for i in range(2)]
    with pytest.raises(RuntimeError, match="randomness"):
        stack.train_forward(torch.zeros(2, 4, 3, 32, 32), torch.zeros(2, 4, dtype=torch.long), rngs)


def test_rerunning_members_that_diverged_keeps_the_epochs_they_finished(tmp_path, monkeypatch):
    real, calls, explode_at = fused.train_stack_epoch, [], [2]

    def explode_two_members(stack, *args, **kwargs):  # seeds 1 and 7, in the epoch explode_at
        out = real(stack, *args, **kwargs)
        calls.append(stack.size)
        if len(calls) == explode_at[0]:
            for m in ([1, 2] if stack.size == 3 else [0, 1]):
                out["loss"][m] = 20 * out["first_loss"][m]
        return out

    monkeypatch.setattr(fused, "train_stack_epoch", explode_two_members)
    jobs = fused_jobs(tmp_path, CASES["ce-adam-cosine"], seeds=(0, 1, 7))
    assert run_group(jobs) == ["completed", "diverged", "diverged"]
    first = [RunRecord.load(job.run_dir) for job in jobs[1:]]
    assert [r.epochs_run for r in first] == [1, 1] and all(r.final_test_acc is not None for r in first)
    # the re-run resumes both from epoch 1, together, and they diverge again in epoch 2
    calls.clear()
    explode_at[0] = 1
    assert run_group(jobs) == ["skipped", "diverged", "diverged"]
    assert calls == [2]
    for before, job in zip(first, jobs[1:]):
        after = RunRecord.load(job.run_dir)
        assert (after.status, after.epochs_run, after.final_test_acc, after.best_test_acc) == \
            (before.status, before.epochs_run, before.final_test_acc, before.best_test_acc)


# ----------------------------------------------------------------------------- the launcher

def records(sweep_dir):
    """The sweep's records by seed (job folders are named by their overrides)."""
    found = [json.loads(p.read_text()) for p in sweep_dir.glob("*/result.json")]
    return {r["seed"]: r for r in found}


def folder(sweep_dir, seed):
    return next(p.parent for p in sweep_dir.glob("*/result.json")
                if json.loads(p.read_text())["seed"] == seed)


@pytest.mark.slow
def test_fused_sweep_trains_only_the_unfinished_seeds_together(tmp_path):
    sweep = tmp_path / "sweep"
    common = [*LAUNCH, f"hydra.sweep.dir={sweep}"]
    run_script("ablate/train.py", "-m", "seed=0", *common)  # seed 0 done beforehand, unfused
    done = (folder(sweep, 0) / "metrics.csv").stat().st_mtime_ns

    proc = run_script("ablate/train.py", "-m", "hydra/launcher=fused", "seed=0,1,2", *common)
    recs = records(sweep)
    assert sorted(recs) == [0, 1, 2] and len(list(sweep.glob("*/result.json"))) == 3
    assert [recs[k]["status"] for k in range(3)] == ["completed"] * 3
    assert (folder(sweep, 0) / "metrics.csv").stat().st_mtime_ns == done
    out = proc.stdout + proc.stderr
    assert "fused 2 seeds (1, 2)" in out and "3 jobs: 2 completed, 1 skipped" in out
    for k in (1, 2):
        assert recs[k]["extra"]["fused_members"] == 2
        run_dir = folder(sweep, k)
        assert f"- seed={k}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
        assert (run_dir / "best_model.pth").exists() and (run_dir / "metrics.csv").exists()
        assert "fused 2 seeds" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_a_group_that_cannot_fuse_runs_one_by_one(tmp_path):
    sweep = tmp_path / "swa"
    proc = run_script("ablate/train.py", "-m", "hydra/launcher=fused", "seed=0,1",
                      "swa.start_epoch=2", *LAUNCH, f"hydra.sweep.dir={sweep}")
    assert "run one by one: SWA" in proc.stdout + proc.stderr
    recs = records(sweep)
    assert [r["status"] for r in recs.values()] == ["completed"] * 2
    assert all("swa_test_acc" in r["extra"] and "fused_members" not in r["extra"]
               for r in recs.values())


@pytest.mark.slow
def test_sigterm_mid_group_then_rerun_equals_an_uninterrupted_fused_run(tmp_path):
    # fp32 pinned: seed 1 finished alone is held to the fp32 tolerances of fused against alone
    common = ["-m", "hydra/launcher=fused", "seed=0,1", *LAUNCH, "epochs=3", "precision=fp32"]
    whole = tmp_path / "whole"
    run_script("ablate/train.py", *common, f"hydra.sweep.dir={whole}")

    cut = tmp_path / "cut"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(REPO / "ablate/train.py"), *common,
                             f"hydra.sweep.dir={cut}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(cut.glob("*/checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    stopped = records(cut)
    assert {r["status"] for r in stopped.values()} == {"interrupted"}
    assert stopped[0]["epochs_run"] < 3
    assert stopped[0]["epochs_run"] == stopped[1]["epochs_run"]  # one epoch for the group
    # A member's checkpoint is a single run's: seed 1 can also finish alone from it.
    shutil.copytree(folder(cut, 1), tmp_path / "alone1")
    alone = run(compose_cfg([*LAUNCH, "epochs=3", "precision=fp32", "seed=1"]), tmp_path / "alone1", {}, [])
    assert alone.status == "completed" and alone.epochs_run == 3
    assert_close(metrics(tmp_path / "alone1"), metrics(folder(whole, 1)))

    proc = run_script("ablate/train.py", *common, f"hydra.sweep.dir={cut}")
    assert "fused 2 seeds (0, 1)" in proc.stdout + proc.stderr  # resumed together
    for k in (0, 1):
        assert records(cut)[k]["status"] == "completed"
        pd.testing.assert_frame_equal(metrics(folder(whole, k)).drop(columns="seconds"),
                                      metrics(folder(cut, k)).drop(columns="seconds"),
                                      check_exact=True)


@pytest.mark.slow
def test_another_applications_task_function_is_called_not_replaced(tmp_path):
    # An app of someone else's composed from this conf/: the fused launcher must run *its* function.
    app = tmp_path / "app.py"
    app.write_text(
        "import pathlib, hydra\nfrom hydra.core.hydra_config import HydraConfig\n"
        f"@hydra.main(version_base='1.3', config_path={str(CONF)!r}, config_name='config')\n"
        "def app(cfg):\n"
        "    out = pathlib.Path(HydraConfig.get().runtime.output_dir)\n"
        "    (out / f'called_with_seed_{cfg.seed}').write_text('yes')\n"
        "    return 0\n"
        "app()\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run([sys.executable, str(app), "-m", "hydra/launcher=fused", "seed=0,1", *LAUNCH,
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "only ablate's own training fuses" in proc.stdout + proc.stderr
    called = sorted(p.name for p in (tmp_path / "sweep").rglob("called_with_seed_*"))
    assert called == ["called_with_seed_0", "called_with_seed_1"]
    assert not list((tmp_path / "sweep").rglob("result.json"))  # ablate's training never ran


HYDRA_SUITES = """
import pytest
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite


@pytest.mark.parametrize("launcher_name, overrides", [("fused", [])])
class TestFusedLauncher(LauncherTestSuite):
    pass


@pytest.mark.parametrize("task_launcher_cfg, extra_flags", [({}, ["-m", "hydra/launcher=fused"])])
class TestFusedLauncherIntegration(IntegrationTestSuite):
    pass
"""


@pytest.mark.slow
def test_hydras_own_launcher_test_suites_pass_for_fused(tmp_path):
    # In a fresh interpreter, as a user's app meets the launcher: this one has imported ablate.train,
    # whose @hydra.main sets Hydra's version_base for the whole process (foreign apps then ran
    # under 1.3's rules, not their own, and their jobs in the shell's folder).
    (tmp_path / "test_hydra_suites.py").write_text(HYDRA_SUITES)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "test_hydra_suites.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    summary = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0 and " failed" not in summary, proc.stdout[-3000:]
    assert int(summary.split(" passed")[0].split()[-1]) >= 20, summary  # 9 + 11 with Hydra 1.3


@pytest.mark.slow
def test_a_seed_typed_twice_trains_once_and_the_repeat_is_skipped(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_script("ablate/train.py", "-m", "hydra/launcher=fused", "seed=0,0,1", *LAUNCH,
                      f"hydra.sweep.dir={sweep}")
    out = proc.stdout + proc.stderr
    assert "3 jobs: 2 completed, 1 skipped" in out and "refused" not in out
    assert "fused 2 seeds (0, 1)" in out


def test_a_full_disk_in_one_member_fails_the_group_in_one_line_naming_whose_file(tmp_path, monkeypatch, caplog):
    real = savers.atomic_torch_save

    def full_for_seed_0(obj, path):
        if path.parent.name == "fused0" and path.name == "checkpoint.pt":
            raise WriteError(errno.ENOSPC, f"cannot write {path}: No space left on device")
        return real(obj, path)

    monkeypatch.setattr(savers, "atomic_torch_save", full_for_seed_0)
    jobs = fused_jobs(tmp_path, CASES["ce-adam-cosine"])
    assert run_group(jobs) == ["failed", "failed"]  # no traceback escapes
    full = f"cannot write {jobs[0].run_dir / 'checkpoint.pt'}: No space left on device"
    assert RunRecord.load(jobs[0].run_dir).error == full
    assert RunRecord.load(jobs[1].run_dir).error == f"stopped with its fused group: {full}"
    assert "Traceback" not in caplog.text and full in caplog.text


# ----------------------------------------------------------------------------- one loop

def test_callbacks_loggers_and_step_losses_fuse_and_each_member_sees_its_own_run(tmp_path):
    extra = [*CASES["ce-adam-cosine"], "+callbacks=grad_norm", "logger=tensorboard", "log_steps=true"]
    assert fusable(compose_cfg([*SMALL, *extra])) is None
    alone = single_runs(tmp_path, extra)
    jobs = fused_jobs(tmp_path, extra)
    assert run_group(jobs) == ["completed"] * len(SEEDS)
    for seed, job in zip(SEEDS, jobs):
        assert RunRecord.load(job.run_dir).extra["fused_members"] == 2
        rows = metrics(job.run_dir)
        assert_close(rows, alone[seed])
        # each member's own gradients, as its run alone measured them
        alone_norm = alone[seed]["grad_norm"]
        assert ((rows["grad_norm"] - alone_norm).abs() / alone_norm).max() < 0.02
        steps = pd.read_csv(job.run_dir / "steps.csv")
        alone_steps = pd.read_csv(tmp_path / f"alone{seed}" / "steps.csv")
        assert list(steps["epoch"]) == list(alone_steps["epoch"])
        assert (steps["loss"] - alone_steps["loss"]).abs().max() <= LOSS_TOL
        assert list((job.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    # the seeds are told apart: member 0's norms are not member 1's
    assert not metrics(jobs[0].run_dir)["grad_norm"].equals(metrics(jobs[1].run_dir)["grad_norm"])


@pytest.mark.slow
def test_a_fused_sweep_with_a_callback_and_tensorboard_trains_fused(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sweep = tmp_path / "sweep"
    proc = run_script("ablate/train.py", "-m", "hydra/launcher=fused", "seed=0,1,2",
                      "+callbacks=grad_norm", "logger=tensorboard", *LAUNCH, "epochs=2",
                      f"hydra.sweep.dir={sweep}")
    assert "fused 3 seeds (0, 1, 2)" in proc.stdout + proc.stderr
    recs = records(sweep)
    for k in range(3):
        assert recs[k]["status"] == "completed" and recs[k]["extra"]["fused_members"] == 3
        run_dir = folder(sweep, k)
        assert metrics(run_dir)["grad_norm"].notna().all()
        events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
        assert [e.step for e in events.Scalars("grad_norm")] == [1, 2]
        assert [e.step for e in events.Scalars("test/acc")] == [1, 2]


# ----------------------------------------------------------------------------- no run starts over

class StopInEpoch2(Callback):
    def on_epoch_end(self, loop, row: dict) -> None:
        if row["epoch"] == 2:
            raise RuntimeError("stopped in epoch 2")


def test_fused_members_with_a_numpy_callback_resume_and_rebuild_a_lost_record(tmp_path):
    extra = [*CASES["ce-adam-cosine"], "+callbacks.mean._target_=test_adversarial.NumpyState"]
    stopped = fused_jobs(tmp_path, [*extra, "+callbacks.stop._target_=test_fused.StopInEpoch2"])
    assert "completed" not in run_group(stopped)  # each checkpoint holds epoch 1
    first = [metrics(job.run_dir) for job in stopped]
    jobs = [Job(compose_cfg([*SMALL, *extra, f"seed={s}"]), job.run_dir) for s, job in zip(SEEDS, stopped)]
    assert run_group(jobs) == ["completed"] * len(SEEDS)
    records = []
    for job, before in zip(jobs, first):
        rows = metrics(job.run_dir)
        assert rows["seconds"][0] == before["seconds"][0]  # epoch 1 was not trained again
        assert rows["mean_loss"][1] == pytest.approx(rows["train_loss"].mean())  # the array went on
        records.append(RunRecord.load(job.run_dir))
        (job.run_dir / "result.json").unlink()  # lost: rebuilt from the finished checkpoint
    assert run_group(jobs) == ["skipped"] * len(SEEDS)
    assert [RunRecord.load(job.run_dir) for job in jobs] == records


# ----------------------------------------------------------------------------- bf16

# precision=auto as on a CPU with bf16 instructions (forced below, so on any CPU; emulated bf16
# is slow, hence the tiny network). In bf16 "fused equals alone" means within what separates a
# bf16 run from the fp32 run of the same seed: each rounds its sums to 8 bits of mantissa, so the
# stack's other order of additions shows up about as much as the precision itself
# (docs/fused-and-performance.md gives the measured numbers).
BF16 = [*TINY, "data.train_size=256", "model.filters=[4,8,16]", "save_weights=false"]
BF16_LOSS_TOL, BF16_ACC_TOL = 0.03, 0.05


def assert_close_bf16(rows, other):
    assert list(rows["lr"]) == list(other["lr"])  # the schedule exactly, in any precision
    for col in COMPARED:
        tol = BF16_LOSS_TOL if "loss" in col else BF16_ACC_TOL
        diff = (rows[col] - other[col]).abs().max()
        assert diff <= tol, f"{col} differs by {diff}"


@pytest.mark.slow
def test_bf16_fused_seeds_match_their_runs_alone_as_closely_as_bf16_matches_fp32(tmp_path, monkeypatch):
    monkeypatch.setattr(ablate.loop, "cpu_computes_bf16", lambda: True)  # auto -> bf16 here too
    case = [*BF16, *CASES["ce-adam-cosine"]]
    alone, fp32 = {}, {}
    for seed in SEEDS:
        for precision, into in (("auto", alone), ("fp32", fp32)):
            run_dir = tmp_path / f"{precision}{seed}"
            run_dir.mkdir()
            run(compose_cfg([*case, f"precision={precision}", f"seed={seed}"]), run_dir, {}, [])
            into[seed] = metrics(run_dir)
    jobs = [Job(compose_cfg([*case, "precision=auto", f"seed={s}"]), tmp_path / f"fused{s}") for s in SEEDS]
    for job in jobs:
        job.run_dir.mkdir()
    assert run_group(jobs) == ["completed"] * len(SEEDS)
    for seed, job in zip(SEEDS, jobs):
        record = RunRecord.load(job.run_dir)
        assert record.precision == "bf16" and record.extra["fused_members"] == 2
        assert RunRecord.load(tmp_path / f"auto{seed}").precision == "bf16"
        assert_close_bf16(metrics(job.run_dir), alone[seed])
        assert_close_bf16(alone[seed], fp32[seed])  # the yardstick: bf16 against fp32, one seed
    with pytest.raises(AssertionError, match="differs by"):  # and the seeds are still told apart
        assert_close_bf16(metrics(jobs[0].run_dir), alone[1])
