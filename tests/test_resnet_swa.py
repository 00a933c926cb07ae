"""ResNet-18 (model=resnet18) and stochastic weight averaging (swa.*) on tiny CPU runs."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import ablate.loop
from ablate.models import StridedPointwise
from ablate.data import batches
from ablate.record import BEST_WEIGHTS, CHECKPOINT_FILE, SWA_WEIGHTS, RunRecord
from ablate.train import Interrupted, run
from ablate.validation import ConfigError, validate

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
ACTIVATIONS = sorted(p.stem for p in (CONF / "model" / "activation").glob("*.yaml"))

# A CNN small enough for a few CPU epochs in seconds; 300 images in batches of 100, so that
# every batch has the same size and BN's cumulative average equals the plain mean.
TINY_SWA = ["data=synthetic", "data.train_size=300", "data.test_size=200", "batch_size=100",
            "model.filters=[8,16,32]", "device=cpu", "save_weights=true"]


def make_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_resnet18_has_the_standard_size_and_output_shape():
    cfg = make_cfg("model=resnet18")
    model = instantiate(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    # four stages: the last one is 512 wide and 4x4 before the pool
    assert model.head[-1].in_features == 512
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_a_narrow_strided_shortcut_gets_the_exact_weight_gradient(memory_format):
    # oneDNN's strided 1x1 backward on a CPU gets this wrong (or hangs) for 4 input channels in
    # channels_last on AVX2; the shortcut must give what float64 arithmetic gives.
    torch.manual_seed(0)
    conv = StridedPointwise(4, 8, stride=2)
    x = torch.randn(32, 4, 32, 32).contiguous(memory_format=memory_format)
    grad_out = torch.randn(32, 8, 16, 16)
    (grad_w,) = torch.autograd.grad(conv(x), conv.weight, grad_out)
    expected = torch.einsum("nchw,nohw->oc", x[:, :, ::2, ::2].double(), grad_out.double())
    torch.testing.assert_close(grad_w.double().view(8, 4), expected, rtol=1e-4, atol=1e-3)
    reference = nn.functional.conv2d(x.double(), conv.weight.double(), stride=2)
    torch.testing.assert_close(conv(x).double(), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_builds_a_resnet(activation):
    cfg = make_cfg("model=resnet18", f"model/activation={activation}", "model.width=4")
    model = instantiate(cfg.model)
    kind = type(instantiate(cfg.model.activation)())
    # stem + two per BasicBlock x 8 blocks, all of the chosen kind
    assert sum(isinstance(m, kind) for m in model.modules()) == 17
    out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_swa_start_after_the_last_epoch_is_rejected():
    with pytest.raises(ConfigError, match="swa.start_epoch=5 must be <= epochs=3"):
        validate(make_cfg(*TINY_SWA, "epochs=3", "swa.start_epoch=5"))


def test_swa_run_averages_refreshes_bn_and_records_both_accuracies(tmp_path):
    cfg = make_cfg(*TINY_SWA, "epochs=3", "swa.start_epoch=2", "swa.lr=3e-4",
                   "swa.anneal_epochs=1")
    record = run(cfg, tmp_path, {}, [])

    assert record.status == "completed"
    assert 0 <= record.final_test_acc <= 1 and 0 <= record.extra["swa_test_acc"] <= 1
    assert record.extra["swa_epochs_averaged"] == 2  # epochs 2 and 3
    assert RunRecord.load(tmp_path).extra == record.extra
    # SWALR, not the cosine schedule, set epoch 3's learning rate (anneal_epochs=1: at once)
    lrs = [float(r["lr"]) for r in csv.DictReader(open(tmp_path / "metrics.csv"))]
    assert lrs[0] == pytest.approx(1e-3) and lrs[2] == pytest.approx(3e-4)

    averaged = instantiate(cfg.model)
    averaged.load_state_dict(torch.load(tmp_path / SWA_WEIGHTS, weights_only=True))
    # a completed run keeps no resume checkpoint; the best epoch's weights are one of the snapshots
    snapshot = torch.load(tmp_path / BEST_WEIGHTS, weights_only=True)
    assert not torch.equal(averaged.features[0].weight, snapshot["features.0.weight"])
    # update_bn ran: the first BN's running mean is the mean of its input over the training
    # set under the averaged weights (not the fresh model's zeros it was copied with)
    data = instantiate(cfg.data)
    with torch.no_grad():
        conv_out = torch.cat([averaged.features[0](x) for x, _ in batches(data.train_x,
                                                                           data.train_y, 100)])
    bn = averaged.features[1]
    torch.testing.assert_close(bn.running_mean, conv_out.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert bn.num_batches_tracked == 3


def _comparable(run_dir: Path) -> tuple[dict, list[dict]]:
    """The record and metrics without the fields that measure time."""
    record = json.loads((run_dir / "result.json").read_text())
    for key in ("wall_seconds", "images_per_second"):
        record.pop(key)
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    for row in rows:
        row.pop("seconds")
    return record, rows


def test_interrupted_swa_run_resumes_to_the_same_record(tmp_path, monkeypatch):
    # anneal over 3 epochs so that SWALR's own state (its step count) decides epoch 4's lr
    cfg = make_cfg(*TINY_SWA, "epochs=4", "swa.start_epoch=2", "swa.anneal_epochs=3")
    whole, parts = tmp_path / "whole", tmp_path / "parts"  # Hydra would create these
    whole.mkdir(), parts.mkdir()
    run(cfg, whole, {}, [])

    # Stop inside epoch 3, as SIGTERM's handler does: epoch 2 (SWA already on) is checkpointed.
    calls = []
    original = ablate.loop.train_one_epoch

    def train_one_epoch(*args, **kwargs):
        calls.append(kwargs["desc"])
        if len(calls) == 3:
            raise Interrupted("SIGTERM")
        return original(*args, **kwargs)

    monkeypatch.setattr(ablate.loop, "train_one_epoch", train_one_epoch)
    with pytest.raises(Interrupted):
        run(cfg, parts, {}, [])
    assert RunRecord.load(parts).status == "interrupted"
    ckpt = torch.load(parts / CHECKPOINT_FILE, weights_only=True)  # what resume will load
    assert ckpt["state"]["epoch"] == 2
    assert ckpt["swa"]["averaged"]["n_averaged"] == 1 and ckpt["swa"]["scheduler"] is not None

    calls.clear()
    assert run(cfg, parts, {}, []).status == "completed"
    assert calls == ["epoch 3/4", "epoch 4/4"]  # it resumed rather than starting over
    assert _comparable(parts) == _comparable(whole)
    assert RunRecord.load(parts).extra["swa_epochs_averaged"] == 3
    for name, tensor in torch.load(whole / SWA_WEIGHTS, weights_only=True).items():
        assert torch.equal(tensor, torch.load(parts / SWA_WEIGHTS, weights_only=True)[name]), name


@pytest.mark.slow
def test_activation_sweep_over_the_resnet_preset(tmp_path):
    # The README's sweep, shrunk: the command line's activation beats the preset's swish.
    cmd = [sys.executable, str(REPO / "ablate" / "train.py"), "-m", "+experiment=resnet_adamw",
           "model/activation=swish,gelu,mish,relu", "model.width=4", "epochs=1", "data=synthetic",
           "data.train_size=200", "data.test_size=100", "device=cpu", "save_weights=false",
           f"hydra.sweep.dir={tmp_path}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, check=True, cwd=tmp_path, env=env, capture_output=True)
    records = [RunRecord.load(d) for d in sorted(tmp_path.iterdir()) if d.is_dir()]
    assert sorted(r.choices["model/activation"] for r in records) == ["gelu", "mish", "relu", "swish"]
    assert all(r.status == "completed" and r.choices["model"] == "resnet18" for r in records)
    assert {r.params for r in records} == {sum(p.numel() for p in instantiate(
        make_cfg("model=resnet18", "model.width=4").model).parameters())}
