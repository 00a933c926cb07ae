"""Where bf16 autocast touches a run, and how far it moves what the run trains and reports.

    python benchmarks/bf16_audit.py +experiment=best data.root=/path/to/cifar10-jpeg \
        --weights /path/to/run/best_model.pth

The arguments after the flags are the run's overrides, as train.py takes them; `--weights` is a
run's `best_model.pth` (or `checkpoint.pt`), else the model is the seed's fresh one. On the
run's model and data, on this CPU, it prints three things:

1. dtypes: what each kind of module takes in and gives out under the loop's bf16 autocast, and
   the dtypes of the loss, the parameters' gradients and the optimizer's state, through the
   loop's own step (`Precision.forward`).
2. gradients: for `--batches` training batches, how far each parameter's bf16 gradient is from
   its fp32 gradient of the same batch (relative L2 error), beside how far the fp32 gradient of
   the next batch is from this one (the noise minibatch SGD trains with anyway). Dropout is off
   for this part, so both precisions see the same network; BatchNorm uses batch statistics.
3. evaluation: test accuracy of the same weights evaluated in fp32 and in bf16, and how many
   test images the two precisions label differently.
"""
from __future__ import annotations

import argparse
import copy
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ablate.compose import build, build_data  # noqa: E402
from ablate.data import batches  # noqa: E402
from ablate.loop import pick_precision  # noqa: E402


def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return saved["model"] if "model" in saved and isinstance(saved["model"], dict) else saved


def dtypes(model: nn.Module, inputs, targets, loss_fn, precision) -> list[tuple[str, str, str]]:
    """(module kind, input dtypes, output dtypes) of every leaf module in one training step,
    then the loss, the gradients and one optimizer step's state."""
    seen: dict[str, tuple[set, set]] = defaultdict(lambda: (set(), set()))

    def hook(module, args, output):
        kind = type(module).__name__
        seen[kind][0].update(str(a.dtype).removeprefix("torch.") for a in args if torch.is_tensor(a))
        seen[kind][1].add(str(output.dtype).removeprefix("torch."))

    model = copy.deepcopy(model).train()
    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    logits, loss = precision.forward(model, inputs, targets, loss_fn)
    for h in handles:
        h.remove()
    loss.backward()
    optimizer = torch.optim.Adam(model.parameters())
    optimizer.step()
    state = {str(v.dtype).removeprefix("torch.") for s in optimizer.state.values()
             for v in s.values() if torch.is_tensor(v) and v.is_floating_point()}
    grads = {str(p.grad.dtype).removeprefix("torch.") for p in model.parameters()}
    rows = [(kind, ", ".join(sorted(i)), ", ".join(sorted(o))) for kind, (i, o) in seen.items()]
    rows += [("logits (model output)", "", str(logits.dtype).removeprefix("torch.")),
             ("loss (on logits.float())", "float32", str(loss.dtype).removeprefix("torch.")),
             ("parameters' .grad", "", ", ".join(sorted(grads))),
             ("Adam state (exp_avg, exp_avg_sq)", "", ", ".join(sorted(state)))]
    return rows


ALL = "(all parameters)"


def gradient(model: nn.Module, inputs, targets, loss_fn, precision) -> tuple[dict, float]:
    """Each parameter's gradient on one batch (and all of them as one vector), and the loss."""
    model.zero_grad(set_to_none=True)
    _, loss = precision.forward(model, inputs, targets, loss_fn)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    grads[ALL] = torch.cat([g.flatten() for g in grads.values()])
    return grads, loss.item()


def median(values: list[float]) -> float:
    return torch.tensor(values).median().item()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||"""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def gradients(model: nn.Module, data, loss_fn, fp32, bf16, n: int, batch_size: int):
    """Per parameter (and for all as one vector): the fp32 gradient's norm; the median over n
    batches of the bf16-vs-fp32 error and of the fp32 gradient's change from the batch before;
    and how much of the bf16 error persists from batch to batch, so that the steps add it up:
    ||sum of the errors|| / sqrt(sum of ||error||^2), 1 when the errors are independent
    (they average away) and sqrt(n) when every batch has the same one.
    Also the median gap between the two precisions' losses."""
    model = copy.deepcopy(model).train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()  # off: the two precisions would draw different masks
    state = copy.deepcopy(model.state_dict())  # BatchNorm's running statistics move each forward
    names = [name for name, _ in model.named_parameters()] + [ALL]
    errors, noise, loss_gap = defaultdict(list), defaultdict(list), []
    summed, squares, norm32 = {}, {}, defaultdict(list)
    stream = batches(data.train_x, data.train_y, batch_size,
                     generator=torch.Generator().manual_seed(0), augment=True)
    previous = None
    for _, (inputs, targets) in zip(range(n + 1), stream):
        model.load_state_dict(state)
        g32, l32 = gradient(model, inputs, targets, loss_fn, fp32)
        model.load_state_dict(state)
        g16, l16 = gradient(model, inputs, targets, loss_fn, bf16)
        if previous is None:  # batch 0 only gives batch 1 its "batch before"
            previous = g32
            continue
        for name in names:
            errors[name].append(rel(g16[name], g32[name]))
            noise[name].append(rel(g32[name], previous[name]))
            norm32[name].append(g32[name].norm().item())
            error = g16[name] - g32[name]
            summed[name] = summed.get(name, 0) + error
            squares[name] = squares.get(name, 0) + error.norm().item() ** 2
        loss_gap.append(abs(l16 - l32))
        previous = g32
    # errors independent from batch to batch: ||sum|| ~ sqrt(sum of ||e||^2); the same every batch: n x it
    persistence = {name: summed[name].norm().item() / max(squares[name], 1e-300) ** 0.5 for name in names}
    return {name: (median(norm32[name]), median(errors[name]), median(noise[name]), persistence[name])
            for name in names}, median(loss_gap)


@torch.no_grad()
def predictions(model: nn.Module, x, y, precision) -> torch.Tensor:
    model.eval()
    out = []
    for inputs, _ in batches(x, y, 1000):
        with precision.autocast(x.device):
            out.append(model(precision.prepare(inputs)).argmax(1))
    return torch.cat(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, help="best_model.pth or checkpoint.pt of the run")
    p.add_argument("--batches", type=int, default=8, help="training batches for the gradients")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    cfg = compose_config(args.overrides)
    torch.manual_seed(cfg.seed)
    data, _ = build_data(cfg, cpu)
    model = build(cfg, "model")
    if args.weights:
        model.load_state_dict(load_weights(args.weights))
    loss_fn = build(cfg, "loss")
    fp32, bf16 = pick_precision("fp32", cpu), pick_precision("bf16", cpu)
    model = model.to(memory_format=torch.channels_last)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{'weights ' + str(args.weights) if args.weights else 'fresh weights (seed ' + str(cfg.seed) + ')'}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    inputs, targets = next(batches(data.train_x, data.train_y, cfg.batch_size,
                                   generator=torch.Generator().manual_seed(0), augment=True))
    print("\n## 1. dtypes in one training step under bf16 autocast\n")
    print("| module or value | input | output |\n|---|---|---|")
    for kind, i, o in dtypes(model, inputs, targets, loss_fn, bf16):
        print(f"| {kind} | {i} | {o} |")

    print(f"\n## 2. gradients: median over {args.batches} batches of {cfg.batch_size}\n")
    table, loss_gap = gradients(model, data, loss_fn, fp32, bf16, args.batches, cfg.batch_size)
    print("Errors are relative L2 (||a - b|| / ||b||). A parameter whose fp32 gradient is ~1e-6 of the")
    print("others' (a bias right before BatchNorm, which the batch mean cancels) has a true gradient of 0:")
    print("its relative errors are rounding over rounding.\n")
    print("| parameter | fp32 gradient norm | bf16 vs fp32, same batch | fp32, this batch vs the one before "
          f"| persistence of the bf16 error (1 = averages away, {args.batches ** 0.5:.1f} = the same every batch) |"
          "\n|---|---|---|---|---|")
    for name, (norm, err, batch_noise, mean_err) in table.items():
        print(f"| {name} | {norm:.2e} | {err:.2e} | {batch_noise:.2e} | {mean_err:.2f} |")
    print(f"\nloss: bf16 vs fp32 of the same batch differs by {loss_gap:.2e} (median)")

    print("\n## 3. the same weights evaluated in fp32 and in bf16\n")
    n = len(data.test_y)
    labels = {name: predictions(model, data.test_x, data.test_y, precision)
              for name, precision in (("fp32", fp32), ("bf16", bf16))}
    for name, predicted in labels.items():
        print(f"- evaluated in {name}: test accuracy {100 * (predicted == data.test_y).float().mean():.2f}%")
    differ = (labels["fp32"] != labels["bf16"]).sum().item()
    print(f"- {differ} of {n} test images ({100 * differ / n:.2f}%) are labelled differently")


if __name__ == "__main__":
    main()
