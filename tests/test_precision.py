"""precision=auto on a CPU: bf16 where the CPU has bf16 instructions, fp32 elsewhere; the run
records what it computed in, and a bf16 run trains and resumes bit for bit as an fp32 one does."""
from __future__ import annotations

import csv
import json

import pytest
import torch

import ablate.loop
from ablate.loop import pick_precision, resolve_precision
from ablate.record import CHECKPOINT_FILE, RESULT_FILE, RunRecord
from ablate.train import Interrupted, run, settle_precision
from conftest import compose_cfg

CPU = torch.device("cpu")
# bf16 is emulated (slow) on CPUs without bf16 instructions: keep the network tiny.
TINY_BF16 = ["data=synthetic", "data.train_size=256", "data.test_size=128", "epochs=3",
             "model.filters=[4,8,16]", "batch_size=64", "save_weights=false"]


@pytest.mark.parametrize("has_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_a_cpu_follows_its_bf16_instructions(monkeypatch, has_bf16, expected):
    monkeypatch.setattr(ablate.loop, "cpu_computes_bf16", lambda: has_bf16)
    assert resolve_precision("auto", CPU) == expected
    p = pick_precision("auto", CPU)
    assert p.name == expected and p.channels_last and p.scaler is None
    assert p.autocast_dtype == (torch.bfloat16 if has_bf16 else None)
    # an explicit choice is kept whatever the CPU has
    assert pick_precision("fp32", CPU).autocast_dtype is None
    assert pick_precision("bf16", CPU).autocast_dtype == torch.bfloat16


def test_the_config_names_the_resolved_precision_before_the_folder_is_judged(monkeypatch):
    for has_bf16, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(ablate.loop, "cpu_computes_bf16", lambda: has_bf16)
        cfg = compose_cfg(["device=cpu"])
        settle_precision(cfg)
        assert cfg.precision == expected  # what .hydra/config.yaml and the identity then hold
    cfg = compose_cfg(["device=cpu", "precision=fp16"])
    settle_precision(cfg)
    assert cfg.precision == "fp16"


def _rows(run_dir):
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    for row in rows:
        row.pop("seconds")
    return rows


def test_a_bf16_run_learns_records_bf16_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    cfg = compose_cfg([*TINY_BF16, "precision=bf16", "device=cpu"])
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir(), parts.mkdir()
    record = run(cfg, whole, {}, [])
    assert record.status == "completed" and record.precision == "bf16"
    assert json.loads((whole / RESULT_FILE).read_text())["precision"] == "bf16"
    losses = [float(r["train_loss"]) for r in _rows(whole)]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    assert record.final_test_acc > 0.2  # chance is 0.1

    # Stopped inside epoch 2, as SIGTERM's handler does, then run again: the same rows, exactly.
    calls, stop, original = [], ["epoch 2/3"], ablate.loop.train_one_epoch

    def train_one_epoch(*args, **kwargs):
        calls.append(kwargs["desc"])
        if kwargs["desc"] in stop:
            stop.clear()
            raise Interrupted("SIGTERM")
        return original(*args, **kwargs)

    monkeypatch.setattr(ablate.loop, "train_one_epoch", train_one_epoch)
    with pytest.raises(Interrupted):
        run(cfg, parts, {}, [])
    assert torch.load(parts / CHECKPOINT_FILE, weights_only=True)["state"]["epoch"] == 1
    calls.clear()
    assert run(cfg, parts, {}, []).status == "completed"
    assert calls == ["epoch 2/3", "epoch 3/3"]  # resumed, not restarted
    assert _rows(parts) == _rows(whole)
    assert RunRecord.load(parts).final_test_acc == record.final_test_acc


@pytest.mark.parametrize("forced, expected", [("1", "bf16"), ("0", "fp32")])
def test_an_environment_switch_forces_what_auto_means_on_this_cpu(monkeypatch, forced, expected):
    # how the suite is run as on a CPU with (or without) bf16 instructions, subprocesses included
    monkeypatch.setenv(ablate.loop.CPU_BF16_ENV, forced)
    assert resolve_precision("auto", CPU) == expected
    cfg = compose_cfg(["device=cpu"])
    settle_precision(cfg)
    assert cfg.precision == expected
    monkeypatch.setenv(ablate.loop.CPU_BF16_ENV, "")  # unset: the CPU's own instructions decide
    assert ablate.loop.cpu_computes_bf16() == any(
        getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def test_bf16_rounds_the_layers_never_the_loss_gradients_or_optimizer_state():
    """The loop's step under bf16 autocast (Precision.forward), read by benchmarks/bf16_audit.py:
    the layers compute in bf16, the loss, the weights' gradients and Adam's state stay fp32, and
    bf16's gradient error is far inside the change from one batch to the next, not repeated."""
    from benchmarks import bf16_audit
    from ablate.compose import build, build_data

    cfg = compose_cfg(TINY_BF16[:3] + ["model.filters=[8,16,32]"])
    torch.manual_seed(0)
    data, _ = build_data(cfg, CPU)
    model, loss_fn = build(cfg, "model"), build(cfg, "loss")
    fp32, bf16 = pick_precision("fp32", CPU), pick_precision("bf16", CPU)
    inputs, targets = data.train_x[:64].float() / 255, data.train_y[:64]
    rows = {kind: (i, o) for kind, i, o in bf16_audit.dtypes(model, inputs, targets, loss_fn, bf16)}
    assert rows["Conv2d"][1] == rows["Linear"][1] == rows["logits (model output)"][1] == "bfloat16"
    assert rows["loss (on logits.float())"][1] == "float32"
    assert rows["parameters' .grad"][1] == "float32"
    assert rows["Adam state (exp_avg, exp_avg_sq)"][1] == "float32"
    fp32_rows = {kind: o for kind, _, o in bf16_audit.dtypes(model, inputs, targets, loss_fn, fp32)}
    assert fp32_rows["Conv2d"] == fp32_rows["logits (model output)"] == "float32"

    table, loss_gap = bf16_audit.gradients(model, data, loss_fn, fp32, bf16, n=4, batch_size=64)
    norm, error, batch_to_batch, persistence = table[bf16_audit.ALL]
    assert 0 < error < 0.25 * batch_to_batch
    assert persistence < 1.6  # independent errors give ~1; the same error every batch gives 2
    assert 0 < loss_gap < 0.05
