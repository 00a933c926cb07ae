"""MLflow and W&B loggers against the real libraries, on local stores only: MLflow in a SQLite
file (MLFLOW_TRACKING_URI=sqlite:///...), W&B offline (WANDB_MODE=offline), read back with
MlflowClient and from W&B's offline run files. No server is contacted."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ablate.record import RunRecord
from conftest import REPO, TINY, compose_cfg, run_script

mlflow = pytest.importorskip("mlflow")
wandb = pytest.importorskip("wandb")
from mlflow import MlflowClient  # noqa: E402
from wandb.proto import wandb_internal_pb2  # noqa: E402

from ablate.loggers import MLflow, TensorBoard, WandB, build_loggers  # noqa: E402
from ablate.loop import Callback  # noqa: E402
from ablate.validation import ConfigError  # noqa: E402

RUN = [*TINY, "device=cpu", "save_weights=false", "threads=1"]
# The environment variable the Terminate callback below reads (set only for the run to kill).
KILL_ENV = "ABLATE_TEST_SIGTERM_IN_EPOCH"


@pytest.fixture
def stores(tmp_path, monkeypatch):
    """Local stores for both trackers, in tmp_path; returns the MLflow tracking URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing under ~
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts under ./mlruns
    return uri


def mlflow_runs(uri: str) -> dict[str, object]:
    """Every MLflow run in the store, by its run folder."""
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return {Path(r.data.tags["ablate.run_dir"]): r for r in client.search_runs(experiments)}


def steps(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def wandb_records(path: Path):
    """The protobuf records of a W&B run file (run-<id>.wandb): W&B's LevelDB-style log, a
    7-byte file header, then 32 KiB blocks of chunks (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last), a block's tail under 7 bytes left as padding."""
    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    pos, chunks = header, []
    while pos + header <= len(data):
        if block - pos % block < header:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if kind == 0 and length == 0:  # zero padding up to the next block
            pos += block - pos % block
            continue
        chunks.append(data[pos + header:pos + header + length])
        pos += header + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def wandb_run(run_dir: Path) -> dict:
    """What the W&B run files under a run folder hold, in the order they were written: the run's
    id(s), project, group, config, history (step -> {key: value}), summary and exit codes."""
    out = {"ids": [], "config": {}, "history": [], "summary": {}, "exit": []}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for rec in wandb_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                out["ids"].append(rec.run.run_id)
                out["project"], out["group"] = rec.run.project, rec.run.run_group
                out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "config":
                out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                out["history"].append((rec.history.step.num, items))
            elif kind == "summary":
                out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in rec.summary.update})
            elif kind == "exit":
                out["exit"].append(rec.exit.exit_code)
    return out


def run_folders(sweep: Path) -> list[Path]:
    return sorted(p.parent for p in sweep.glob("*/result.json"))


@pytest.mark.slow
def test_logger_options_compose_into_one_callback_each(stores):
    assert build_loggers(compose_cfg(RUN)) == {}  # logger: none
    assert build_loggers(compose_cfg([*RUN, "logger=none"])) == {}
    loggers = build_loggers(compose_cfg([*RUN, "logger=[tensorboard,mlflow,wandb]"]))
    assert list(loggers) == ["logger.tensorboard", "logger.mlflow", "logger.wandb"]
    assert [type(cb) for cb in loggers.values()] == [TensorBoard, MLflow, WandB]
    assert loggers["logger.mlflow"].uri == stores  # MLFLOW_TRACKING_URI respected
    assert loggers["logger.wandb"].mode == "offline"  # WANDB_MODE respected


def test_the_logger_options_and_their_settings_validate_and_a_typo_is_refused():
    from ablate.validation import validate

    validate(compose_cfg([*RUN, "logger=[tensorboard,mlflow,wandb]", "logger.mlflow.experiment=lab",
                          "logger.mlflow.artifacts=false", "logger.wandb.entity=my-lab"]))
    with pytest.raises(ConfigError, match=r"did you mean `logger\.mlflow\.experiment`"):
        validate(compose_cfg([*RUN, "logger=mlflow", "+logger.mlflow.experimnt=lab"]))


def test_the_loggers_are_not_part_of_a_runs_identity():
    from omegaconf import OmegaConf

    from ablate.record import identity

    plain, logged = (identity(OmegaConf.to_container(compose_cfg([*TINY, *extra]), resolve=True))
                     for extra in ([], ["logger=[mlflow,wandb]", "logger.mlflow.experiment=lab"]))
    assert plain == logged  # turning a tracker on resumes (or skips) the same run


def test_an_unreachable_mlflow_server_or_a_missing_package_is_one_line_before_training(tmp_path, monkeypatch):
    # port 9 (discard) on this machine's loopback: nothing listens, the connection is refused
    cfg = compose_cfg([*RUN, "logger=mlflow", "logger.mlflow.tracking_uri=http://127.0.0.1:9"])
    with pytest.raises(ConfigError) as err:
        build_loggers(cfg)
    assert str(err.value).startswith("logger=mlflow cannot use the tracking store http://127.0.0.1:9: ")
    assert "\n" not in str(err.value)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed: import fails
    with pytest.raises(ConfigError, match=r'^logger=mlflow needs MLflow: pip install -e "\.\[mlflow\]"$'):
        build_loggers(compose_cfg([*RUN, "logger=mlflow"]))
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r'^logger=wandb needs wandb: pip install -e "\.\[wandb\]"$'):
        build_loggers(compose_cfg([*RUN, "logger=wandb"]))


@pytest.mark.slow
def test_an_mlflow_run_ends_as_its_record_and_a_resume_skips_the_epochs_it_holds(tmp_path, stores):
    from omegaconf import OmegaConf

    from ablate.loop import FitState, Loop

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = RunRecord(seed=3, overrides=["loss=mse", "seed=3"],
                       config=OmegaConf.to_container(compose_cfg([*RUN, "loss=mse", "seed=3"]), resolve=True))

    def loop_at(epoch: int) -> Loop:  # what a tracker reads of its run: folder, record, epoch
        return Loop(None, None, None, run_dir, record, {}, None, FitState(epoch=epoch))

    def row(epoch: int) -> dict:
        return {"epoch": epoch, "train_loss": 1 / epoch, "test_acc": epoch / 10, "val_acc": None,
                "seconds": 1.0}

    first = build_loggers(compose_cfg([*RUN, "logger=mlflow"]))["logger.mlflow"]
    first.on_fit_start(loop_at(0))
    for epoch in (1, 2):
        first.on_epoch_end(loop_at(epoch), row(epoch))
    record.status = "interrupted"  # killed after the tracker got epoch 2, before its checkpoint
    first.on_run_end(record)  # as the entry point calls it, once the record is final
    assert first.state_dict() == {"run_id": first.run_id} and isinstance(first.run_id, str)
    assert MlflowClient(stores).get_run(first.run_id).info.status == "KILLED"

    again = build_loggers(compose_cfg([*RUN, "logger=mlflow"]))["logger.mlflow"]
    again.load_state_dict(first.state_dict())  # from the checkpoint of epoch 1
    again.on_fit_start(loop_at(1))
    for epoch in (2, 3):  # epoch 2 trained again, bit for bit
        again.on_epoch_end(loop_at(epoch), row(epoch))
    record.status = "diverged"
    again.on_run_end(record)
    run = MlflowClient(stores).get_run(first.run_id)
    assert run.info.status == "FAILED" and run.data.tags["ablate.status"] == "diverged"
    assert steps(stores, first.run_id, "train_loss") == pytest.approx([(1, 1), (2, 1 / 2), (3, 1 / 3)])
    assert "val_acc" not in run.data.metrics and "seconds" not in run.data.metrics
    assert run.data.params["seed"] == "3"
    assert run.data.params["loss._target_"] == "ablate.losses.OneHotMSELoss"


class DeleteMlflowRun(Callback):
    """A loop callback that deletes its run's MLflow run at the end of epoch 2 (before the loggers,
    which come after the callbacks), as a colleague might in the MLflow UI: the logger's next
    call is refused by the store."""

    def on_epoch_end(self, loop, row):
        if row["epoch"] == 2:
            client = MlflowClient()
            (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
            client.delete_run(run.info.run_id)


@pytest.mark.slow
def test_a_tracker_failing_mid_run_is_recorded_and_the_run_completes(tmp_path, stores):
    from ablate.compose import run

    cfg = compose_cfg([*RUN, "epochs=2", "logger=mlflow",
                       "+callbacks.delete._target_=test_trackers.DeleteMlflowRun"])
    (tmp_path / "run").mkdir()  # Hydra makes a run's folder
    record = run(cfg, tmp_path / "run")
    assert record.status == "completed" and record.epochs_run == 2
    assert record.extra["tracker_mlflow"].startswith("stopped: logging epoch 2: MlflowException")
    assert RunRecord.load(tmp_path / "run").extra == record.extra  # the saved record says so
    client = MlflowClient(stores)
    (deleted,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                    run_view_type=mlflow.entities.ViewType.DELETED_ONLY)
    assert steps(stores, deleted.info.run_id, "test_acc")[0][0] == 1  # epoch 1 made it


@pytest.mark.slow
def test_a_two_seed_sweep_is_two_mlflow_runs_with_params_curves_status_and_files(tmp_path, stores):
    sweep = tmp_path / "multirun" / "seeds"
    run_script("ablate/train.py", "-m", "seed=0,1", "loss=focal", "logger=mlflow", *RUN,
               "hydra.sweep.dir=multirun/seeds", cwd=tmp_path)
    runs = mlflow_runs(stores)
    folders = run_folders(sweep)
    assert sorted(runs) == folders and len(folders) == 2
    client = MlflowClient(stores)
    for run_dir in folders:
        run, record = runs[run_dir], RunRecord.load(run_dir)
        assert client.get_experiment(run.info.experiment_id).name == "multirun/seeds"
        assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
        params = run.data.params
        assert params["seed"] == str(record.seed) and params["choices.loss"] == "focal"
        assert params["loss._target_"] == record.config["loss"]["_target_"]
        assert params["model.filters"] == "[8, 16, 32]" and "device" not in params  # operational
        metrics = pd.read_csv(run_dir / "metrics.csv")
        for column in ("train_loss", "test_acc", "val_acc", "lr"):
            if metrics[column].notna().all():
                assert steps(stores, run.info.run_id, column) == \
                    pytest.approx(list(zip(metrics["epoch"], metrics[column])))
        assert run.data.metrics["final_test_acc"] == pytest.approx(record.final_test_acc)
        assert run.data.tags["ablate.status"] == "completed"
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"result.json", "metrics.csv", ".hydra"} <= files
        assert json.loads(Path(client.download_artifacts(run.info.run_id, "result.json", str(tmp_path)))
                          .read_text())["status"] == "completed"
        assert {a.path for a in client.list_artifacts(run.info.run_id, ".hydra")} >= {".hydra/config.yaml"}
    assert sorted(r.data.params["seed"] for r in runs.values()) == ["0", "1"]


@pytest.mark.slow
def test_a_two_seed_sweep_offline_is_two_wandb_runs(tmp_path, stores):
    sweep = tmp_path / "multirun" / "seeds"
    run_script("ablate/train.py", "-m", "seed=0,1", "loss=focal", "logger=wandb", *RUN,
               "hydra.sweep.dir=multirun/seeds", cwd=tmp_path)
    folders = run_folders(sweep)
    seen, groups = set(), set()
    for run_dir in folders:
        record, w = RunRecord.load(run_dir), wandb_run(run_dir)
        assert len(w["ids"]) == 1 and w["ids"][0] not in seen
        seen.add(w["ids"][0])
        assert w["project"] == "multirun-seeds"
        # the group is the row: what was typed, without the seed and the operational keys
        assert w["group"].startswith("loss=focal ") and "seed=" not in w["group"]
        assert "logger=" not in w["group"] and "threads=" not in w["group"]
        groups.add(w["group"])
        assert w["config"]["seed"] == record.seed and w["config"]["choices"] == record.choices
        assert record.choices["loss"] == "focal"
        assert w["config"]["overrides"] == " ".join(record.overrides)
        metrics = pd.read_csv(run_dir / "metrics.csv")
        assert [step for step, _ in w["history"]] == metrics["epoch"].tolist()
        assert [h["test/acc"] for _, h in w["history"]] == pytest.approx(metrics["test_acc"].tolist())
        assert w["summary"]["final_test_acc"] == pytest.approx(record.final_test_acc)
        assert w["summary"]["status"] == "completed" and w["exit"] == [0]
        files = {p.name for p in run_dir.glob("wandb/offline-run-*/files/**/*")}
        assert {"result.json", "metrics.csv", "config.yaml"} <= files
    assert len(groups) == 1  # the two seeds of the row, together in W&B


class Terminate(Callback):
    """A loop callback that sends its own process SIGTERM in the middle of epoch N
    (ABLATE_TEST_SIGTERM_IN_EPOCH=N; unset, it does nothing): the run is killed as a scheduler
    would kill it, at a point that does not depend on the machine's speed."""

    def __init__(self):
        self.epoch = int(os.environ.get(KILL_ENV, 0))

    def before_step(self, loop, inputs, targets):
        if loop.state.epoch + 1 == self.epoch:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_a_killed_run_resumes_its_mlflow_and_wandb_runs_without_repeating_an_epoch(tmp_path, stores):
    out = tmp_path / "outputs" / "killed"
    args = [sys.executable, str(REPO / "ablate/train.py"), *RUN, "epochs=3", "logger=[mlflow,wandb]",
            "+callbacks.kill._target_=test_trackers.Terminate", f"hydra.run.dir={out}"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "HYDRA_FULL_ERROR": "0"}
    killed = subprocess.run(args, cwd=tmp_path, env={**env, KILL_ENV: "2"}, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == 143, killed.stderr[-2000:]
    assert RunRecord.load(out).status == "interrupted"
    (run,) = mlflow_runs(stores).values()
    assert run.info.status == "KILLED" and run.data.tags["ablate.status"] == "interrupted"
    assert [s for s, _ in steps(stores, run.info.run_id, "test_acc")] == [1]
    first = wandb_run(out)
    assert first["exit"] == [1] and [s for s, _ in first["history"]] == [1]

    resumed = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after epoch 1" in resumed.stdout + resumed.stderr
    (again,) = mlflow_runs(stores).values()  # the same run, continued
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    metrics = pd.read_csv(out / "metrics.csv")
    assert steps(stores, run.info.run_id, "test_acc") == \
        pytest.approx(list(zip(metrics["epoch"], metrics["test_acc"])))  # 1, 2, 3: each once
    both = wandb_run(out)
    assert both["ids"] == [first["ids"][0]] * 2  # the W&B run resumed under its id
    assert [s for s, _ in both["history"]] == [1, 2, 3] and both["exit"] == [1, 0]


@pytest.mark.slow
def test_a_fused_sweep_gives_each_member_its_own_mlflow_and_wandb_run(tmp_path, stores):
    sweep = tmp_path / "multirun" / "fused"
    proc = run_script("ablate/train.py", "-m", "hydra/launcher=fused", "seed=0,1",
                      "logger=[mlflow,wandb]", *RUN, "hydra.sweep.dir=multirun/fused", cwd=tmp_path)
    assert "fused 2 seeds (0, 1)" in proc.stdout + proc.stderr
    runs = mlflow_runs(stores)
    folders = run_folders(sweep)
    assert sorted(runs) == folders and len(folders) == 2
    curves = []
    for run_dir in folders:
        record, run, w = RunRecord.load(run_dir), runs[run_dir], wandb_run(run_dir)
        assert record.extra["fused_members"] == 2 and record.status == "completed"
        assert run.info.status == "FINISHED" and run.data.params["seed"] == str(record.seed)
        metrics = pd.read_csv(run_dir / "metrics.csv")
        history = steps(stores, run.info.run_id, "train_loss")
        assert history == pytest.approx(list(zip(metrics["epoch"], metrics["train_loss"])))
        assert w["config"]["seed"] == record.seed and w["exit"] == [0]
        assert [h["train/loss"] for _, h in w["history"]] == pytest.approx(metrics["train_loss"].tolist())
        curves.append(history)
    assert curves[0] != curves[1]  # each member logged its own seed's curve
    assert len({r.info.run_id for r in runs.values()}) == 2
