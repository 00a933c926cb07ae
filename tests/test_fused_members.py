"""A fused group's members as their callbacks see them: a model to read, and a member whose
callback raises stops the group without blaming the others."""
from __future__ import annotations

import pandas as pd

from ablate.compose import Job
from ablate.fused import run_group
from ablate.loop import Callback
from ablate.record import RunRecord
from ablate.train import run
from conftest import TINY, compose_cfg

SMALL = [*TINY, "data.train_size=256", "precision=fp32", "save_weights=false"]


def jobs_for(root, extra, seeds=(0, 1)):
    jobs = [Job(compose_cfg([*SMALL, *extra, f"seed={s}"]), root / f"seed{s}") for s in seeds]
    for job in jobs:
        job.run_dir.mkdir()
    return jobs


def test_a_callback_reading_loop_model_sees_each_members_weights(tmp_path):
    jobs = jobs_for(tmp_path, ["+callbacks=weight_norm"])
    assert run_group(jobs) == ["completed", "completed"]
    norms = [pd.read_csv(job.run_dir / "metrics.csv")["weight_norm"] for job in jobs]
    assert not norms[0].equals(norms[1])  # each member's own weights
    (tmp_path / "alone1").mkdir()
    alone = run(compose_cfg([*SMALL, "+callbacks=weight_norm", "seed=1"]), tmp_path / "alone1")
    assert alone.status == "completed"
    expected = pd.read_csv(tmp_path / "alone1" / "metrics.csv")["weight_norm"]
    assert (norms[1] - expected).abs().max() <= 1e-3 * expected.abs().max()  # fp32 sums, stacked vs alone


class FailsForSeed1(Callback):
    def on_epoch_end(self, loop, row: dict) -> None:
        if loop.record.seed == 1 and row["epoch"] == 2:
            raise RuntimeError("seed 1's callback broke")


def test_one_members_failing_callback_stops_the_group_and_names_it(tmp_path):
    failing = [f"+callbacks.fails._target_={__name__}.FailsForSeed1", "epochs=3"]
    jobs = jobs_for(tmp_path, failing)
    assert run_group(jobs) == ["interrupted", "failed"]
    bystander, culprit = (RunRecord.load(job.run_dir) for job in jobs)
    assert culprit.status == "failed" and "seed 1's callback broke" in culprit.error
    assert bystander.status == "interrupted" and str(jobs[1].run_dir) in bystander.error
    # member 0 finished epoch 2 (its callbacks ran first) before member 1's raised
    assert "re-run to resume" in bystander.error and bystander.epochs_run == 2
    # the bystander's own callbacks never fail: re-run, it resumes after epoch 2 and completes
    first = pd.read_csv(jobs[0].run_dir / "metrics.csv")
    assert run_group(jobs[:1]) == ["completed"]
    rows = pd.read_csv(jobs[0].run_dir / "metrics.csv")
    assert list(rows["epoch"]) == [1, 2, 3] and list(rows["seconds"][:2]) == list(first["seconds"])
