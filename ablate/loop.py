"""The training loop: one epoch of training, evaluation, and `fit` over epochs with checkpoints."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from tqdm import tqdm

from ablate.checkpoint import atomic_torch_save, load_checkpoint, save_checkpoint
from ablate.data import ImageData, batches, num_batches
from ablate.record import RunRecord, write_atomic, write_metrics

if TYPE_CHECKING:
    from ablate.swa import SWA  # which imports evaluate from here

log = logging.getLogger(__name__)

BEST_WEIGHTS = "best_model.pth"
SWA_WEIGHTS = "swa_model.pth"
STEPS_FILE = "steps.csv"


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

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def prepare(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.contiguous(memory_format=torch.channels_last) if self.channels_last else inputs


def pick_precision(name: str, device: torch.device) -> Precision:
    """fp32 | bf16 | fp16 | auto (bf16 on CUDA, or fp16 + loss scaling where bf16 is missing; fp32 elsewhere)."""
    if name == "fp32" or (name == "auto" and device.type != "cuda"):
        return Precision()
    channels_last = device.type == "cuda"  # NHWC is what cuDNN's tensor-core convolutions want
    if name == "fp16" or (name == "auto" and not torch.cuda.is_bf16_supported()):
        return Precision(torch.float16, channels_last, torch.amp.GradScaler(device.type))
    # bf16 keeps fp32's exponent range, so no loss scaling is needed
    return Precision(torch.bfloat16, channels_last)


def l1_penalty(model: nn.Module) -> torch.Tensor:
    return sum(p.abs().sum() for p in model.parameters())


def train_one_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_fn: nn.Module,
                    optimizer: torch.optim.Optimizer, batch_size: int, generator: torch.Generator,
                    l1_lambda: float = 0.0, grad_clip: float | None = None,
                    precision: Precision = Precision(), step_losses: list | None = None,
                    before_step: Callable | None = None, desc: str = "train") -> dict[str, float]:
    """One pass over (x, y) with augmentation; returns mean data loss and accuracy, and the
    loss of the first step (the reference that divergence is judged against)."""
    model.train()
    device = x.device
    total_loss = torch.zeros((), device=device)  # accumulated on the device: one sync per epoch
    correct = torch.zeros((), device=device, dtype=torch.long)
    first_loss = None
    seen = 0
    # A disabled scaler passes everything straight through to backward() and optimizer.step().
    scaler = precision.scaler or torch.amp.GradScaler(device.type, enabled=False)
    steps = tqdm(batches(x, y, batch_size, generator=generator, augment=True), desc=desc,
                 total=num_batches(len(y), batch_size, train=True), leave=False, disable=None)
    for inputs, targets in steps:
        inputs = precision.prepare(inputs)
        if before_step is not None:
            before_step(inputs, targets)
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
        if step_losses is not None:
            step_losses.append(loss.detach())
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


def summarize(rows: list[dict], record: RunRecord) -> None:
    """Fill the record's accuracy fields from the per-epoch rows."""
    if not rows:
        return
    best = max(rows, key=lambda r: r["test_acc"])  # first epoch reaching the maximum
    record.epochs_run = rows[-1]["epoch"]
    record.final_test_acc = rows[-1]["test_acc"]
    record.final_train_loss = rows[-1]["train_loss"]
    record.best_test_acc, record.best_epoch = best["test_acc"], best["epoch"]
    if rows[0].get("val_acc") is not None:
        best_val = max(rows, key=lambda r: r["val_acc"])
        record.best_val_acc, record.best_val_epoch = best_val["val_acc"], best_val["epoch"]
        record.test_acc_at_best_val = best_val["test_acc"]


def fit(model: nn.Module, data: ImageData, *, loss_fn: nn.Module, optimizer, scheduler,
        epochs: int, batch_size: int, seed: int, run_dir: Path, record: RunRecord,
        l1_lambda: float = 0.0, grad_clip: float | None = None,
        precision: Precision = Precision(), save_weights: bool = True,
        log_steps: bool = False, before_step: Callable | None = None,
        swa: SWA | None = None) -> FitState:
    """Train for `epochs`, resuming from run_dir's checkpoint; writes metrics and checkpoints each epoch.

    With log_steps, every step's training loss goes to steps.csv. `before_step(inputs, targets)`
    runs before each optimizer step (e.g. a loss-landscape probe). Raises Diverged when the
    training blows up (check_divergence). With `swa`, its averaged model is evaluated at the end
    into record.extra (swa_test_acc, ...).
    """
    device = data.train_x.device
    generator = torch.Generator(device=device).manual_seed(seed)
    state = FitState()
    ckpt = load_checkpoint(run_dir)
    if ckpt is not None:
        state = FitState(**ckpt["state"])
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        generator.set_state(ckpt["generator"])
        if swa is not None and ckpt.get("swa") is not None:
            swa.load_state_dict(ckpt["swa"])
        if precision.scaler is not None and ckpt.get("scaler") is not None:
            precision.scaler.load_state_dict(ckpt["scaler"])  # fp16's loss scale, as it was
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        log.info("resuming %s after epoch %d", run_dir, state.epoch)
    summarize(state.rows, record)  # a resumed run's record keeps the accuracies it had
    record.save(run_dir)  # status "running"

    has_val = len(data.val_y) > 0
    best_key = "val_acc" if has_val else "test_acc"
    best_so_far = max((r[best_key] for r in state.rows), default=-1.0)
    for epoch in range(state.epoch + 1, epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        step_losses = [] if log_steps else None
        start = time.perf_counter()
        train = train_one_epoch(model, data.train_x, data.train_y, loss_fn=loss_fn,
                                optimizer=optimizer, batch_size=batch_size, generator=generator,
                                l1_lambda=l1_lambda, grad_clip=grad_clip, precision=precision,
                                step_losses=step_losses, before_step=before_step,
                                desc=f"epoch {epoch}/{epochs}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        if state.start_loss is None:
            state.start_loss = train["first_loss"]
        check_divergence(model, train["loss"], state.start_loss, epoch)
        test = evaluate(model, data.test_x, data.test_y, loss_fn=loss_fn, precision=precision)
        val = evaluate(model, data.val_x, data.val_y, loss_fn=loss_fn, precision=precision) \
            if has_val else {"loss": None, "acc": None}
        if swa is not None and swa.covers(epoch):
            swa.update(model)  # SWALR takes over from the run's scheduler
        else:
            step_scheduler(scheduler, val["loss"] if has_val else test["loss"])

        row = dict(epoch=epoch, train_loss=train["loss"], train_acc=train["acc"],
                   test_loss=test["loss"], test_acc=test["acc"], val_loss=val["loss"],
                   val_acc=val["acc"], lr=lr, seconds=seconds)
        state.rows.append(row)
        state.epoch = epoch
        state.train_seconds += seconds
        state.train_images += train["images"]
        if row[best_key] > best_so_far:
            best_so_far = row[best_key]
            if save_weights:
                _save_weights(model, run_dir / BEST_WEIGHTS)
        log.info("epoch %d/%d  train loss %.4f acc %.4f | test loss %.4f acc %.4f%s | lr %.3g | %.1fs",
                 epoch, epochs, train["loss"], train["acc"], test["loss"], test["acc"],
                 f" | val acc {val['acc']:.4f}" if has_val else "", lr, seconds)

        write_metrics(state.rows, run_dir)
        if log_steps:
            append_steps(run_dir / STEPS_FILE, epoch, torch.stack(step_losses).tolist())
        summarize(state.rows, record)
        record.images_per_second = state.train_images / max(state.train_seconds, 1e-9)
        record.save(run_dir)
        save_checkpoint(run_dir, identity=record.config_hash, state=state, model=model,
                        optimizer=optimizer, scheduler=scheduler, generator=generator,
                        device=device, swa=swa, scaler=precision.scaler)
    summarize(state.rows, record)  # also when resumed after the last epoch: the record is whole
    record.images_per_second = state.train_images / max(state.train_seconds, 1e-9)
    if swa is not None and state.epoch >= swa.start_epoch:
        record.extra.update(swa.finish(data, batch_size=batch_size, loss_fn=loss_fn,
                                       precision=precision))
        if save_weights:
            _save_weights(swa.averaged.module, run_dir / SWA_WEIGHTS)
        record.save(run_dir)
    return state


def append_steps(path: Path, epoch: int, losses: list[float]) -> None:
    """Append one epoch's per-step training losses (rewritten atomically, dropping a re-run epoch)."""
    lines = path.read_text().splitlines()[1:] if path.exists() else []
    lines = [ln for ln in lines if int(ln.split(",")[1]) < epoch]
    first = len(lines)
    lines += [f"{first + i},{epoch},{loss!r}" for i, loss in enumerate(losses)]
    write_atomic(path, "step,epoch,loss\n" + "".join(ln + "\n" for ln in lines))


def _save_weights(model: nn.Module, path: Path) -> None:
    atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
