"""Every option of every config group composes, instantiates and works; bad input fails clearly."""
import re

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ablate.data import make_synthetic
from ablate.losses import FocalLoss
from ablate.models import CNN
from ablate.optimizers import SignSGD
from ablate.validation import ConfigError, dry_run, validate
from conftest import CONF, compose_cfg, run_script

GROUPS = ["model", "model/activation", "loss", "optim", "sched", "data"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def test_every_group_has_options():
    found = {g for g, _ in OPTIONS}
    assert found == set(GROUPS)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_instantiates_and_works(group, option, image_tree):
    cfg = compose_cfg([f"{group}={option}"])
    if "root" in cfg.data:
        cfg.data.root = str(image_tree)
    validate(cfg)
    model = instantiate(cfg.model)
    logits = model.eval()(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, cfg.data.num_classes)
    loss = instantiate(cfg.loss)(logits, torch.tensor([0, 1]))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    optimizer = instantiate(cfg.optim)(model.parameters())
    scheduler = instantiate(cfg.sched)(optimizer)
    optimizer.step()
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(1.0)
    else:
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] > 0
    data = instantiate(cfg.data)
    assert data.train_x.dtype == torch.uint8 and data.train_x.shape[1:] == (3, 32, 32)
    assert len(data.train_x) == len(data.train_y) > 0


def test_seed_cnn_has_the_reported_parameter_count():
    model = instantiate(compose_cfg().model)
    assert isinstance(model, CNN)
    assert sum(p.numel() for p in model.parameters()) == 2_603_274


def test_activation_choice_reaches_every_layer():
    model = instantiate(compose_cfg(["model/activation=elu"]).model)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "ELU" in kinds and "LeakyReLU" not in kinds


def test_cosine_period_follows_epochs():
    cfg = compose_cfg(["epochs=7"])
    assert cfg.sched.T_max == 7


@pytest.mark.parametrize("override,key", [
    ("optim.lr=-0.1", "optim.lr"), ("model.dropout=1.5", "model.dropout"),
    ("loss=label_smoothing", None), ("loss.label_smoothing=1.2", "loss.label_smoothing"),
    ("model.filters=[]", "model.filters"), ("epochs=0", "epochs"), ("device=tpu", "device"),
    ("batch_size=0", "batch_size"), ("grad_clip=-1", "grad_clip"),
])
def test_impossible_values_are_rejected_naming_the_key(override, key):
    overrides = [override]
    if override.startswith("loss.label_smoothing"):
        overrides = ["loss=label_smoothing", override]
    cfg = compose_cfg(overrides)
    if key is None:
        validate(cfg)  # a valid choice passes
        return
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_bad_value_gives_one_clear_line_and_exit_code(tmp_path):
    proc = run_script("ablate/train.py", "data=synthetic", "optim.lr=-1", "model.dropout=1.5",
                      f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 1
    assert "optim.lr=-1 must be a number > 0" in proc.stderr
    assert "model.dropout=1.5" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_option_lists_the_available_ones(tmp_path):
    proc = run_script("ablate/train.py", "loss=nope", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0
    assert "Could not find 'loss/nope'" in proc.stderr
    for option in ("ce", "focal", "label_smoothing", "mse"):
        assert f"\t{option}" in proc.stderr


def test_missing_data_offline_is_one_clear_line(tmp_path):
    proc = run_script("ablate/train.py", f"data.root={tmp_path / 'nowhere'}", "data.download=false",
                      f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: CIFAR-10 not found in ")
    assert "data.root=" in proc.stderr


def test_a_constructor_rejecting_a_value_names_the_group(tmp_path):
    proc = run_script("ablate/train.py", "data=synthetic", "model.filters=[8,8,8,8,8,8]",
                      f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: model: model.filters has 6 blocks; at most 5 fit a 32x32 image"


@pytest.mark.parametrize("overrides,named", [
    (["seed=true"], "seed=True must be an integer"),
    (["data=synthetic", "data.train_size=true"], "data.train_size=True"),
    (["model/activation=elu", "model.activation.alpha=false"],
     "model.activation.alpha=False must be a number (float), not true/false"),
    (["data=synthetic", "data.noise=nan"], "data.noise=nan must be a finite number"),
    (["optim.weight_decay=inf"], "optim.weight_decay=inf"),
    (["sched=step", "sched.step_size=0"], "sched.step_size=0 must be an integer >= 1"),
    (["sched=step", "sched.step_size=2.5"], "sched.step_size=2.5"),
    (["sched.T_max=0"], "sched.T_max=0 must be an integer >= 1"),
    (["sched=step", "sched.gamma=-0.1"], "sched.gamma=-0.1 must be a number >= 0"),
    (["sched=plateau", "sched.factor=-1"], "sched.factor=-1 must be a number >= 0"),
    (["sched=plateau", "sched.patience=-1"], "sched.patience=-1"),
    (["model.batchnorm=3"], "model.batchnorm=3 must be true or false"),
    (["save_weights=2"], "save_weights=2 must be true or false"),
])
def test_every_key_of_every_option_is_checked(overrides, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        validate(compose_cfg(overrides))


@pytest.mark.parametrize("make,message", [
    (lambda: FocalLoss(alpha=-1.0), "alpha >= 0"),
    (lambda: FocalLoss(gamma=float("nan")), "gamma >= 0"),
    (lambda: FocalLoss(reduction="none"), "mean or sum"),
    (lambda: make_synthetic(noise=float("nan")), "finite noise"),
    (lambda: make_synthetic(train_size=10**13), "GiB to draw"),
    (lambda: SignSGD([torch.zeros(1)], lr=float("nan")), "learning rate"),
])
def test_our_constructors_reject_values_outside_their_domain(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def _built(overrides):
    cfg = compose_cfg(["data=synthetic", "data.train_size=20", "data.test_size=10",
                       "model.filters=[8,16,32]", *overrides])
    return cfg, instantiate(cfg.model), instantiate(cfg.loss), instantiate(cfg.data)


def test_dry_run_passes_a_good_config():
    dry_run(*_built([]))


@pytest.mark.parametrize("sched,message", [
    # what no rule lists: a scheduler the user adds, stepped through every epoch
    ({"_target_": "torch.optim.lr_scheduler.ExponentialLR", "gamma": 1e100},
     "learning rate becomes inf after epoch 4"),
    ({"_target_": "torch.optim.lr_scheduler.ExponentialLR", "gamma": -0.5},
     "learning rate becomes -0.0005 after epoch 1"),
    ({"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 0},
     "stepping StepLR fails after epoch 1 (ZeroDivisionError"),
])
def test_dry_run_steps_the_schedule_through_every_epoch(sched, message):
    cfg, *built = _built(["epochs=10"])
    cfg.sched = {**sched, "_partial_": True}
    with pytest.raises(ConfigError, match=re.escape(message)):
        dry_run(cfg, *built)


def test_dry_run_pushes_images_through_the_model_and_loss():
    cfg, model, loss_fn, data = _built(["model.num_classes=5"])
    with pytest.raises(ConfigError, match="gives 5 outputs per image, the data has 10 classes"):
        dry_run(cfg, model, loss_fn, data)

    class Negative(torch.nn.Module):
        def forward(self, logits, targets):
            return -logits.pow(2).mean()

    cfg, model, _, data = _built([])
    with pytest.raises(ConfigError, match="loss: Negative of the untrained model"):
        dry_run(cfg, model, Negative(), data)
    assert model.training  # the check leaves the model as it found it


@pytest.mark.parametrize("scale", ["inf", "1e400", "-inf", "nan"])  # YAML reads 1e400 as inf
def test_an_infinite_scale_is_refused_in_one_line_naming_it(scale):
    cfg = compose_cfg([f"scale={scale}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)  # ${scaled:N} resolves, to N
    assert resolved["epochs"] == 50 and resolved["swa"]["anneal_epochs"] == 5
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value) == (f"invalid config: scale={resolved['scale']!r} must be a finite "
                              "number > 0 (e.g. 0.1 for a quick look)")


def test_a_folder_whose_config_says_scale_inf_is_read_by_analysis(tmp_path):
    from analysis.runs import read_hydra

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 0\nscale: .inf\nepochs: ${scaled:50}\n")
    (tmp_path / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  runtime: {choices: {}}\n  overrides: {task: [scale=inf]}\n")
    assert read_hydra(tmp_path)["config"] == {"seed": 0, "scale": float("inf"), "epochs": 50}
