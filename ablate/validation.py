"""Checks on a composed config that catch impossible values before any work is done."""
from __future__ import annotations

import math
import re

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


# key -> (test, what the value must be); keys absent from a config are skipped.
RULES = {
    "epochs": (_positive_int, "an integer >= 1"),
    "batch_size": (_positive_int, "an integer >= 1"),
    "scale": (lambda v: _number(v) and v > 0, "a number > 0"),
    "seed": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "l1_lambda": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "grad_clip": (lambda v: v is None or (_number(v) and v > 0), "null or a number > 0"),
    "device": (lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
               "one of auto, cpu, cuda, cuda:N"),
    "precision": (lambda v: v in ("auto", "fp32", "bf16", "fp16"), "one of auto, fp32, bf16, fp16"),
    "compile": (lambda v: isinstance(v, bool), "true or false"),
    "threads": (lambda v: v is None or _positive_int(v), "null or an integer >= 1"),
    "cuda_memory_fraction": (lambda v: v is None or (_number(v) and 0 < v <= 1),
                             "null or a number in (0, 1]"),
    "optim.lr": (lambda v: _number(v) and v > 0, "a number > 0"),
    "optim.weight_decay": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "optim.momentum": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "model.dropout": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "model.filters": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0
                      and all(_positive_int(f) for f in v), "a non-empty list of integers >= 1"),
    "model.width": (_positive_int, "an integer >= 1"),
    "model.hidden": (_positive_int, "an integer >= 1"),
    "model.widths": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0
                     and all(_positive_int(f) for f in v), "a non-empty list of integers >= 1"),
    "probe.every": (_positive_int, "an integer >= 1"),
    "loss.label_smoothing": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "loss.gamma": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "model.activation.negative_slope": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "data.train_size": (lambda v: v is None or _positive_int(v), "null or an integer >= 1"),
    "data.test_size": (lambda v: v is None or _positive_int(v), "null or an integer >= 1"),
    "data.val_size": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "swa.start_epoch": (lambda v: v is None or _positive_int(v), "null or an integer >= 1"),
    "swa.lr": (lambda v: _number(v) and v > 0, "a number > 0"),
    "swa.anneal_epochs": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "swa.anneal_strategy": (lambda v: v in ("cos", "linear"), "one of cos, linear"),
}


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming every key whose value is impossible."""
    problems = []
    for key, (ok, must_be) in RULES.items():
        if OmegaConf.select(cfg, key, default="<absent>") == "<absent>":
            continue
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
        if not ok(value):
            problems.append(f"{key}={value!r} must be {must_be}")
    start = OmegaConf.select(cfg, "swa.start_epoch")
    if _positive_int(start) and _positive_int(cfg.get("epochs")) and start > cfg.epochs:
        # no epoch would be averaged, so the run would silently report no SWA result
        problems.append(f"swa.start_epoch={start} must be <= epochs={cfg.epochs}")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
