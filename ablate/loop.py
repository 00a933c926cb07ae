"""The training loop: one epoch of training, evaluation, and `fit` over epochs, extended by callbacks.

Everything `fit` does besides training and evaluating (the scheduler, metrics and the record,
best weights, checkpoints, step losses, SWA, the landscape probe, loggers) is a Callback.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ablate.data import ImageData, batches, num_batches
from ablate.record import RunRecord, from_fields, write_metrics

log = logging.getLogger(__name__)
PROGRESS_SECONDS = 30.0  # without a terminal (no tqdm bar), a progress line at most this often


class Diverged(RuntimeError):
    """Training blew up: a non-finite loss or weight, an overflowing step, or an exploded loss."""


# An epoch whose mean training loss is this many times the run's first-step loss has diverged
# (a healthy run's loss falls from its start; one at 10x is predicting confidently and wrongly).
EXPLODED = 10.0


@dataclass
class Precision:
    """How the forward pass runs: autocast dtype (None = fp32), memory format, fp16 loss scaler."""

    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False
    scaler: torch.amp.GradScaler | None = None  # only fp16 needs one: its range underflows small grads

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def prepare(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.contiguous(memory_format=torch.channels_last) if self.channels_last else inputs


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), as torch's CPU dispatch reads
    them. Without them oneDNN emulates bf16, which is far slower than fp32 (13x on an AVX2 EPYC)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_precision(name: str, device: torch.device) -> str:
    """What `name` computes in on `device`: auto is bf16 on CUDA (fp16 where bf16 is missing) and
    on CPUs with bf16 instructions, fp32 elsewhere; the other names are themselves."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_computes_bf16() else "fp32"


def pick_precision(name: str, device: torch.device) -> Precision:
    """The Precision of `name` (fp32 | bf16 | fp16 | auto) on `device`."""
    name = resolve_precision(name, device)
    # NHWC is what cuDNN's tensor-core and oneDNN's CPU convolutions run fastest (on a 2-core AVX2
    # CPU, fp32 seed-CNN steps take 0.81x the time of NCHW's).
    channels_last = device.type == "cpu" or (device.type == "cuda" and name != "fp32")
    if name == "fp32":
        return Precision(channels_last=channels_last)
    if name == "fp16":
        return Precision(torch.float16, channels_last, torch.amp.GradScaler(device.type))
    # bf16 keeps fp32's exponent range, so no loss scaling is needed
    return Precision(torch.bfloat16, channels_last)


def l1_penalty(model: nn.Module) -> torch.Tensor:
    return sum(p.abs().sum() for p in model.parameters())


class Progress:
    """An epoch's progress as a log line at most every PROGRESS_SECONDS: images done of the
    epoch's, images per second so far, and the running mean loss (the one sync it costs)."""

    def __init__(self, desc: str, images: int):
        self.desc, self.images = desc, images
        self.start = self.last = time.perf_counter()

    def step(self, seen: int, total_loss: torch.Tensor) -> None:
        now = time.perf_counter()
        if now - self.last < PROGRESS_SECONDS or seen >= self.images:
            return  # the epoch's own line follows its last step
        self.last = now
        log.info("%s: %d/%d images (%.0f%%) | %.0f images/s | running loss %.4f", self.desc, seen,
                 self.images, 100 * seen / self.images, seen / (now - self.start), total_loss.item() / seen)


def train_one_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_fn: nn.Module,
                    optimizer: torch.optim.Optimizer, batch_size: int, generator: torch.Generator,
                    l1_lambda: float = 0.0, grad_clip: float | None = None,
                    precision: Precision = Precision(), callbacks: Iterable[Callback] = (),
                    desc: str = "train") -> dict[str, float]:
    """One pass over (x, y) with augmentation; returns mean data loss and accuracy, and the
    loss of the first step (the reference that divergence is judged against)."""
    model.train()
    callbacks = list(callbacks)
    device = x.device
    total_loss = torch.zeros((), device=device)  # accumulated on the device: one sync per epoch
    correct = torch.zeros((), device=device, dtype=torch.long)
    first_loss = None
    seen = 0
    # A disabled scaler passes everything straight through to backward() and optimizer.step().
    scaler = precision.scaler or torch.amp.GradScaler(device.type, enabled=False)
    total_steps = num_batches(len(y), batch_size, train=True)
    steps = tqdm(batches(x, y, batch_size, generator=generator, augment=True), desc=desc,
                 total=total_steps, leave=False, disable=None)
    # tqdm draws no bar without a terminal (a launcher's log, SLURM): a line now and then instead
    progress = Progress(desc, min(len(y), total_steps * batch_size)) if steps.disable else None
    for inputs, targets in steps:
        inputs = precision.prepare(inputs)
        for cb in callbacks:
            cb.before_step(inputs, targets)
        with precision.autocast(device):
            logits = model(inputs)
        loss = loss_fn(logits.float(), targets)
        objective = loss + l1_lambda * l1_penalty(model) if l1_lambda else loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(objective).backward()
        if grad_clip:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        try:
            scaler.step(optimizer)  # skipped when a scaled fp16 gradient overflowed
        except RuntimeError as err:
            # A finite but huge update (e.g. lr=1e308) overflows when the step casts it to the
            # weights' dtype: that is the run blowing up, not a bug in the code.
            if "overflow" not in str(err):
                raise
            raise Diverged(f"the optimizer step overflowed ({err})") from None
        scaler.update()
        if first_loss is None:
            first_loss = loss.detach()
        total_loss += loss.detach() * len(targets)
        correct += (logits.argmax(1) == targets).sum()
        seen += len(targets)
        for cb in callbacks:
            cb.after_step(loss.detach())
        if progress is not None:
            progress.step(seen, total_loss)
    total, first = torch.stack([total_loss, first_loss]).tolist()  # the epoch's one sync
    return {"loss": total / seen, "first_loss": first, "acc": correct.item() / seen, "images": seen}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_fn: nn.Module,
             batch_size: int = 1024, precision: Precision = Precision()) -> dict[str, float]:
    """Mean loss and accuracy of `model` on (x, y), in eval mode, without augmentation."""
    model.eval()
    total_loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for inputs, targets in batches(x, y, batch_size):
        with precision.autocast(x.device):
            logits = model(precision.prepare(inputs))
        total_loss += loss_fn(logits.float(), targets) * len(targets)
        correct += (logits.argmax(1) == targets).sum()
    return {"loss": total_loss.item() / len(y), "acc": correct.item() / len(y)}


@dataclass
class FitState:
    """What `fit` carries from epoch to epoch (and through a checkpoint)."""

    epoch: int = 0
    rows: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    train_images: int = 0
    start_loss: float | None = None  # the run's first training step's loss


def all_finite(model: nn.Module) -> bool:
    """Whether every floating-point weight and buffer is finite (one device sync)."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all())


def divergence(epoch_loss: float, start_loss: float | None, weights_finite: bool,
               epoch: int) -> str | None:
    """Why this epoch's training counts as diverged (see EXPLODED and README), or None."""
    if not math.isfinite(epoch_loss):
        return f"training loss became {epoch_loss} in epoch {epoch}"
    if not weights_finite:
        return f"weights became non-finite in epoch {epoch}"
    if start_loss is not None and epoch_loss > EXPLODED * start_loss > 0:
        return (f"training loss exploded to {epoch_loss:.3g} in epoch {epoch}, over "
                f"{EXPLODED:g}x the first step's {start_loss:.3g}")
    return None


def check_divergence(model: nn.Module, epoch_loss: float, start_loss: float, epoch: int) -> None:
    """Raise Diverged when this epoch's training blew up."""
    reason = divergence(epoch_loss, start_loss, all_finite(model), epoch)
    if reason is not None:
        raise Diverged(reason)


def step_scheduler(scheduler, monitor_loss: float) -> None:
    """One epoch's step; ReduceLROnPlateau takes the loss it monitors."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(monitor_loss)
    elif scheduler is not None:
        scheduler.step()


def summarize(state: FitState, record: RunRecord) -> None:
    """Fill the record's accuracy fields and training speed from the epochs done so far."""
    rows = state.rows
    if not rows:
        return
    record.images_per_second = state.train_images / max(state.train_seconds, 1e-9)
    best = max(rows, key=lambda r: r["test_acc"])  # first epoch reaching the maximum
    record.epochs_run = rows[-1]["epoch"]
    record.final_test_acc = rows[-1]["test_acc"]
    record.final_train_loss = rows[-1]["train_loss"]
    record.best_test_acc, record.best_epoch = best["test_acc"], best["epoch"]
    if rows[0].get("val_acc") is not None:
        best_val = max(rows, key=lambda r: r["val_acc"])
        record.best_val_acc, record.best_val_epoch = best_val["val_acc"], best_val["epoch"]
        record.test_acc_at_best_val = best_val["test_acc"]




class Callback:
    """A door into `fit`: override the hooks you need (all are no-ops here).

    Hooks run in the order of fit's `callbacks` mapping. `state_dict` goes into the run's
    checkpoint under the callback's key, and `load_state_dict` gets it back on resume (before
    `on_fit_start`), so a callback's own counters continue where the run stopped.
    """

    def on_fit_start(self, loop: Loop) -> None:
        """Once, after a resumed run's state is restored."""

    def before_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Before each training step's forward pass, on that step's batch."""

    def after_step(self, loss: torch.Tensor) -> None:
        """After each optimizer step, with the step's data loss (on the device: no sync)."""

    def on_epoch_end(self, loop: Loop, row: dict) -> None:
        """After each epoch, with its metrics.csv row (already in loop.state.rows)."""

    def on_fit_end(self, loop: Loop) -> None:
        """Once, after the last epoch (also when a resumed run had no epoch left)."""

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class Recipe:
    """How one training step runs (train_one_epoch's settings)."""

    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    batch_size: int
    l1_lambda: float = 0.0
    grad_clip: float | None = None
    precision: Precision = field(default_factory=Precision)


def plain_numbers(state):
    """A callback's state with numpy scalars as Python numbers: checkpoints are read back with
    torch.load(weights_only=True), which refuses numpy objects, and the resume would start over."""
    if isinstance(state, dict):
        return {key: plain_numbers(value) for key, value in state.items()}
    if type(state) in (list, tuple):
        return type(state)(plain_numbers(value) for value in state)
    return state.item() if isinstance(state, np.generic) else state


@dataclass
class Loop:
    """What a callback sees of the running `fit`."""

    model: nn.Module
    data: ImageData
    recipe: Recipe
    run_dir: Path
    record: RunRecord
    callbacks: dict[str, Callback]
    generator: torch.Generator
    state: FitState = field(default_factory=FitState)

    @property
    def has_val(self) -> bool:
        return len(self.data.val_y) > 0

    def call(self, hook: str, *args) -> None:
        for cb in self.callbacks.values():
            getattr(cb, hook)(self, *args)

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue bit for bit (ablate.checkpoint's keys)."""
        device = self.data.train_x.device
        scaler = self.recipe.precision.scaler
        return {"state": asdict(self.state), "model": self.model.state_dict(),
                "optimizer": self.recipe.optimizer.state_dict(),
                "generator": self.generator.get_state(), "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "scaler": scaler.state_dict() if scaler is not None else None,  # fp16 loss scale
                **{key: plain_numbers(cb.state_dict()) for key, cb in self.callbacks.items()}}

    def load_state_dict(self, ckpt: dict) -> None:
        self.state = from_fields(FitState, ckpt["state"])  # one from a newer version loads too
        self.model.load_state_dict(ckpt["model"])
        self.recipe.optimizer.load_state_dict(ckpt["optimizer"])
        self.generator.set_state(ckpt["generator"])
        if self.recipe.precision.scaler is not None and ckpt.get("scaler") is not None:
            self.recipe.precision.scaler.load_state_dict(ckpt["scaler"])  # fp16's loss scale, as it was
        torch.set_rng_state(ckpt["rng_cpu"])
        device = self.data.train_x.device
        if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        for key, cb in self.callbacks.items():  # after the optimizer: SWALR is rebuilt on it
            if ckpt.get(key) is not None:
                cb.load_state_dict(ckpt[key])


def fit(model: nn.Module, data: ImageData, recipe: Recipe, *, epochs: int, seed: int,
        run_dir: Path, record: RunRecord, callbacks: dict[str, Callback],
        resume: dict | None = None) -> FitState:
    """Train for `epochs` (continuing from the checkpoint `resume`); callbacks do the rest.

    Raises Diverged when the training blows up (check_divergence).
    """
    generator = torch.Generator(device=data.train_x.device).manual_seed(seed)
    loop = Loop(model, data, recipe, Path(run_dir), record, callbacks, generator)
    if resume is not None:
        loop.load_state_dict(resume)
        log.info("resuming after epoch %d", loop.state.epoch)
    loop.call("on_fit_start")
    for epoch in range(loop.state.epoch + 1, epochs + 1):
        row = run_epoch(loop, epoch, epochs)
        loop.state.rows.append(row)
        loop.state.epoch = epoch
        loop.call("on_epoch_end", row)
    loop.call("on_fit_end")
    return loop.state


def run_epoch(loop: Loop, epoch: int, epochs: int) -> dict:
    """Train one epoch, check it, evaluate: the epoch's metrics.csv row."""
    model, data, recipe, state = loop.model, loop.data, loop.recipe, loop.state
    device = data.train_x.device
    lr = recipe.optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    train = train_one_epoch(model, data.train_x, data.train_y, loss_fn=recipe.loss_fn,
                            optimizer=recipe.optimizer, batch_size=recipe.batch_size,
                            generator=loop.generator, l1_lambda=recipe.l1_lambda,
                            grad_clip=recipe.grad_clip, precision=recipe.precision,
                            callbacks=loop.callbacks.values(), desc=f"epoch {epoch}/{epochs}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if state.start_loss is None:
        state.start_loss = train["first_loss"]
    check_divergence(model, train["loss"], state.start_loss, epoch)
    state.train_seconds += seconds
    state.train_images += train["images"]
    test = evaluate(model, data.test_x, data.test_y, loss_fn=recipe.loss_fn, precision=recipe.precision)
    val = evaluate(model, data.val_x, data.val_y, loss_fn=recipe.loss_fn, precision=recipe.precision) \
        if loop.has_val else {"loss": None, "acc": None}
    log.info("epoch %d/%d  train loss %.4f acc %.4f | test loss %.4f acc %.4f%s | lr %.3g | %.1fs",
             epoch, epochs, train["loss"], train["acc"], test["loss"], test["acc"],
             f" | val acc {val['acc']:.4f}" if loop.has_val else "", lr, seconds)
    return dict(epoch=epoch, train_loss=train["loss"], train_acc=train["acc"],
                test_loss=test["loss"], test_acc=test["acc"], val_loss=val["loss"],
                val_acc=val["acc"], lr=lr, seconds=seconds)


class Schedule(Callback):
    """Steps the run's scheduler after each epoch; ReduceLROnPlateau gets the loss it monitors."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def on_epoch_end(self, loop: Loop, row: dict) -> None:
        step_scheduler(self.scheduler, row["val_loss"] if loop.has_val else row["test_loss"])

    def state_dict(self) -> dict | None:
        return self.scheduler.state_dict() if self.scheduler is not None else None

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


class Metrics(Callback):
    """metrics.csv and result.json after every epoch: the record always says how far the run got."""

    def on_fit_start(self, loop: Loop) -> None:
        summarize(loop.state, loop.record)  # a resumed run's record keeps the accuracies it had
        loop.record.save(loop.run_dir)  # status "running"

    def on_epoch_end(self, loop: Loop, row: dict) -> None:
        write_metrics(loop.state.rows, loop.run_dir)
        self.on_fit_end(loop)

    def on_fit_end(self, loop: Loop) -> None:  # after SWA's entries, which come before in the callbacks
        summarize(loop.state, loop.record)
        loop.record.save(loop.run_dir)
