"""Checks that catch impossible values before the first epoch.

`validate` reads the composed config: the keys every run needs, the small rule list below
(what no constructor checks), plus walks over every key of every option (keys that nothing
reads; finite numbers; `_target_`s that import; the scalar types that each `_target_`'s
signature accepts). `dry_run` tries the built objects: the schedule stepped through the first
epochs on a throwaway optimizer, and two images through the model and loss.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import inspect
import math
import os
import pkgutil
import re
import sys
from pathlib import Path

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ablate.data import normalize
from ablate.loop import step_scheduler


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _positive_int(v) -> bool:
    return _count(v) and v >= 1


# key -> (test, what the value must be); keys absent from a config are skipped.
RULES = {
    "epochs": (_positive_int, "an integer >= 1"),
    "batch_size": (_positive_int, "an integer >= 1"),
    "scale": (lambda v: _number(v) and v > 0, "a finite number > 0 (e.g. 0.1 for a quick look)"),
    "seed": (_count, "an integer >= 0"),
    "l1_lambda": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "grad_clip": (lambda v: v is None or (_number(v) and v > 0), "null or a number > 0"),
    "device": (lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
               "one of auto, cpu, cuda, cuda:N"),
    "precision": (lambda v: v in ("auto", "fp32", "bf16", "fp16"), "one of auto, fp32, bf16, fp16"),
    "compile": (lambda v: isinstance(v, bool), "true or false"),
    "save_weights": (lambda v: isinstance(v, bool), "true or false"),
    "log_steps": (lambda v: isinstance(v, bool), "true or false"),
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
    "model.activation.negative_slope": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "data.train_size": (lambda v: v is None or _positive_int(v), "null or an integer >= 1"),
    "data.test_size": (lambda v: v is None or _positive_int(v), "null or an integer >= 1"),
    "data.val_size": (_count, "an integer >= 0"),
    "swa.start_epoch": (lambda v: v is None or _positive_int(v), "null or an integer >= 1"),
    "swa.lr": (lambda v: _number(v) and v > 0, "a number > 0"),
    "swa.anneal_epochs": (_count, "an integer >= 0"),
    "swa.anneal_strategy": (lambda v: v in ("cos", "linear"), "one of cos, linear"),
    # torch's schedulers check few of their arguments; these are the ones that, out of range,
    # train silently (a negative period acts like a positive one, a negative patience cuts the
    # lr every epoch) rather than fail when the schedule is stepped (see dry_run)
    "sched.step_size": (_positive_int, "an integer >= 1"),
    "sched.T_max": (_positive_int, "an integer >= 1"),
    "sched.gamma": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "sched.factor": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "sched.patience": (_count, "an integer >= 0"),
    "sched.cooldown": (_count, "an integer >= 0"),
    "sched.total_iters": (_count, "an integer >= 0"),
    "sched.eta_min": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "sched.min_lr": (lambda v: _number(v) and v >= 0, "a number >= 0"),
}


# The keys the run reads without a default: `~seed` and the like cannot work.
REQUIRED = ("seed", "scale", "epochs", "batch_size", "l1_lambda", "grad_clip", "device", "precision",
            "save_weights", "log_steps", "model", "loss", "optim", "sched", "data")
# The free key: a label for a run or a sweep (+tag=...). Nothing reads it, so it changes no
# training; it is part of the identity and of a sweep job's folder name.
FREE_KEYS = ("tag",)
# The loop's own checkpoint keys and the built-in callbacks' names: a config callback taking
# one would overwrite its state in the checkpoint.
RESERVED = ("identity", "state", "model", "optimizer", "generator", "rng_cpu", "rng_cuda", "scaler",
            "scheduler", "swa", "best_weights", "steps", "probe", "logger", "metrics", "checkpoint")
CONF = Path(__file__).resolve().parent.parent / "conf"


def _dotted(node: dict, prefix: str = ""):
    """Every dotted key of a nested dict, the inner ones included."""
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        yield path
        if isinstance(value, dict):
            yield from _dotted(value, path)


@functools.cache
def known_keys() -> frozenset[str]:
    """Every dotted key that conf/ sets: config.yaml, each option of each group, the presets."""
    keys = set(FREE_KEYS)
    for path in CONF.rglob("*.yaml"):
        group = path.parent.relative_to(CONF).parts
        if group[:1] == ("hydra",):
            continue
        header = re.match(r"#\s*@package\s+(\S+)", path.read_text())
        package = header.group(1) if header else ".".join(group)
        node = OmegaConf.to_container(OmegaConf.load(path)) or {}
        node = {k: v for k, v in node.items() if k not in ("defaults", "hydra")}
        package = "" if package == "_global_" else package
        parts = package.split(".") if package else []
        keys.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))  # e.g. callbacks
        keys.update(_dotted(node, package))
    return frozenset(keys)


def _resolve(target: str):
    """The object a dotted _target_ names (as Hydra imports it); errors are one line."""
    return pkgutil.resolve_name(target)


def _parameters(target: str) -> tuple[str, ...] | None:
    """The argument names of a _target_'s signature; None when it takes any (**kwargs), or when
    it does not import (_structure_problems says so)."""
    try:
        params = inspect.signature(_resolve(target)).parameters.values()
    except Exception:
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params)


def _unread(node: dict, path: str = ""):
    """(dotted key, value, nearest known keys) of every key nothing reads: neither set by a file
    in conf/ (nor the free `tag`), nor an argument of the _target_ whose option holds it."""
    if "_target_" in node:
        known = _parameters(node["_target_"])
        for key, value in node.items():
            if known is not None and not key.startswith("_") and key not in known:
                near = difflib.get_close_matches(key, known, 1)
                yield f"{path}.{key}", value, [f"{path}.{k}" for k in near]
            elif isinstance(value, dict) and "_target_" in value:  # e.g. model.activation
                yield from _unread(value, f"{path}.{key}")
        return
    for key, value in node.items():
        where = f"{path}.{key}" if path else str(key)
        if path == "callbacks":  # a callback's name is free; what it takes is its target's
            if isinstance(value, dict) and "_target_" in value:
                yield from _unread(value, where)
        elif where not in known_keys():
            siblings = [k for k in known_keys() if k.rpartition(".")[0] == path]
            yield where, value, difflib.get_close_matches(where, siblings, 1)
        elif isinstance(value, dict):
            yield from _unread(value, where)


def _structure_problems(plain: dict) -> list[str]:
    """What makes a config unbuildable whatever its values, one sentence each: keys nothing reads,
    config callbacks without a _target_ or with a name the loop's state already has, _target_s
    that do not import."""
    unread = list(_unread(plain))  # a typo such as +epoch=1 would otherwise train as if absent
    problems = [_unread_message(key, value, near) for key, value, near in unread]
    if any("." not in key for key, _, _ in unread):
        problems[-1] += "; a label goes in +tag=..."
    for key, node in (plain.get("callbacks") or {}).items():
        if key in RESERVED:  # its state would overwrite the loop's own in the checkpoint
            problems.append(f"callbacks.{key}: the name is taken; call the callback otherwise")
        elif not isinstance(node, dict) or "_target_" not in node:
            problems.append(f"callbacks.{key}={node!r} is not an option with a _target_")
    for path, node in _targets(plain):
        try:
            _resolve(node["_target_"])
        except Exception as err:
            problems.append(f"{path}._target_={node['_target_']!r} does not import "
                            f"({type(err).__name__}: {err})")
    return problems


def _unread_message(key: str, value, near: list[str]) -> str:
    return f"nothing reads {key}={value!r}" + (f" (did you mean `{near[0]}`?)" if near else "")


def _group_options_with(key: str) -> tuple[str, list[str]] | None:
    """(group, its options that set the rest of `key`) for a key under a config group, e.g.
    sched.step_size -> ('sched', ['step']); None when no group holds it."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the deepest group first (model/activation)
        folder = CONF.joinpath(*parts[:cut])
        if folder.is_dir() and parts[0] not in ("hydra", "experiment", "ablation"):
            rest = ".".join(parts[cut:])
            options = [path.stem for path in sorted(folder.glob("*.yaml"))
                       if rest in set(_dotted(OmegaConf.to_container(OmegaConf.load(path)) or {}))]
            return ("/".join(parts[:cut]), options) if options else None
    return None


def explain_unknown_key(err: Exception) -> str | None:
    """What `+key=value` is told (nothing reads it; did you mean ...), for Hydra's refusal of a
    `key=value` whose key the composed config lacks ("Could not override 'epoch'"); or, for a key
    that other options of its group have (sched.step_size under cosine), which ones. None for
    any other error."""
    found = re.search(r"^To append to your config use \+(\S.*)$", str(err), re.M)
    if not isinstance(err, ConfigCompositionException) or found is None:
        return None
    try:
        override = OverridesParser.create().parse_override(found.group(1))
        key = override.key_or_group
        value = override.get_value_element_as_str() if override.is_sweep_override() else override.value()
    except Exception:  # Hydra's own message is then the best there is
        return None
    holders = _group_options_with(key)
    if holders is not None:
        group, options = holders
        rest = key[len(group) + 1:]
        holding = " and ".join(f"{group}={o}" for o in options)
        return (f"nothing reads {key}={value!r}: the {group} option chosen has no `{rest}`; "
                f"{holding} {'has' if len(options) == 1 else 'have'} it")
    parent = key.rpartition(".")[0]
    siblings = [k for k in known_keys() if k.rpartition(".")[0] == parent
                and not k.rpartition(".")[2].startswith("_")]  # _target_ is no one's typo
    message = _unread_message(key, value, difflib.get_close_matches(key, siblings, 1))
    return message if parent else message + "; a label goes in +tag=..."


@contextlib.contextmanager
def explained_composition_errors():
    """Around hydra.main's call (`python ablate/train.py epoch=1`): a `key=value` whose key the
    composed config lacks ends in one line, what `+epoch=1` is told, instead of Hydra's bare "Key
    'epoch' is not in struct". Hydra reports composition errors in run_and_report, before any
    task function runs, so that is where they are caught."""
    import hydra._internal.utils as hydra_utils  # hydra.main's _run_hydra calls it by this name

    report = hydra_utils.run_and_report

    def explaining(func):
        try:
            return func()
        except ConfigCompositionException as err:
            message = explain_unknown_key(err)
            if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":  # Hydra's trace, as asked
                raise
            sys.exit(f"error: invalid config: {message}")
        except Exception as err:
            from ablate.callbacks import sweep_stopped  # imports the sweep's study code: only here

            sweep_stopped(err)
            raise

    hydra_utils.run_and_report = lambda func: report(lambda: explaining(func))
    try:
        yield
    finally:
        hydra_utils.run_and_report = report


def _leaves(node, path: str = ""):
    """(dotted key, value) of every scalar in a plain (resolved) config."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{path}[{i}]")
    else:
        yield path, node


def _targets(node, path: str = ""):
    """(dotted key, node) of every option with a _target_ in a plain config."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for key, value in node.items():
            yield from _targets(value, f"{path}.{key}" if path else str(key))


def _scalar_kinds(param: inspect.Parameter) -> set[str]:
    """Which of bool, int, float a constructor argument accepts, from its annotation or default."""
    hint = param.annotation
    if hint is inspect.Parameter.empty:
        default = param.default
        hint = "" if default is None or default is inspect.Parameter.empty else type(default)
    text = hint if isinstance(hint, str) else inspect.formatannotation(hint)
    return set(re.findall(r"\b(bool|int|float)\b", text))


def _type_problems(path: str, node: dict) -> dict[str, tuple]:
    """Values of a _target_ option that its constructor's signature does not take: a boolean
    for a number (torch would read true as 1), a fraction for an integer, a number for a flag."""
    try:
        params = inspect.signature(_resolve(node["_target_"])).parameters
    except Exception:  # _structure_problems names a target that does not import
        return {}
    problems = {}
    for key, value in node.items():
        if key.startswith("_") or key not in params or isinstance(value, (dict, list, str)):
            continue
        kinds, where = _scalar_kinds(params[key]), f"{path}.{key}"
        if isinstance(value, bool) and kinds and "bool" not in kinds:
            problems[where] = value, f"a number ({' or '.join(sorted(kinds))}), not true/false"
        elif isinstance(value, float) and kinds == {"int"} and not value.is_integer():
            problems[where] = value, "an integer"
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and kinds == {"bool"}:
            problems[where] = value, "true or false"
    return problems


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming every key whose value is impossible or that nothing reads."""
    missing = [key for key in REQUIRED if key not in cfg]
    if missing:
        raise ConfigError("invalid config: " + "; ".join(
            f"{key} is missing (removed with ~{key}?); every run needs it" for key in missing))
    plain = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
    structure = _structure_problems(plain)
    if structure:
        raise ConfigError("invalid config: " + "; ".join(structure))
    problems = {}  # key -> (value, what it must be); the first complaint about a key wins
    for key, (ok, must_be) in RULES.items():
        if OmegaConf.select(cfg, key, default="<absent>") == "<absent>":
            continue
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
        if not ok(value):
            problems[key] = value, must_be
    for key, value in _leaves(plain):
        if isinstance(value, float) and not math.isfinite(value):
            problems.setdefault(key, (value, "a finite number"))
    for path, node in _targets(plain):
        for key, complaint in _type_problems(path, node).items():
            problems.setdefault(key, complaint)
    start = OmegaConf.select(cfg, "swa.start_epoch")
    if _positive_int(start) and _positive_int(cfg.get("epochs")) and start > cfg.epochs:
        # no epoch would be averaged, so the run would silently report no SWA result
        problems.setdefault("swa.start_epoch", (start, f"<= epochs={cfg.epochs}"))
    if problems:
        raise ConfigError("invalid config: " + "; ".join(
            f"{key}={value!r} must be {must_be}" for key, (value, must_be) in problems.items()))


def out_of_memory(err: BaseException) -> bool:
    """Whether err is a failed allocation (CPU or GPU): a size this machine cannot hold."""
    return (isinstance(err, (MemoryError, torch.OutOfMemoryError))
            or "can't allocate memory" in str(err))


def dry_run(cfg: DictConfig, model: torch.nn.Module, loss_fn: torch.nn.Module, data) -> None:
    """Try the built objects before the first epoch; raise ConfigError on what only that shows."""
    _check_schedule(cfg)
    _check_forward(model, loss_fn, data)
    _check_batch_of_one(model, data, cfg.batch_size)


# Epochs of the schedule the dry run steps through (about 0.1 s): every run of a sensible length,
# and a bound on the time the check takes whatever `epochs` says (scale=1e7 makes it 5e8). A
# schedule that fails only later fails in training, and the record says so.
CHECKED_EPOCHS = 1000


def _check_schedule(cfg: DictConfig) -> None:
    """Step the configured optimizer and scheduler, on one throwaway parameter, through the
    epochs the run will schedule (up to CHECKED_EPOCHS): a zero period, or a factor that sends
    the learning rate negative or to infinity, fails here instead of after a full epoch (or never)."""
    optimizer = instantiate(cfg.optim)([torch.zeros(1, requires_grad=True)])
    scheduler = instantiate(cfg.sched)(optimizer)
    swa_start = OmegaConf.select(cfg, "swa.start_epoch")
    settings = ", ".join(f"sched.{k}={v}" for k, v in cfg.sched.items() if not k.startswith("_"))
    last = min(cfg.epochs, swa_start or cfg.epochs, CHECKED_EPOCHS)  # SWALR takes over at swa_start
    for epoch in range(1, last + 1):
        try:
            optimizer.step()  # no gradient, so nothing moves; torch wants it before the scheduler's
            step_scheduler(scheduler, 1.0)
        except (ArithmeticError, ValueError, TypeError, RuntimeError) as err:
            raise ConfigError(f"sched: stepping {type(scheduler).__name__} fails after epoch "
                              f"{epoch} ({type(err).__name__}: {err}); {settings}") from None
        for group in optimizer.param_groups:
            lr = float(group["lr"])
            if not (math.isfinite(lr) and lr >= 0):
                raise ConfigError(f"sched: the learning rate becomes {lr:g} after epoch {epoch}; "
                                  f"{settings}")


@torch.no_grad()
def _check_forward(model: torch.nn.Module, loss_fn: torch.nn.Module, data) -> None:
    """Two training images through the model (eval mode: no BN statistics change) and the loss."""
    inputs, targets = normalize(data.train_x[:2]), data.train_y[:2]
    training = model.training
    logits = model.eval()(inputs)  # (2, classes)
    model.train(training)
    classes = len(data.classes)
    if logits.shape != (len(targets), classes):
        raise ConfigError(f"model: gives {logits.shape[-1]} outputs per image, the data has "
                          f"{classes} classes (model.num_classes vs data.num_classes)")
    loss = float(loss_fn(logits.float(), targets))
    if not (math.isfinite(loss) and loss >= 0):
        raise ConfigError(f"loss: {type(loss_fn).__name__} of the untrained model on two training "
                          f"images is {loss:g}; a classification loss is finite and >= 0")


@torch.no_grad()
def _check_batch_of_one(model: torch.nn.Module, data, batch_size: int) -> None:
    """BatchNorm cannot normalize a single value per channel in training mode (BatchNorm1d on a
    batch of one), which _check_forward's eval mode never shows: when the smallest training batch
    is one image, put it through a copy of the model whose BatchNorm layers train."""
    n = len(data.train_y)
    if min(batch_size, n) != 1:  # training batches are batch_size, or all n images when fewer
        return
    probe = copy.deepcopy(model).eval()  # dropout stays off: no random numbers are drawn
    for module in probe.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.train()
    try:
        probe(normalize(data.train_x[:1]))
    except ValueError as err:
        raise ConfigError(f"batch_size: a training batch of one image (batch_size={batch_size}, "
                          f"{n} training images) fails in training mode ({err}); use batch_size "
                          ">= 2 or more training images") from None
