"""Training throughput: the plain PyTorch pipeline vs this project's loop, N runs at once, N fused seeds.

    python benchmarks/throughput.py --device cuda                      # seed CNN, 50k synthetic images
    python benchmarks/throughput.py --device cpu --images 3000 --filters 16,32,64
    python benchmarks/throughput.py --device cuda --no-plain --concurrency '' --fused 1,2,4,8

Prints markdown tables (and writes --json). Imports no Hydra, so it runs on a machine that has
only torch and torchvision. Each measurement times whole epochs after untimed warm-up epochs
(DataLoader workers starting, cuDNN autotuning, torch.compile), with the device synchronised.
"""
from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import platform
import sys
import time
import traceback
from pathlib import Path

# Run as a script from anywhere: the repository root holds `ablate` and `benchmarks`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from ablate.data import ImageData, load_cifar10, make_synthetic  # noqa: E402
from ablate.fused import Stack, train_stack_epoch  # noqa: E402
from ablate.loop import evaluate, pick_precision, train_one_epoch  # noqa: E402
from ablate.models import CNN, ResNet  # noqa: E402
from benchmarks import plain  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="cnn", choices=("cnn", "resnet18"))
    p.add_argument("--filters", default="64,128,256", help="the CNN's conv widths")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--images", type=int, default=50_000, help="training images per epoch")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs before the timed ones")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader workers of the plain pipeline")
    p.add_argument("--precision", default="auto", help="the project loop's precision (auto|bf16|fp16|fp32)")
    p.add_argument("--compile", action="store_true", help="also measure the project loop with torch.compile")
    p.add_argument("--concurrency", default="1,2,4,8", help="numbers of simultaneous runs ('' skips)")
    p.add_argument("--fused", default="1,2,4,8",
                   help="numbers of seeds trained as one stacked model, ablate/fused.py ('' skips)")
    p.add_argument("--no-plain", action="store_true",
                   help="skip the plain PyTorch pipeline (the project loop is always measured)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per training process (default: torch's own for the "
                        "pipelines, cores / runs for concurrent runs)")
    p.add_argument("--root", default=None, help="real CIFAR-10 (as data.root) instead of synthetic data")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- set-up

def load_data(args) -> ImageData:
    if args.root:
        return load_cifar10(args.root, download=False,
                            train_size=args.images if args.images < 50_000 else None, test_size=2000)
    return make_synthetic(train_size=args.images, test_size=1000, seed=args.seed)


def build_model(args, seed: int | None = None) -> nn.Module:
    """The seed CNN as conf/model/cnn.yaml builds it, or the CIFAR ResNet-18 (ReLU)."""
    torch.manual_seed(args.seed if seed is None else seed)
    if args.model == "cnn":
        activation = functools.partial(nn.LeakyReLU, negative_slope=0.1)
        return CNN(activation, filters=[int(f) for f in args.filters.split(",")])
    return ResNet(nn.ReLU)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)  # conf/optim/adam.yaml


def timed_epochs(one_epoch, args, device) -> dict:
    """Run warm-up then timed epochs of `one_epoch() -> images`; seconds are per timed epoch."""
    start = time.perf_counter()
    for _ in range(args.warmup):
        one_epoch()
    sync(device)
    warmup_s = time.perf_counter() - start
    images, start = 0, time.perf_counter()
    for _ in range(args.epochs):
        images += one_epoch()
    sync(device)
    seconds = time.perf_counter() - start
    return {"images_per_epoch": images // args.epochs, "warmup_s": warmup_s,
            "s_per_epoch": seconds / args.epochs, "images_per_s": images / seconds}


# ----------------------------------------------------------------------------- the two pipelines

def measure_plain(args, data: ImageData, device: torch.device) -> dict:
    """torchvision-style loader with PIL transforms and workers, eager fp32 model."""
    model = build_model(args).to(device)
    optimizer, loss_fn = adam(model), nn.CrossEntropyLoss()
    train = plain.make_loader(data.train_x, data.train_y, batch_size=args.batch_size,
                              workers=args.workers, train=True, device=device, seed=args.seed)
    result = timed_epochs(lambda: plain.train_epoch(model, train, loss_fn=loss_fn, optimizer=optimizer,
                                                    device=device)["images"], args, device)
    test = plain.make_loader(data.test_x, data.test_y, batch_size=1024, workers=0, train=False,
                             device=device)
    return {"pipeline": f"plain PyTorch (PIL + DataLoader x{args.workers}, fp32)", **result,
            "test_acc": plain.accuracy(model, test, device)}


def project_run(args, data: ImageData, device: torch.device, compile: bool = False):
    """This project's training set-up; returns (one_epoch() -> images, test_acc() -> float, label)."""
    data = data.to(device)
    precision = pick_precision(args.precision, device)
    model = build_model(args).to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()
    optimizer, loss_fn = adam(model), nn.CrossEntropyLoss()
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def one_epoch() -> int:
        return train_one_epoch(model, data.train_x, data.train_y, loss_fn=loss_fn, optimizer=optimizer,
                               batch_size=args.batch_size, generator=generator,
                               precision=precision, desc="bench")["images"]

    def test_acc() -> float:
        return evaluate(model, data.test_x, data.test_y, loss_fn=loss_fn, precision=precision)["acc"]

    dtype = str(precision.autocast_dtype or torch.float32).removeprefix("torch.")
    label = f"this project ({dtype}{', channels_last' if precision.channels_last else ''}" \
            f"{', compiled' if compile else ''})"
    return one_epoch, test_acc, label


def measure_project(args, data: ImageData, device: torch.device, compile: bool = False) -> dict:
    """train_one_epoch on device-resident uint8 data with pick_precision's settings."""
    one_epoch, test_acc, label = project_run(args, data, device, compile)
    result = timed_epochs(one_epoch, args, device)
    return {"pipeline": label, **result, "test_acc": test_acc()}


# ----------------------------------------------------------------------------- concurrent runs

def concurrent_run(args, rank: int, threads: int, barrier, results) -> None:
    """One of N simultaneous runs: set up, warm up, wait for the others, then time its epochs."""
    try:
        torch.set_num_threads(threads)
        device = torch.device(args.device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        args.seed += rank  # different runs, as in a sweep
        one_epoch, _, _ = project_run(args, load_data(args), device)
        for _ in range(args.warmup):
            one_epoch()
        sync(device)
        barrier.wait(timeout=1800)
        start, images = time.time(), 0  # wall clock: comparable across processes
        for _ in range(args.epochs):
            images += one_epoch()
        sync(device)
        results.put({"rank": rank, "images": images, "start": start, "end": time.time()})
    except BaseException:
        barrier.abort()  # do not leave the other runs waiting
        results.put({"rank": rank, "error": traceback.format_exc()})


def measure_concurrent(args, n: int) -> dict:
    """Aggregate throughput of n processes training at once: all their images / wall time."""
    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    threads = args.threads or max(1, (os.cpu_count() or 1) // n)
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=concurrent_run, args=(args, rank, threads, barrier, results))
             for rank in range(n)]
    for p in procs:
        p.start()
    runs = [results.get() for _ in range(n)]
    for p in procs:
        p.join()
    failed = [r["error"] for r in runs if "error" in r]
    if failed:
        raise RuntimeError(f"{len(failed)} of {n} concurrent runs failed; the first:\n{failed[0]}")
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    per_run = [r["images"] / (r["end"] - r["start"]) for r in runs]
    return {"runs": n, "threads_per_run": threads, "wall_s": wall,
            "aggregate_images_per_s": sum(r["images"] for r in runs) / wall,
            "mean_run_images_per_s": sum(per_run) / n}


# ----------------------------------------------------------------------------- fused seeds

def measure_fused(args, data: ImageData, device: torch.device, n: int) -> dict:
    """n seeds as one stacked model (what hydra/launcher=fused trains): all members' images/s.

    Each member has its own data order, augmentation and dropout stream, as in a sweep; the
    same Adam, loss and precision as the project loop (but not channels_last).
    """
    data = data.to(device)
    precision = pick_precision(args.precision, device)
    seeds = [args.seed + k for k in range(n)]
    stack = Stack([build_model(args, seed).to(device) for seed in seeds], nn.CrossEntropyLoss())
    optimizer = torch.optim.Adam(list(stack.params.values()), lr=1e-3, weight_decay=1e-4)
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    rngs = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]

    def one_epoch() -> int:
        return n * train_stack_epoch(stack, optimizer, data.train_x, data.train_y,
                                     batch_size=args.batch_size, generators=generators,
                                     rngs=rngs, precision=precision)["images"]

    result = timed_epochs(one_epoch, args, device)
    test_acc = sum(r["acc"] for r in stack.evaluate(data.test_x, data.test_y,
                                                    precision=precision)) / n
    return {"members": n, "aggregate_images_per_s": result["images_per_s"],
            "s_per_epoch": result["s_per_epoch"], "warmup_s": result["warmup_s"],
            "mean_test_acc": test_acc}


# ----------------------------------------------------------------------------- report

def markdown(rows: list[dict], columns: dict[str, str]) -> str:
    """A markdown table of `rows`, one column per key of `columns` (key -> header)."""
    def cell(v):
        return f"{v:,.3g}" if isinstance(v, float) and abs(v) < 100 else \
            f"{v:,.0f}" if isinstance(v, (int, float)) else str(v)
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[k]) for k in columns) + " |" for r in rows]
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return f"{what}, torch {torch.__version__}"


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as ablate/train.py does on CUDA
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_data(args)
    print(f"machine: {machine(device)}\nmodel: {args.model} filters={args.filters}, batch "
          f"{args.batch_size}, {len(data.train_y)} {data.source} training images, {args.warmup} "
          f"warm-up + {args.epochs} timed epochs, {torch.get_num_threads()} CPU threads\n")

    pipelines = [] if args.no_plain else [measure_plain(args, data, device)]
    pipelines.append(measure_project(args, data, device))
    if args.compile:
        pipelines.append(measure_project(args, data, device, compile=True))
    for row in pipelines:
        row["speedup"] = row["images_per_s"] / pipelines[0]["images_per_s"]
        row["s_per_50k"] = 50_000 / row["images_per_s"]
    print(markdown(pipelines, {"pipeline": "pipeline", "images_per_s": "images/s",
                               "s_per_epoch": f"s/epoch ({pipelines[0]['images_per_epoch']} images)",
                               "s_per_50k": "s per 50k images", "warmup_s": "warm-up s",
                               "test_acc": "test acc",
                               "speedup": "× eager" if args.no_plain else "× plain"}))

    alone = pipelines[-1 if not args.compile else -2]  # the project loop, eager
    fused = []
    for n in [int(c) for c in args.fused.split(",") if c.strip()]:
        fused.append(measure_fused(args, data, device, n))
        # n separate runs one after another train at one run's rate, whatever n is
        fused[-1]["vs_separate"] = fused[-1]["aggregate_images_per_s"] / alone["images_per_s"]
    if fused:
        print(f"\nfused seeds on {device} (one stacked model of N members, ablate/fused.py; "
              f"aggregate = all members' images / time; N separate runs one after another "
              f"train at {alone['images_per_s']:,.0f} images/s, the project loop's rate):\n")
        print(markdown(fused, {"members": "members", "aggregate_images_per_s": "aggregate images/s",
                               "s_per_epoch": "s per epoch (all members)",
                               "warmup_s": "warm-up s", "mean_test_acc": "mean test acc",
                               "vs_separate": "× N separate runs"}))

    concurrent = []
    for n in [int(c) for c in args.concurrency.split(",") if c.strip()]:
        concurrent.append(measure_concurrent(args, n))
        concurrent[-1]["speedup"] = concurrent[-1]["aggregate_images_per_s"] / \
            concurrent[0]["aggregate_images_per_s"]
    if concurrent:
        print(f"\nconcurrent runs of this project's loop on {device} (each {args.warmup} warm-up + "
              f"{args.epochs} timed epochs; aggregate = all runs' images / wall time):\n")
        print(markdown(concurrent, {"runs": "runs", "threads_per_run": "CPU threads/run",
                                    "aggregate_images_per_s": "aggregate images/s",
                                    "mean_run_images_per_s": "images/s per run", "wall_s": "wall s",
                                    "speedup": f"× {concurrent[0]['runs']} run(s)"}))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(device), "args": vars(args),
                                               "pipelines": pipelines, "concurrent": concurrent,
                                               "fused": fused},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
