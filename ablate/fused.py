"""Fused seeds: N runs of one configuration, differing only in `seed`, trained as one stacked model.

The members' parameters and buffers are stacked along a new leading dimension (N, ...) and
`vmap` runs one template module over it with `functional_call`: the convolutions become one
grouped convolution, the linear layers one batched matmul, so N small models cost about one
launch of each kernel. What makes a run *that* run stays per member: its initialisation (built
with its seed as `train.run` builds it), data order and augmentation (its own generator, as
`loop.fit` seeds it), dropout masks (drawn from its own stream, bit for bit the single run's on
CPU), BatchNorm statistics (stacked buffers), L1 term, gradient norm clipping, divergence
check and best epoch. One optimizer over the stacked tensors acts element-wise, so it equals N
optimizers; `fusable` checks that for the configured optimizer and refuses what cannot be fused.

The stack is what `loop.fit` trains (`Fused`); each member is a `MemberLoop`, which its
callbacks (the same as its run alone would have: metrics and record, best weights, checkpoint,
step losses, loggers, user callbacks) see as a run of its own. So every member checkpoints into
its own run folder in `ablate.checkpoint`'s format: a member resumes fused or alone, and a run
begun alone resumes in a group.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from ablate.checkpoint import link_seed_name, load_checkpoint, save_finished
from ablate.data import batches, num_batches
from ablate.loop import (Diverged, Loop, Precision, Progress, Recipe, Schedule, fit,
                         pick_precision)
from ablate.compose import Job  # noqa: F401  (the jobs run_group trains)
from ablate.record import RunRecord, WriteError

log = logging.getLogger("ablate")

# ----------------------------------------------------------------------------- the stack


class MemberDropout(nn.Module):
    """nn.Dropout whose masks come from outside vmap, drawn from each member's own stream."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.masks: list[torch.Tensor] = []  # one per call of this module in the coming forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:  # as F.dropout: no random draw at all
            return x
        return x * self.masks.pop(0)


def draw_mask(shape: torch.Size, p: float, generator: torch.Generator) -> torch.Tensor:
    """The scaled keep-mask F.dropout draws on CPU (bernoulli(1 - p) / (1 - p)), from `generator`."""
    mask = torch.empty(shape, device=generator.device).bernoulli_(1 - p, generator=generator)
    return mask.div_(1 - p)


class Stack:
    """N members of one architecture: parameters and buffers stacked on dim 0, one template module."""

    def __init__(self, models: list[nn.Module], loss_fn: nn.Module, l1_lambda: float = 0.0):
        # Leaves of shape (N, ...); a plain optimizer steps them, autograd fills their .grad.
        self.params, self.buffers = stack_module_state(models)
        self.template = copy.deepcopy(models[0]).to("meta")  # holds no numbers, only the code
        for name, module in list(self.template.named_modules()):
            if type(module) is nn.Dropout:  # other random modules make vmap raise (see fusable)
                parent, _, child = name.rpartition(".")
                setattr(self.template.get_submodule(parent), child, MemberDropout(module.p))
        self.loss_fn, self.l1_lambda = loss_fn, l1_lambda
        self._dropout_calls: dict[torch.Size, list[tuple[MemberDropout, torch.Size]]] = {}

    @property
    def size(self) -> int:
        return len(next(iter(self.params.values())))

    def dropout_calls(self, input_shape: torch.Size) -> list[tuple[MemberDropout, torch.Size]]:
        """The active dropout modules in the order one member's forward calls them, with input shapes."""
        if input_shape not in self._dropout_calls:
            calls = []
            hooks = [m.register_forward_pre_hook(lambda mod, args: calls.append((mod, args[0].shape)))
                     for m in self.template.modules() if isinstance(m, MemberDropout) and m.p > 0]
            with torch.no_grad():  # a shape-only pass on the meta device, in eval mode
                training = self.template.training
                self.template.eval()(torch.empty(input_shape, device="meta"))
                self.template.train(training)
            for h in hooks:
                h.remove()
            self._dropout_calls[input_shape] = calls
        return self._dropout_calls[input_shape]

    def _member_forward(self, params, buffers, inputs, targets, masks):
        # One member's view: params/buffers without the N dimension, inputs (B, 3, 32, 32).
        for (module, _), mask in zip(self._calls, masks):
            module.masks.append(mask)
        logits = functional_call(self.template, (params, buffers), (inputs,))
        loss = self.loss_fn(logits.float(), targets)
        objective = loss
        if self.l1_lambda:  # the same sum as loop.l1_penalty, over this member's own weights
            objective = loss + self.l1_lambda * sum(p.abs().sum() for p in params.values())
        return objective, loss, logits

    def train_forward(self, inputs: torch.Tensor, targets: torch.Tensor,
                      rngs: list[torch.Generator]):
        """(N, B, 3, 32, 32), (N, B) -> objective (N,), data loss (N,), logits (N, B, classes)."""
        self.template.train()
        self._calls = self.dropout_calls(inputs.shape[1:])
        for module, _ in self._calls:
            module.masks.clear()  # nothing left over from a forward that raised
        # Member m draws its masks from its own stream in its single run's order (call by call).
        masks = [torch.stack([draw_mask(shape, module.p, rng) for rng in rngs])
                 for module, shape in self._calls]
        # randomness="error": every random number must come from a member's own stream (above),
        # never from inside the vmapped function; a model drawing others is refused by fusable.
        return vmap(self._member_forward, randomness="error")(
            self.params, self.buffers, inputs, targets, masks)

    @torch.no_grad()
    def finite_members(self) -> list[bool]:
        """Per member, whether all its floating-point weights and buffers are finite (one sync)."""
        tensors = [t for t in [*self.params.values(), *self.buffers.values()] if t.is_floating_point()]
        return torch.stack([t.flatten(1).isfinite().all(1) for t in tensors]).all(0).tolist()

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024,
                 precision: Precision = Precision()) -> list[dict[str, float]]:
        """loop.evaluate for every member: the same images through each, in eval mode."""
        self.template.eval()

        def member(params, buffers, inputs, targets):
            logits = functional_call(self.template, (params, buffers), (inputs,))
            return self.loss_fn(logits.float(), targets), logits

        total_loss = torch.zeros(self.size, device=x.device)
        correct = torch.zeros(self.size, device=x.device, dtype=torch.long)
        for inputs, targets in batches(x, y, batch_size):
            with precision.autocast(x.device):
                loss, logits = vmap(member, in_dims=(0, 0, None, None), randomness="error")(
                    self.params, self.buffers, inputs, targets)
            total_loss += loss * len(targets)
            correct += (logits.argmax(-1) == targets).sum(1)
        return [{"loss": loss / len(y), "acc": acc / len(y)}
                for loss, acc in zip(total_loss.tolist(), correct.tolist())]

    def state_dict(self, m: int) -> dict[str, torch.Tensor]:
        """Member m's weights as its own model's state_dict (copies: a view would save all N)."""
        stacked = {**self.params, **self.buffers}
        return {k: stacked[k][m].detach().clone() for k in self.template.state_dict()}

    def keep(self, members: list[int]) -> None:
        """Drop every member not listed; the stacked tensors become new leaves."""
        index = torch.tensor(members, device=next(iter(self.params.values())).device)
        self.params = {k: v.detach()[index].requires_grad_(v.requires_grad)
                       for k, v in self.params.items()}
        self.buffers = {k: v[index] for k, v in self.buffers.items()}


# ----------------------------------------------------------------------------- optimizer state

def _is_stacked(value, param: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.shape == param.shape and value.dim() > 0


def member_optimizer_state(state: dict, params: list[torch.Tensor], m: int) -> dict:
    """Member m's slice of a stacked optimizer's state_dict: what its own optimizer would hold."""
    per_param = {i: {k: v[m].clone() if _is_stacked(v, params[i]) else copy.deepcopy(v)
                     for k, v in s.items()} for i, s in state["state"].items()}
    return {"state": per_param, "param_groups": copy.deepcopy(state["param_groups"])}


def stack_optimizer_states(states: list[dict], params: list[torch.Tensor]) -> dict:
    """The inverse of member_optimizer_state: N members' optimizer states as one over the stack."""
    merged = {}
    for i in states[0]["state"]:
        merged[i] = {k: torch.stack([s["state"][i][k] for s in states])
                     if _is_stacked(v, params[i][0]) else v
                     for k, v in states[0]["state"][i].items()}
    return {"state": merged, "param_groups": states[0]["param_groups"]}


def clip_per_member(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """nn.utils.clip_grad_norm_ for each member's slice of the stacked gradients; returns the norms."""
    grads = [p.grad for p in params if p.grad is not None]
    # per parameter and member, then over each member's parameters: (P, N) -> (N,)
    norms = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads]), dim=0)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s formula
    for g in grads:
        g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))
    return norms


# ----------------------------------------------------------------------------- one epoch

def stacked_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int,
                    generators: list[torch.Generator]):
    """Each member's own shuffled, augmented batches, exactly as `fit` draws them, stacked on dim 0."""
    for pairs in zip(*(batches(x, y, batch_size, generator=g, augment=True) for g in generators)):
        inputs, targets = zip(*pairs)
        yield torch.stack(inputs), torch.stack(targets)


def train_stack_epoch(stack: Stack, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                      y: torch.Tensor, *, batch_size: int, generators: list[torch.Generator],
                      rngs: list[torch.Generator], grad_clip: float | None = None,
                      precision: Precision = Precision(), loops: list[MemberLoop] = (),
                      desc: str = "train") -> dict:
    """loop.train_one_epoch for every member at once; per-member mean data loss and accuracy.
    Member m draws its data order from generators[m] and its dropout from rngs[m]; the
    callbacks of `loops` (one per member) see its own batch and loss at every step, as alone."""
    device = x.device
    total_loss = torch.zeros(stack.size, device=device)
    correct = torch.zeros(stack.size, device=device, dtype=torch.long)
    seen = 0
    first_loss = None
    params = list(stack.params.values())
    progress = Progress(desc, min(len(y), num_batches(len(y), batch_size, train=True) * batch_size))
    for inputs, targets in stacked_batches(x, y, batch_size, generators):
        for m, loop in enumerate(loops):
            loop.call("before_step", inputs[m], targets[m])
        with precision.autocast(device):
            objective, loss, logits = stack.train_forward(inputs, targets, rngs)
        optimizer.zero_grad(set_to_none=True)
        # Members share no weights, so the gradient of the sum is each member's own gradient.
        objective.sum().backward()
        if grad_clip:
            clip_per_member(params, grad_clip)
        try:
            optimizer.step()
        except RuntimeError as err:  # as alone: a finite but huge update overflows the weights
            if "overflow" not in str(err):
                raise
            # Members of a group differ only in their seed, so the step overflows for each.
            raise Diverged(f"the optimizer step overflowed ({err})") from None
        loss = loss.detach()
        if first_loss is None:
            first_loss = loss
        total_loss += loss * targets.shape[1]
        correct += (logits.argmax(-1) == targets).sum(1)
        seen += targets.shape[1]
        for m, loop in enumerate(loops):
            loop.call("after_step", loss[m])
        progress.step(seen, total_loss)  # the members' mean, only when a line is due
    return {"loss": (total_loss / seen).tolist(), "first_loss": first_loss.tolist(),
            "acc": (correct / seen).tolist(), "images": seen}


# ----------------------------------------------------------------------------- what can be fused

def optimizer_acts_per_member(make_optimizer) -> bool:
    """Whether one optimizer over stacked tensors equals one optimizer per member.

    Three steps on small tensors, with gradients of very different scale per member: an
    element-wise rule (Adam, SGD, sign-SGD) gives the same numbers; a rule with per-tensor
    statistics (Adafactor's factored moments, LARS's trust ratio) does not.
    """
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (3,)]
    alone = [[torch.randn(s, generator=g).requires_grad_() for s in shapes] for _ in range(2)]
    stacked = [torch.stack([ps[i].detach() for ps in alone]).requires_grad_()
               for i in range(len(shapes))]
    try:
        optimizers = [make_optimizer(ps) for ps in alone]
        fused = make_optimizer(stacked)
        for _ in range(3):
            grads = [[torch.randn(s, generator=g) * scale for s in shapes] for scale in (0.01, 10.0)]
            for ps, gs, opt in zip(alone, grads, optimizers):
                for p, grad in zip(ps, gs):
                    p.grad = grad.clone()
                opt.step()
            for i, p in enumerate(stacked):
                p.grad = torch.stack([gs[i] for gs in grads])
            fused.step()
    except Exception as err:  # e.g. an optimizer that needs a closure
        log.debug("optimizer check failed: %s", err)
        return False
    return all(torch.allclose(stacked[i][m], alone[m][i], rtol=1e-5, atol=1e-7)
               for m in range(2) for i in range(len(shapes)))


def fusable(cfg: DictConfig) -> str | None:
    """Why jobs of this config cannot train as one stack (None when they can)."""
    from ablate.compose import build, pick_device

    if cfg.get("swa") and cfg.swa.get("start_epoch") is not None:
        return "SWA averages and re-normalises one model"
    if cfg.get("probe"):
        return "the probe perturbs one model's weights"
    if cfg.get("compile"):
        return "compile=true"
    try:
        precision = pick_precision(cfg.precision, pick_device(cfg.device))
    except Exception as err:  # let the single run report it
        return f"{type(err).__name__}: {err}"
    if precision.scaler is not None:
        return "fp16 loss scaling skips every member's step when one member overflows"
    try:
        if not optimizer_acts_per_member(lambda ps: build(cfg, "optim", ps)):
            return f"{cfg.optim._target_} over stacked tensors differs from one per member"
        probe = torch.zeros(1, requires_grad=True)
        scheduler = build(cfg, "sched", build(cfg, "optim", [probe]))
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            return "the plateau scheduler follows each member's own loss"
        # Two members through one forward: vmap raises on any random op but nn.Dropout.
        models = [build(cfg, "model") for _ in range(2)]
        stack = Stack(models, build(cfg, "loss"))
        rngs = [torch.Generator().manual_seed(i) for i in range(2)]
        stack.train_forward(torch.zeros(2, 2, 3, 32, 32), torch.zeros(2, 2, dtype=torch.long), rngs)
    except Exception as err:
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return None


# ----------------------------------------------------------------------------- a group of runs

@dataclass(eq=False)
class MemberLoop(Loop):
    """A member of the stack as its callbacks see it: a run of its own, whose weights, gradients,
    optimizer state and dropout stream are its slices of the stack's."""

    fused: Fused | None = None
    rng: torch.Generator | None = None  # dropout: the stream a single run's global generator would be

    @property
    def index(self) -> int:
        return next(m for m, loop in enumerate(self.fused.loops) if loop is self)

    @property
    def model(self) -> nn.Module | None:
        """A copy of this member's model as it is now, in eval mode: its weights live in the
        stack, so reading them works as alone, while changing the copy trains nothing."""
        if self.fused is None:
            return None
        stack = self.fused.stack
        copy_ = copy.deepcopy(stack.template).to_empty(device=next(iter(stack.params.values())).device)
        copy_.load_state_dict(self.weights())
        return copy_.eval()

    @model.setter
    def model(self, value) -> None:
        """Loop's constructor sets it; a member has no model of its own (see the getter)."""

    @contextlib.contextmanager
    def blamed(self):
        """An exception of this member's callbacks names the member: the group stops, and only
        this member's record says failed (train_stack)."""
        try:
            yield
        except Exception as err:
            err.member = self.run_dir
            raise

    def call(self, hook: str, *args) -> None:
        with self.blamed():
            super().call(hook, *args)

    def end_epoch(self, row: dict) -> None:
        with self.blamed():
            super().end_epoch(row)

    def weights(self) -> dict[str, torch.Tensor]:
        return self.fused.stack.state_dict(self.index)

    def gradients(self) -> list[torch.Tensor]:
        m = self.index
        return [p.grad[m] for p in self.fused.stack.params.values() if p.grad is not None]

    def optimizer_state(self) -> dict:
        return member_optimizer_state(self.recipe.optimizer.state_dict(),
                                      list(self.fused.stack.params.values()), self.index)

    def rng_states(self) -> dict:
        cpu = self.rng.device.type == "cpu"
        return {"rng_cpu": self.rng.get_state() if cpu else torch.get_rng_state(),
                "rng_cuda": None if cpu else self.rng.get_state()}

    def load_training(self, ckpt: dict) -> None:
        """Nothing: train_stack built the stack and its optimizer from the members' checkpoints."""

    def load_rng_states(self, ckpt: dict) -> None:
        saved = ckpt["rng_cpu"] if self.rng.device.type == "cpu" else ckpt.get("rng_cuda")
        if saved is not None:
            self.rng.set_state(saved)


class Fused:
    """What `loop.fit` trains for a fused group: the stack, one optimizer over it, the members."""

    def __init__(self, stack: Stack, recipe: Recipe):
        self.stack, self.recipe = stack, recipe
        self.loops: list[MemberLoop] = []

    def train_epoch(self, loops: list[MemberLoop], desc: str) -> list[dict]:
        data, r = loops[0].data, self.recipe
        out = train_stack_epoch(self.stack, r.optimizer, data.train_x, data.train_y,
                                batch_size=r.batch_size, generators=[m.generator for m in loops],
                                rngs=[m.rng for m in loops], grad_clip=r.grad_clip,
                                precision=r.precision, loops=loops, desc=desc)
        return [{"loss": out["loss"][m], "first_loss": out["first_loss"][m], "acc": out["acc"][m],
                 "images": out["images"]} for m in range(len(loops))]

    def finite(self) -> list[bool]:
        return self.stack.finite_members()

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
        return self.stack.evaluate(x, y, precision=self.recipe.precision)

    def drop(self, keep: list[int]) -> None:
        """Drop the other members: the stack and the optimizer's state keep the survivors' slices
        (the optimizer and its scheduler go on as they were)."""
        old = list(self.stack.params.values())
        self.stack.keep(keep)
        self.loops = [self.loops[m] for m in keep]
        new = dict(zip(map(id, old), self.stack.params.values()))
        optimizer = self.recipe.optimizer
        index = torch.tensor(keep, dtype=torch.long)
        kept = {new[id(p)]: {k: v[index.to(v.device)] if _is_stacked(v, p) else v for k, v in s.items()}
                for p, s in optimizer.state.items()}
        optimizer.state.clear()
        optimizer.state.update(kept)
        for group in optimizer.param_groups:
            group["params"] = [new[id(p)] for p in group["params"]]


def run_group(jobs: list[Job]) -> list[str]:
    """Train jobs whose configs differ only in `seed`; each ends as if it had run alone.

    Completed jobs are skipped; unfinished ones resume from their checkpoints, and those at
    the same epoch train together (a job alone at its epoch runs through train.run). The
    folders must be accepted and held (ablate.folder), as for train.run. Returns each job's
    outcome: skipped, completed, diverged or failed.
    """
    from ablate.compose import Interrupted, finished_record, read_record, record_failure, run
    from ablate.validation import ConfigError, validate

    outcomes = ["failed"] * len(jobs)
    waiting: dict[int, list[tuple[int, dict | None]]] = {}  # epoch -> (job, checkpoint) there
    for i, job in enumerate(jobs):
        try:
            validate(job.cfg)
            done = finished_record(job.run_dir)
        except ConfigError as err:
            log.error("%s: %s", job.run_dir, err)
            record_failure(job, err)
            continue
        if done is not None:
            log.info("%s is already completed (test acc %.4f); skipping", job.run_dir,
                     done.final_test_acc)
            outcomes[i] = "skipped"
            continue
        ckpt = load_checkpoint(job.run_dir)
        waiting.setdefault(ckpt["state"]["epoch"] if ckpt else 0, []).append((i, ckpt))
    for epoch, group in sorted(waiting.items()):
        try:
            if len(group) == 1:
                job = jobs[group[0][0]]
                log.info("%s: alone at epoch %d; training it unfused", job.run_dir, epoch)
                records = [run(job.cfg, job.run_dir, job.choices, job.overrides, job.job_num, job.sweep)]
            else:
                records = train_stack([jobs[i] for i, _ in group], [ckpt for _, ckpt in group])
        except Interrupted:
            raise
        except WriteError as err:  # disk full or read-only: one line, the records say whose file
            log.error("training %s stopped: %s", ", ".join(str(jobs[i].run_dir) for i, _ in group), err)
            continue
        except Exception as err:  # the records say failed; the group's other jobs go on
            log.exception("training %s failed", ", ".join(str(jobs[i].run_dir) for i, _ in group))
            for i, _ in group:
                record_failure(jobs[i], err)
                record = read_record(jobs[i].run_dir)  # failed, or stopped with the group
                outcomes[i] = "failed" if record is None or record.status != "interrupted" else "interrupted"
            continue
        for (i, _), record in zip(group, records):
            outcomes[i] = record.status
    return outcomes


def train_stack(jobs: list[Job], ckpts: list[dict | None]) -> list[RunRecord]:
    """Build N members from their configs, fit them as one stack through `loop.fit` (each with
    the callbacks of its run alone), write N records."""
    from ablate.compose import (Interrupted, build, build_callbacks, build_data, describe, describe_data,
                                pick_device, set_up, splits_text, start_record)

    cfg = jobs[0].cfg
    device = pick_device(cfg.device, jobs[0].job_num)
    set_up(cfg, device)
    precision = pick_precision(cfg.precision, device)
    records = [start_record(job, device, precision.name) for job in jobs]
    loops: list[MemberLoop] = []
    try:
        data, fingerprint = build_data(cfg, device)  # the same images for every seed (fixed split seed)
        models, rngs = [], []
        for job, ckpt in zip(jobs, ckpts):
            torch.manual_seed(job.cfg.seed)  # as train.run: the model's init comes from the seed
            model = build(job.cfg, "model")
            rng = torch.Generator(device=device)
            if device.type == "cpu":  # dropout then continues the seed's stream, as alone
                rng.set_state(torch.get_rng_state())
            else:
                rng.manual_seed(job.cfg.seed)
            if ckpt is not None:
                model.load_state_dict(ckpt["model"])
            models.append(model.to(device))
            rngs.append(rng)
        loss_fn = build(cfg, "loss").to(device)
        stack = Stack(models, loss_fn, l1_lambda=cfg.l1_lambda)
        del models
        params = list(stack.params.values())
        optimizer = build(cfg, "optim", params)
        schedule = Schedule(build(cfg, "sched", optimizer))
        if ckpts[0] is not None:  # all members of a group stopped at the same epoch
            optimizer.load_state_dict(stack_optimizer_states([c["optimizer"] for c in ckpts], params))
        recipe = Recipe(loss_fn, optimizer, cfg.batch_size, cfg.l1_lambda, cfg.grad_clip, precision)
        fused = Fused(stack, recipe)
        for job, record, rng in zip(jobs, records, rngs):
            describe_data(record, data, fingerprint, sum(p[0].numel() for p in params))
            record.extra["fused_members"] = len(jobs)
            loops.append(MemberLoop(None, data, recipe, job.run_dir, record,
                                    build_callbacks(job.cfg, job.run_dir, None, recipe, schedule),
                                    torch.Generator(device=device).manual_seed(job.cfg.seed),
                                    fused=fused, rng=rng))
        fused.loops = list(loops)
        log.info("fused %d seeds (%s) | %s | %d params each | %s | %s, %s", len(jobs),
                 ", ".join(str(job.cfg.seed) for job in jobs), describe(records[0]).rsplit(" seed=", 1)[0],
                 records[0].params, splits_text(data), device, precision.name)
        for loop in fit(fused, loops, epochs=cfg.epochs, resumes=ckpts):
            loop.record.status = "completed"
            if cfg.save_weights:
                loop.record.weights_file = link_seed_name(
                    loop.run_dir, stack.template, loss_fn, optimizer, schedule.scheduler, loop.record.test_acc_at_best_val or loop.record.best_test_acc)
    except Interrupted as err:
        for record in records:
            if record.status == "running":
                record.status, record.error = "interrupted", f"stopped by {err}; re-run to resume"
        raise
    except Exception as err:
        culprit = getattr(err, "member", None)  # a member's callback raised (MemberLoop)
        for job, record in zip(jobs, records):
            if record.status != "running":
                continue
            record.status, record.error = "failed", f"{type(err).__name__}: {err}"
            if isinstance(err, WriteError):  # one member's file (disk full) stops the group
                record.error = str(err) if str(job.run_dir) in str(err) else \
                    f"stopped with its fused group: {err}"
            elif culprit is not None and culprit != job.run_dir:  # resumable: nothing wrong here
                record.status = "interrupted"
                record.error = (f"stopped with its fused group when a callback of {culprit} raised "
                                f"{type(err).__name__}: {err}; re-run to resume")
        raise
    finally:
        for job, record in zip(jobs, records):  # a diverged one's clock stopped when it left
            try:
                record.save(job.run_dir)
            except WriteError as err:  # its last good record stays on disk
                log.error("%s", err)
        for loop in loops:
            for callback in loop.callbacks.values():
                callback.on_run_end(loop.record)  # trackers end their runs with the final status
    for loop in loops:
        if loop.record.status == "completed":  # with the completed record safely on disk
            save_finished(loop.run_dir, identity=loop.record.config_hash, state=loop.state,
                          record=loop.record)
    return records
