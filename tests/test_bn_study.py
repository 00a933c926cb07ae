"""The BN study: VGG-A, the landscape probe, both experiments end to end, and the analysis."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize
from hydra.utils import instantiate
from torch import nn

from ablate.landscape import LandscapeProbe
from ablate.train import run
from ablate.vgg import VGG
from analysis import bn_study

REPO = Path(__file__).resolve().parent.parent
# Convs with 4-8 channels: on a busy CPU, OpenMP hand-offs between threads cost ~10x the math.
torch.set_num_threads(1)
TINY_WIDTHS = "[4,8,8,8,8,8,8,8]"
TINY = ["data=synthetic", "data.train_size=128", "data.test_size=64", "data.val_size=64",
        "epochs=2", "batch_size=32", f"model.widths={TINY_WIDTHS}", "model.hidden=16",
        "device=cpu", "save_weights=false"]


def tiny_vgg(**kw) -> VGG:
    return VGG(nn.ReLU, widths=(4, 8, 8, 8, 8, 8, 8, 8), hidden=16, **kw)


# ----------------------------------------------------------------------------- model

def vgg_a_param_count(batchnorm: bool) -> int:
    """Counted by hand from the VGG-A table: conv3x3 (+bias, dropped before BN), BN (2 per channel), MLP."""
    convs = [(3, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512), (512, 512)]
    n = sum(9 * i * o + (2 * o if batchnorm else o) for i, o in convs)
    return n + (512 * 512 + 512) * 2 + 512 * 10 + 10


def test_vgg_a_parameter_count_matches_the_architecture():
    with initialize(version_base="1.3", config_path="../conf"):
        for option, bn in (("vgg_a", False), ("vgg_a_bn", True)):
            model = instantiate(compose("config", overrides=[f"model={option}"]).model)
            assert sum(p.numel() for p in model.parameters()) == vgg_a_param_count(bn)
    assert vgg_a_param_count(False) == 9_750_922  # the well-known ~9.75M of VGG-11 for CIFAR
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert len(pools) == 5 and len(bns) == 8


def test_classifier_batchnorm_flag_and_width_check():
    assert sum(isinstance(m, nn.BatchNorm1d) for m in tiny_vgg(classifier_batchnorm=True).modules()) == 2
    assert not any(isinstance(m, nn.BatchNorm1d) for m in tiny_vgg().modules())
    with pytest.raises(ValueError, match="8 conv layers"):
        VGG(nn.ReLU, widths=(8, 8))


def test_plain_vgg_init_keeps_the_signal_alive():
    # With PyTorch's default init these features have rms ~0.02 (vs ~2 here): the plain net sits at 10%.
    torch.manual_seed(0)
    model = VGG(nn.ReLU, batchnorm=False)
    features = model.classifier[:-1](model.features(torch.randn(16, 3, 32, 32)))  # after 10 layers
    assert 0.3 < features.pow(2).mean().sqrt().item() < 30
    logits = model.classifier[-1](features)
    loss = nn.functional.cross_entropy(logits, torch.arange(16) % 10)
    assert loss.item() == pytest.approx(np.log(10), abs=0.3)  # starts near chance, no spike


# ----------------------------------------------------------------------------- probe

def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_probe_restores_parameters_buffers_and_rng_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    model = tiny_vgg(classifier_batchnorm=True, dropout=0.3).train()
    inputs, targets = batch()
    model(inputs)  # non-trivial running statistics and num_batches_tracked
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = LandscapeProbe(model, nn.CrossEntropyLoss(), opt, tmp_path, every=1,
                           multipliers=[0.5, 1, 2])
    rows = probe.probe(inputs, targets)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())  # .grad is the optimizer's business
    assert len(rows) == 3 and all(r["grad_dist"] > 0 for r in rows)


def test_probe_measures_the_loss_and_gradient_at_w_minus_eta_g(tmp_path):
    torch.manual_seed(0)
    model, loss_fn = tiny_vgg().train(), nn.CrossEntropyLoss()
    inputs, targets = batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref = copy.deepcopy(model)
    [row] = LandscapeProbe(model, loss_fn, opt, tmp_path, multipliers=[2.0]).probe(inputs, targets)
    # the same thing by hand on a copy: g at w, one SGD step of size 2 * lr, g again
    g = torch.autograd.grad(loss_fn(ref(inputs), targets), list(ref.parameters()))
    with torch.no_grad():
        for p, gi in zip(ref.parameters(), g):
            p -= 0.1 * gi
    loss = loss_fn(ref(inputs), targets)
    g2 = torch.autograd.grad(loss, list(ref.parameters()))
    dist = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(g2, g)))
    gnorm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
    assert row["eta"] == pytest.approx(0.1)
    assert row["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert row["grad_dist"] == pytest.approx(dist.item(), rel=1e-4)
    assert row["step_norm"] == pytest.approx(0.1 * gnorm.item(), rel=1e-5)


def test_probe_resume_drops_rows_from_its_own_step_on(tmp_path):
    (tmp_path / "landscape.csv").write_text(
        "step,multiplier,eta,loss0,loss,grad_dist,step_norm,grad_norm\n"
        "0,1,0.1,2,2,1,1,1\n2,1,0.1,2,2,1,1,1\n4,1,0.1,2,2,1,1,1\n")
    model = tiny_vgg()
    probe = LandscapeProbe(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1),
                           tmp_path, every=2)
    probe.load_state_dict({"step": 3})  # what the checkpoint of a run stopped after step 2 holds
    probe.on_fit_start(loop=None)
    assert probe.state_dict() == {"step": 3}
    assert pd.read_csv(tmp_path / "landscape.csv")["step"].tolist() == [0, 2]


def compose_tiny(overrides):
    with initialize(version_base="1.3", config_path="../conf"):
        return compose("config", overrides=overrides)


def test_a_run_with_the_probe_trains_exactly_like_one_without(tmp_path):
    # dropout in the classifier draws from the global RNG during training: the probe must not shift it
    common = ["+experiment=bn_landscape", "model=vgg_a_bn", "model.dropout=0.3", "optim.lr=1e-3",
              *TINY]
    for d in ("plain", "probe"):
        (tmp_path / d).mkdir()  # Hydra makes the run folder; here we call run() directly
    plain = run(compose_tiny(common), tmp_path / "plain", {}, [])
    probed = run(compose_tiny(common + ["+probe=landscape", "probe.every=1", "probe.multipliers=[1,2]"]), tmp_path / "probe", {}, [])
    assert plain.status == probed.status == "completed"
    m1, m2 = (pd.read_csv(tmp_path / d / "metrics.csv").drop(columns="seconds") for d in ("plain", "probe"))
    pd.testing.assert_frame_equal(m1, m2, check_exact=True)
    s1, s2 = (pd.read_csv(tmp_path / d / "steps.csv") for d in ("plain", "probe"))
    pd.testing.assert_frame_equal(s1, s2, check_exact=True)
    landscape = pd.read_csv(tmp_path / "probe" / "landscape.csv")
    assert sorted(landscape["step"].unique()) == s2["step"].tolist()  # every=1: every step probed


@pytest.mark.parametrize("log_steps", [True, False])
def test_a_resumed_probe_keeps_every_landscape_row(tmp_path, monkeypatch, log_steps):
    import ablate.loop
    from ablate.train import Interrupted

    cfg = ["+experiment=bn_santurkar", "model=vgg_a_bn", "probe.every=3", *TINY, "epochs=3",
           f"log_steps={str(log_steps).lower()}"]
    for d in ("whole", "cut"):
        (tmp_path / d).mkdir()
    run(compose_tiny(cfg), tmp_path / "whole", {}, [])
    original, calls = ablate.loop.train_one_epoch, []

    def stopped_in_epoch_3(*args, **kwargs):  # as SIGTERM's handler does: epoch 2 is checkpointed
        calls.append(kwargs["desc"])
        if len(calls) == 3:
            original(*args, **kwargs)  # epoch 3's probe rows are written, then the run stops
            raise Interrupted("SIGTERM")
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(ablate.loop, "train_one_epoch", stopped_in_epoch_3)
        with pytest.raises(Interrupted):
            run(compose_tiny(cfg), tmp_path / "cut", {}, [])
    assert run(compose_tiny(cfg), tmp_path / "cut", {}, []).status == "completed"
    whole, cut = (pd.read_csv(tmp_path / d / "landscape.csv") for d in ("whole", "cut"))
    assert sorted(whole["step"].unique()) == [0, 3, 6, 9]  # 4 steps per epoch, 3 epochs
    pd.testing.assert_frame_equal(whole, cut, check_exact=True)
    assert (tmp_path / "cut" / "steps.csv").exists() == log_steps


# ----------------------------------------------------------------------------- end to end

def sweep(tmp_path: Path, args: list[str]) -> Path:
    out = subprocess.run([sys.executable, "ablate/train.py", "-m", *args, *TINY,
                          f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=REPO, capture_output=True,
                         text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                              "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    return tmp_path / "sweep"


@pytest.mark.slow
def test_cheap_study_writes_band_accuracy_plots_and_table(tmp_path):
    root = sweep(tmp_path, ["+experiment=bn_landscape", "model=vgg_a,vgg_a_bn", "optim.lr=1e-3,1e-4"])
    bn_study.main(["--root", str(root), "--out", str(tmp_path / "report")])
    for name in ("band.png", "val_acc.png", "bn_study.md"):
        assert (tmp_path / "report" / name).stat().st_size > 0, name
    data = bn_study.collect(root)
    table = bn_study.convergence_table(data["runs"], data["metrics"])
    assert len(table) == 4 and set(table["variant"]) == {"BN", "no BN"}
    assert set(table["lr"]) == {1e-3, 1e-4} and (table["epochs run"] == 2).all()
    band = bn_study.loss_band(data["steps"], data["runs"])
    assert (band["runs"] == 2).all() and (band["width"] >= 0).all()
    assert "no BN / BN" in (tmp_path / "report" / "bn_study.md").read_text()


@pytest.mark.slow
def test_santurkar_study_writes_the_three_landscape_panels(tmp_path):
    root = sweep(tmp_path, ["+experiment=bn_santurkar", "model=vgg_a,vgg_a_bn", "probe.every=2"])
    bn_study.main(["--root", str(root), "--out", str(tmp_path / "report")])
    assert (tmp_path / "report" / "landscape.png").stat().st_size > 0
    assert not (tmp_path / "report" / "band.png").exists()  # one lr per variant: no band to draw
    data = bn_study.collect(root)
    assert set(data["runs"]["lr"]) == {0.1} and set(data["runs"]["optim"]) == {"sgd"}
    panels = bn_study.landscape_panels(data["landscape"], data["runs"])
    assert set(panels["step"]) == {0, 2, 4, 6}  # 128 images / 32 = 4 steps per epoch, 2 epochs
    assert (panels["loss_hi"] >= panels["loss_lo"]).all() and (panels["beta"] > 0).all()


# ----------------------------------------------------------------------------- analysis

def made_up(steps_per_run: dict[str, list[float]], variant_of: dict[str, str]):
    runs = pd.DataFrame([dict(run=r, variant=v, lr=1e-3 * (i + 1), status="completed",
                              final_test_acc=0.5) for i, (r, v) in enumerate(variant_of.items())])
    steps = pd.concat([pd.DataFrame(dict(run=r, step=range(len(l)), epoch=1, loss=l))
                       for r, l in steps_per_run.items()])
    return runs, steps


def test_loss_band_is_min_max_over_rates_and_ignores_a_diverged_rate():
    runs, steps = made_up({"a": [2.0, 1.0, 0.5], "b": [2.2, 1.5, 1.0], "c": [2.1, np.inf, np.nan]},
                          {"a": "BN", "b": "BN", "c": "no BN"})
    band = bn_study.loss_band(steps, runs).set_index(["variant", "step"])
    assert band.loc[("BN", 1), "lo"] == 1.0 and band.loc[("BN", 1), "hi"] == 1.5
    assert band.loc[("BN", 2), "width"] == pytest.approx(0.5)
    assert band.loc[("no BN", 1), "runs"] == 0 and np.isnan(band.loc[("no BN", 1), "width"])
    summary = bn_study.band_summary(bn_study.loss_band(steps, runs), early_steps=2)
    assert summary.loc["BN", "overall"] == pytest.approx((0.2 + 0.5 + 0.5) / 3)


def test_band_summary_ratio_and_convergence_table():
    band = pd.DataFrame(dict(variant=["BN"] * 2 + ["no BN"] * 2, step=[0, 1] * 2,
                             width=[0.1, 0.3, 0.4, 0.2]))
    summary = bn_study.band_summary(band, early_steps=1)
    assert summary.loc["no BN / BN", "overall"] == pytest.approx(0.3 / 0.2)
    assert summary.loc["no BN / BN"].iloc[0] == pytest.approx(4.0)

    runs = pd.DataFrame([dict(run="a", variant="BN", lr=1e-3, status="completed", final_test_acc=0.6),
                         dict(run="b", variant="no BN", lr=1e-3, status="diverged", final_test_acc=0.1)])
    metrics = pd.DataFrame(dict(run=["a"] * 3 + ["b"] * 2, epoch=[1, 2, 3, 1, 2],
                                train_loss=[2, 1.5, 1, 2.3, 2.3], val_acc=[0.3, 0.55, 0.5, 0.1, 0.1],
                                test_acc=[0.3, 0.5, 0.6, 0.1, 0.1]))
    table = bn_study.convergence_table(runs, metrics).set_index("variant")
    assert table.loc["BN", "first epoch >= 50%"] == 2
    assert table.loc["BN", "best acc"] == 0.55 and table.loc["BN", "final acc"] == 0.5
    assert table.loc["no BN", "first epoch >= 50%"] == "never"
    assert not table.loc["BN", "diverged"] and table.loc["no BN", "diverged"]


def test_effective_beta_is_the_max_gradient_change_per_unit_step():
    runs = pd.DataFrame([dict(run="a", variant="BN", lr=0.1)])
    landscape = pd.DataFrame(dict(run="a", step=0, multiplier=[1, 2], eta=[0.1, 0.2], loss0=2.0,
                                  loss=[1.8, 1.9], grad_dist=[1.0, 4.0], step_norm=[0.5, 1.0],
                                  grad_norm=5.0))
    [p] = bn_study.landscape_panels(landscape, runs).to_dict("records")
    assert (p["loss_lo"], p["loss_hi"], p["grad_lo"], p["grad_hi"]) == (1.8, 1.9, 1.0, 4.0)
    assert p["beta"] == pytest.approx(4.0)  # max(1.0 / 0.5, 4.0 / 1.0)


# ----------------------------------------------------------------------------- damaged study folders

def bn_run(root: Path, name: str, bn: bool, lr: float, status="completed", epochs=2, steps=True):
    """A hand-made study run folder: config, record, metrics and steps."""
    run_dir = root / name
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(
        f"seed: 0\nmodel:\n  batchnorm: {str(bn).lower()}\noptim:\n  lr: {lr}\n")
    model = "vgg_a_bn" if bn else "vgg_a"
    (run_dir / ".hydra" / "hydra.yaml").write_text(
        f"hydra:\n  runtime:\n    choices: {{model: {model}, optim: adam}}\n"
        f"  overrides:\n    task: [model={model}, optim.lr={lr}]\n")
    (run_dir / "result.json").write_text(
        f'{{"status": "{status}", "epochs_run": {epochs}, "final_test_acc": 0.4, "best_test_acc": 0.45}}')
    if epochs:
        pd.DataFrame(dict(epoch=range(1, epochs + 1), train_loss=2.0, test_acc=0.4, val_acc=0.4)).to_csv(
            run_dir / "metrics.csv", index=False)
    if steps:
        pd.DataFrame(dict(step=range(4), epoch=1, loss=[2.3, 2.0 - lr, 1.8, 1.5])).to_csv(
            run_dir / "steps.csv", index=False)
    return run_dir


def test_damaged_and_killed_runs_are_left_out_with_a_reason(tmp_path):
    bn_run(tmp_path, "0", True, 1e-3)
    bn_run(tmp_path, "1", True, 1e-2)
    bn_run(tmp_path, "2", False, 1e-3)
    (bn_run(tmp_path, "3", False, 1e-2) / "result.json").write_text('{"status": "compl')  # truncated
    (bn_run(tmp_path, "4", False, 1e-4, steps=False) / "steps.csv").write_text("")  # empty
    data = bn_study.collect(tmp_path)
    assert set(data["runs"]["run"]) == {"0", "1", "2", "4"}
    assert data["skipped"]["status"].tolist() == ["unreadable"] and "result.json" in data["skipped"]["error"][0]
    text, figs = bn_study.report(data)
    summary = bn_study.band_summary(bn_study.loss_band(data["steps"], data["runs"]), early_steps=2)
    # no BN has one usable learning rate with steps: no band, so no ratio (never a ratio of 0)
    assert summary.loc["no BN"].isna().all() and summary.loc["no BN / BN"].isna().all()
    assert summary.loc["BN", "overall"] > 0
    assert "fewer than two usable learning rates" in text and "Run folders left out" in text
    for fig in figs.values():
        plt.close(fig)


def test_a_study_whose_runs_all_died_before_epoch_1_still_reports(tmp_path):
    for i, (bn, lr) in enumerate([(True, 1e-3), (False, 1e-3)]):
        bn_run(tmp_path, str(i), bn, lr, status="interrupted", epochs=0, steps=False)
    data = bn_study.collect(tmp_path)
    text, figs = bn_study.report(data)
    assert "| interrupted " in text and figs == {}
