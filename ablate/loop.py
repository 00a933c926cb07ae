"""The training loop: one epoch of training, evaluation, and `fit` over epochs, extended by callbacks.

Everything `fit` does besides training and evaluating (the scheduler, metrics and the record,
best weights, checkpoints, step losses, SWA, the landscape probe, loggers) is a Callback.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ablate.data import ImageData, batches, num_batches
from ablate.record import METRICS_FILE, RunRecord, from_fields, plain_number, write_metrics

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

    def forward(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                loss_fn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits under autocast, and the loss on them in fp32: autocast rounds the layers'
        outputs (logits included) to bf16/fp16, never the loss, the gradients or the optimizer's
        state, which follow the fp32 weights (docs/fused-and-performance.md, benchmarks/bf16_audit.py)."""
        with self.autocast(inputs.device):
            logits = model(self.prepare(inputs))
        return logits, loss_fn(logits.float(), targets)


# Set to 1 or 0 to make precision=auto on a CPU act as if it had (or lacked) bf16 instructions:
# how the test suite is run both ways on one machine (its subprocesses inherit it).
CPU_BF16_ENV = "ABLATE_CPU_BF16"


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), as torch's CPU dispatch reads
    them (or as ABLATE_CPU_BF16=1|0 says). Without them oneDNN emulates bf16, which is far slower
    than fp32 (13x on an AVX2 EPYC)."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
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
    epoch's, images per second so far, and the running mean loss (the one sync it costs; a fused
    group's is its members' mean, computed only when a line is due)."""

    def __init__(self, desc: str, images: int):
        self.desc, self.images = desc, images
        self.start = self.last = time.perf_counter()

    def step(self, seen: int, total_loss: torch.Tensor) -> None:
        now = time.perf_counter()
        if now - self.last < PROGRESS_SECONDS or seen >= self.images:
            return  # the epoch's own line follows its last step
        self.last = now
        log.info("%s: %d/%d images (%.0f%%) | %.0f images/s | running loss %.4f", self.desc, seen,
                 self.images, 100 * seen / self.images, seen / (now - self.start), total_loss.mean().item() / seen)


def train_one_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_fn: nn.Module,
                    optimizer: torch.optim.Optimizer, batch_size: int, generator: torch.Generator,
                    l1_lambda: float = 0.0, grad_clip: float | None = None,
                    precision: Precision = Precision(), loop: Loop | None = None,
                    desc: str = "train") -> dict[str, float]:
    """One pass over (x, y) with augmentation; returns mean data loss and accuracy, and the
    loss of the first step (the reference that divergence is judged against). `loop`'s
    callbacks see every step (before_step, after_step)."""
    model.train()
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
        if loop is not None:
            loop.call("before_step", inputs, targets)
        logits, loss = precision.forward(model, inputs, targets, loss_fn)
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
        if loop is not None:
            loop.call("after_step", loss.detach())
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
        logits, loss = precision.forward(model, inputs, targets, loss_fn)
        total_loss += loss * len(targets)
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

    Every hook gets the `Loop` of its run: a run alone, or one member of a fused group, which
    its callbacks see as a run of its own. Hooks run in the order of the run's `callbacks`
    mapping. `state_dict` goes into the run's checkpoint under the callback's key, and
    `load_state_dict` gets it back on resume (before `on_fit_start`), so a callback's own
    counters continue where the run stopped (numpy numbers come back as Python numbers, numpy
    arrays as tensors: ablate.checkpoint.plain).
    """

    def on_fit_start(self, loop: Loop) -> None:
        """Once, after a resumed run's state is restored."""

    def before_step(self, loop: Loop, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Before each training step's forward pass, on this run's batch of that step."""

    def after_step(self, loop: Loop, loss: torch.Tensor) -> None:
        """After each optimizer step, with this run's data loss (on the device: no sync)."""

    def on_epoch_end(self, loop: Loop, row: dict) -> None:
        """After each epoch, with its metrics.csv row (already in loop.state.rows)."""

    def on_fit_end(self, loop: Loop) -> None:
        """Once, after the last epoch (also when a resumed run had no epoch left); never for a
        run that diverged."""

    def on_run_end(self, record: RunRecord) -> None:
        """Once the run's record holds its final status (completed, diverged, failed or
        interrupted) and is saved, whatever ended the run; called by the entry point that built
        the callbacks (ablate.compose.run, ablate.fused.train_stack), not by `fit`, and also
        when the run stopped before on_fit_start. It must not raise."""

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


@dataclass(eq=False)
class Loop:
    """One run inside `fit`, as its callbacks see it: its folder, record, epochs so far, data
    order, and its weights and gradients (`weights()`, `gradients()`: the same calls for a run
    alone and for a member of a fused group, ablate.fused.MemberLoop)."""

    model: nn.Module | None
    data: ImageData
    recipe: Recipe
    run_dir: Path
    record: RunRecord
    callbacks: dict[str, Callback]
    generator: torch.Generator  # data order and augmentation
    state: FitState = field(default_factory=FitState)

    @property
    def has_val(self) -> bool:
        return len(self.data.val_y) > 0

    def call(self, hook: str, *args) -> None:
        for cb in self.callbacks.values():
            getattr(cb, hook)(self, *args)

    def end_epoch(self, row: dict) -> None:
        """Every callback's on_epoch_end; a column one adds or changes in `row` must be a plain
        number (a numpy scalar or one-element tensor becomes one): anything else stops the run at
        the end of its first epoch, naming the callback and the column, before more is spent."""
        for key, cb in self.callbacks.items():
            before = dict(row)
            cb.on_epoch_end(self, row)
            for column, value in row.items():
                if column in before and before[column] is value:
                    continue
                try:
                    row[column] = plain_number(value)
                except ValueError as err:
                    from ablate.validation import ConfigError  # validation imports this module
                    raise ConfigError(f"callback {key!r} put {err} in column {column!r} of "
                                      f"{METRICS_FILE}; give it a plain number (float(...))") from None

    def weights(self) -> dict[str, torch.Tensor]:
        """This run's model's state_dict."""
        return self.model.state_dict()

    def gradients(self) -> list[torch.Tensor]:
        """The gradients of this run's trainable parameters from the last step (None skipped)."""
        return [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]

    def optimizer_state(self) -> dict:
        return self.recipe.optimizer.state_dict()

    def rng_states(self) -> dict:
        """The random streams dropout draws from (the global ones, for a run alone)."""
        device = self.data.train_x.device
        return {"rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue bit for bit (ablate.checkpoint's keys;
        ablate.checkpoint.resume_state makes it what torch.load(weights_only=True) reads back)."""
        scaler = self.recipe.precision.scaler
        return {"state": asdict(self.state), "model": self.weights(),
                "optimizer": self.optimizer_state(), "generator": self.generator.get_state(),
                **self.rng_states(),
                "scaler": scaler.state_dict() if scaler is not None else None,  # fp16 loss scale
                **{key: cb.state_dict() for key, cb in self.callbacks.items()}}

    def load_training(self, ckpt: dict) -> None:
        """The model, optimizer and fp16 loss scale of the checkpoint."""
        self.model.load_state_dict(ckpt["model"])
        self.recipe.optimizer.load_state_dict(ckpt["optimizer"])
        if self.recipe.precision.scaler is not None and ckpt.get("scaler") is not None:
            self.recipe.precision.scaler.load_state_dict(ckpt["scaler"])  # fp16's loss scale, as it was

    def load_rng_states(self, ckpt: dict) -> None:
        torch.set_rng_state(ckpt["rng_cpu"])
        device = self.data.train_x.device
        if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)

    def load_state_dict(self, ckpt: dict) -> None:
        self.state = from_fields(FitState, ckpt["state"])  # one from a newer version loads too
        self.load_training(ckpt)
        self.generator.set_state(ckpt["generator"])
        self.load_rng_states(ckpt)
        for key, cb in self.callbacks.items():  # after the optimizer: SWALR is rebuilt on it
            if ckpt.get(key) is not None:
                cb.load_state_dict(ckpt[key])


class Alone:
    """What `fit` trains for a run alone: one model. (ablate.fused.Fused trains N members.)"""

    def __init__(self, model: nn.Module, recipe: Recipe):
        self.model, self.recipe = model, recipe

    def train_epoch(self, loops: list[Loop], desc: str) -> list[dict]:
        (loop,) = loops
        r = self.recipe
        return [train_one_epoch(self.model, loop.data.train_x, loop.data.train_y, loss_fn=r.loss_fn,
                                optimizer=r.optimizer, batch_size=r.batch_size,
                                generator=loop.generator, l1_lambda=r.l1_lambda,
                                grad_clip=r.grad_clip, precision=r.precision, loop=loop, desc=desc)]

    def finite(self) -> list[bool]:
        return [all_finite(self.model)]

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
        return [evaluate(self.model, x, y, loss_fn=self.recipe.loss_fn, precision=self.recipe.precision)]

    def drop(self, keep: list[int]) -> None:
        """Nothing is left to train once the one run diverged."""


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGTERM/SIGINT while a fused group's epoch goes to disk: all members stay at one epoch.

    Held in Python rather than with pthread_sigmask, which covers one thread only: the kernel
    may hand the signal to one of torch's worker threads, and Python still runs its handler.
    Only the main thread can set handlers; elsewhere the signal arrives as it would.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:  # deliver it now, to whoever handled it before
            os.kill(os.getpid(), caught[0])


def fit(trainer, loops: list[Loop], *, epochs: int,
        resumes: list[dict | None] | None = None) -> list[Loop]:
    """Train `loops` (one run, or the members of a fused group, all at the same epoch) for
    `epochs`, each continuing from its checkpoint in `resumes`; callbacks do the rest. A run
    that diverges gets record.status "diverged" and leaves; the others go on. Returns the runs
    that trained to the end."""
    for loop, ckpt in zip(loops, resumes or [None] * len(loops)):
        if ckpt is not None:
            loop.load_state_dict(ckpt)
            log.info("%s: resuming after epoch %d", loop.run_dir, loop.state.epoch)
    for loop in loops:
        loop.call("on_fit_start")
    alive = list(loops)
    for epoch in range(alive[0].state.epoch + 1, epochs + 1):
        rows = run_epoch(trainer, alive, epoch, epochs)
        if not alive:
            return []
        # a group's members all stop at one epoch (a run alone stops where the signal finds it)
        with signals_deferred() if len(alive) > 1 else contextlib.nullcontext():
            for loop, row in zip(alive, rows):
                loop.state.rows.append(row)
                loop.state.epoch = epoch
                loop.end_epoch(row)
    for loop in alive:
        loop.call("on_fit_end")
    return alive


def leave(loop: Loop, reason: str) -> None:
    """Record a run as diverged: its checkpoint and files stay at its last good epoch."""
    loop.record.status, loop.record.error = "diverged", reason
    loop.record.stop_clock()  # its time ends here, not with its group's
    loop.record.save(loop.run_dir)
    log.warning("%s diverged: %s", loop.run_dir, reason)


def run_epoch(trainer, loops: list[Loop], epoch: int, epochs: int) -> list[dict]:
    """Train one epoch, check each run, evaluate: each surviving run's metrics.csv row. Runs that
    diverged are recorded and removed from `loops` (and from the trainer)."""
    recipe = loops[0].recipe
    data = loops[0].data
    device = data.train_x.device
    lr = recipe.optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    try:
        trains = trainer.train_epoch(loops, f"epoch {epoch}/{epochs}")
    except Diverged as err:  # the step overflowed: the same settings blow up every member
        for loop in loops:
            leave(loop, str(err))
        loops.clear()
        return []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    keep = []
    for m, (loop, train, finite) in enumerate(zip(loops, trains, trainer.finite())):
        state = loop.state
        if state.start_loss is None:
            state.start_loss = train["first_loss"]
        reason = divergence(train["loss"], state.start_loss, finite, epoch)
        if reason is None:
            keep.append(m)
        else:
            leave(loop, reason)
    if not keep:
        loops.clear()
        return []
    if len(keep) < len(loops):
        trainer.drop(keep)
        loops[:] = [loops[m] for m in keep]
        trains = [trains[m] for m in keep]
    tests = trainer.evaluate(data.test_x, data.test_y)
    has_val = loops[0].has_val
    vals = trainer.evaluate(data.val_x, data.val_y) if has_val else [{"loss": None, "acc": None}] * len(loops)
    rows = []
    for loop, train, test, val in zip(loops, trains, tests, vals):
        loop.state.train_seconds += seconds  # a fused group's time: its members trained together
        loop.state.train_images += train["images"]
        log.info("%sepoch %d/%d  train loss %.4f acc %.4f | test loss %.4f acc %.4f%s | lr %.3g | %.1fs",
                 f"seed {loop.record.seed}: " if len(loops) > 1 else "", epoch, epochs, train["loss"],
                 train["acc"], test["loss"], test["acc"],
                 f" | val acc {val['acc']:.4f}" if has_val else "", lr, seconds)
        rows.append(dict(epoch=epoch, train_loss=train["loss"], train_acc=train["acc"],
                         test_loss=test["loss"], test_acc=test["acc"], val_loss=val["loss"],
                         val_acc=val["acc"], lr=lr, seconds=seconds))
    return rows


class Schedule(Callback):
    """Steps the run's scheduler after each epoch; ReduceLROnPlateau gets the loss it monitors.
    The members of a fused group share one: it steps once an epoch, at the first member's end."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.stepped = None  # the epoch it last stepped after

    def on_epoch_end(self, loop: Loop, row: dict) -> None:
        if self.stepped != row["epoch"]:
            self.stepped = row["epoch"]
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
