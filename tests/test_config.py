"""Every option of every config group composes, instantiates and works; bad input fails clearly."""
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from ablate.models import CNN
from ablate.validation import ConfigError, validate
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
