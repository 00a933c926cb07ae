"""Training throughput: the plain PyTorch pipeline vs this project's loop, N runs at once, N fused seeds.

    python benchmarks/throughput.py --device cuda                      # seed CNN, 50k synthetic images
    python benchmarks/throughput.py --device cpu --images 3000 --filters 16,32,64
    python benchmarks/throughput.py --device cuda --no-plain --concurrency '' --fused 1,2,4,8

Prints markdown tables (and writes --json). Imports no Hydra, so it runs on a machine that has
only torch and torchvision. Each measurement times whole epochs after untimed warm-up epochs
(DataLoader workers starting, cuDNN autotuning, torch.compile), with the device synchronised.

Every figure is the median of --repeats (>= 3) repetitions, shown with its spread (the
repetitions' range over the median). Pipelines, and fused stacks, are timed in turn within each
repetition (interleaved), so a machine that slows down part-way slows them all; N runs at once
repeat back to back (restarting N processes each time would cost more than the measurement). A
spread over 25% marks the figure noisy; fewer than 20 timed batches per repetition is refused
(--allow-few-batches measures it anyway, flagged).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
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

REPEATS = 3        # repetitions per figure (at least): the median is reported, the range shown
NOISY = 0.25       # a spread (max - min) / median above this marks a figure noisy
MIN_BATCHES = 20   # timed batches per repetition below which a figure is refused (or flagged)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="cnn", choices=("cnn", "resnet18"))
    p.add_argument("--filters", default="64,128,256", help="the CNN's conv widths")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--images", type=int, default=50_000, help="training images per epoch")
    p.add_argument("--epochs", type=int, default=1, help="timed epochs per repetition")
    p.add_argument("--repeats", type=int, default=REPEATS,
                   help=f"repetitions per figure, interleaved (at least {REPEATS}): the median is reported")
    p.add_argument("--allow-few-batches", action="store_true",
                   help=f"measure even with fewer than {MIN_BATCHES} timed batches per repetition (flagged)")
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
    args = p.parse_args(argv)
    if args.repeats < REPEATS:
        p.error(f"--repeats {args.repeats}: a figure needs at least {REPEATS} repetitions (median and spread)")
    batches = timed_batches(args.images, args.batch_size, args.epochs)
    if batches < MIN_BATCHES and not args.allow_few_batches:
        p.error(f"{args.images} images in batches of {args.batch_size} x {args.epochs} epoch(s) make "
                f"{batches} timed batches per repetition, fewer than {MIN_BATCHES}: too few for a "
                "figure to mean much. Raise --images or --epochs, or pass --allow-few-batches "
                "(the figures are then flagged)")
    return args


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


def timed_batches(images: int, batch_size: int, epochs: int) -> int:
    """Training steps in `epochs` epochs of `images` (a partial last batch is dropped)."""
    return epochs * (images // batch_size if images >= batch_size else 1)


def spread_stats(rates: list[float], batches: int) -> dict:
    """The median of per-repetition rates, their range, spread (range / median) and flags."""
    median = statistics.median(rates)
    spread = (max(rates) - min(rates)) / median if median > 0 else math.inf
    flags = ([f"noisy: spread {spread:.0%} > {NOISY:.0%}"] if spread > NOISY else []) + \
        ([f"few batches: {batches} < {MIN_BATCHES} timed per repetition"] if batches < MIN_BATCHES else [])
    return {"images_per_s": median, "images_per_s_min": min(rates), "images_per_s_max": max(rates),
            "repeats": len(rates), "spread": spread, "noisy": spread > NOISY,
            "timed_batches": batches, "few_batches": batches < MIN_BATCHES, "flags": flags}


def interleaved(runs: dict, args, device, step_images: dict | None = None) -> dict[str, dict]:
    """Time `runs` ({name: one_epoch() -> images}) against each other: each warms up (untimed),
    then `args.repeats` rounds time each in turn for `args.epochs` epochs. Per name: the median
    images/s with its range and flags (spread_stats), seconds per epoch (median) and warm-up.
    `step_images`: images per training step per name (default the batch size; a fused stack of
    N members trains N x batch images a step)."""
    repeats = max(getattr(args, "repeats", REPEATS), 1)
    warmup_s = {}
    for name, one_epoch in runs.items():
        start = time.perf_counter()
        for _ in range(args.warmup):
            one_epoch()
        sync(device)
        warmup_s[name] = time.perf_counter() - start
    rates, seconds, images = {n: [] for n in runs}, {n: [] for n in runs}, {}
    for _ in range(repeats):
        for name, one_epoch in runs.items():
            sync(device)
            start, done = time.perf_counter(), 0
            for _ in range(args.epochs):
                done += one_epoch()
            sync(device)
            took = time.perf_counter() - start
            rates[name].append(done / took)
            seconds[name].append(took / args.epochs)
            images[name] = done // args.epochs
    out = {}
    for name in runs:
        per_step = (step_images or {}).get(name, args.batch_size)
        batches = args.epochs * max(1, math.ceil(images[name] / per_step))
        out[name] = {"images_per_epoch": images[name], "warmup_s": warmup_s[name],
                     "s_per_epoch": statistics.median(seconds[name]), **spread_stats(rates[name], batches)}
    return out


def timed_epochs(one_epoch, args, device) -> dict:
    """One measurement alone: warm-up, then the median of `args.repeats` timed repetitions."""
    return interleaved({"run": one_epoch}, args, device)["run"]


# ----------------------------------------------------------------------------- the two pipelines

def plain_run(args, data: ImageData, device: torch.device):
    """The torchvision-style pipeline; returns (one_epoch() -> images, test_acc() -> float, label)."""
    model = build_model(args).to(device)
    optimizer, loss_fn = adam(model), nn.CrossEntropyLoss()
    train = plain.make_loader(data.train_x, data.train_y, batch_size=args.batch_size,
                              workers=args.workers, train=True, device=device, seed=args.seed)
    test = plain.make_loader(data.test_x, data.test_y, batch_size=1024, workers=0, train=False,
                             device=device)
    return (lambda: plain.train_epoch(model, train, loss_fn=loss_fn, optimizer=optimizer, device=device)["images"],
            lambda: plain.accuracy(model, test, device),
            f"plain PyTorch (PIL + DataLoader x{args.workers}, fp32)")


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


def measure_pipelines(args, data: ImageData, device: torch.device) -> list[dict]:
    """The plain pipeline (unless --no-plain), this project's loop and, with --compile, the loop
    compiled: timed in turn within each repetition."""
    made = ([] if args.no_plain else [plain_run(args, data, device)]) + [project_run(args, data, device)]
    if args.compile:
        made.append(project_run(args, data, device, compile=True))
    timings = interleaved({label: one_epoch for one_epoch, _, label in made}, args, device)
    return [{"pipeline": label, **timings[label], "test_acc": test_acc()} for _, test_acc, label in made]


def measure_plain(args, data: ImageData, device: torch.device) -> dict:
    """torchvision-style loader with PIL transforms and workers, eager fp32 model."""
    one_epoch, test_acc, label = plain_run(args, data, device)
    return {"pipeline": label, **timed_epochs(one_epoch, args, device), "test_acc": test_acc()}


def measure_project(args, data: ImageData, device: torch.device, compile: bool = False) -> dict:
    """train_one_epoch on device-resident uint8 data with pick_precision's settings."""
    one_epoch, test_acc, label = project_run(args, data, device, compile)
    result = timed_epochs(one_epoch, args, device)
    return {"pipeline": label, **result, "test_acc": test_acc()}


# ----------------------------------------------------------------------------- concurrent runs

def synchronized_reps(one_epoch, device: torch.device, *, warmup: int, repeats: int, epochs: int,
                      barrier, timeout: float) -> list[dict]:
    """A concurrent run's timing: warm up, then `repeats` times wait for the other runs at the
    barrier and time `epochs` epochs by the wall clock (comparable across processes)."""
    for _ in range(warmup):
        one_epoch()
    sync(device)
    reps = []
    for _ in range(repeats):  # all runs start each repetition together
        barrier.wait(timeout=timeout)
        start, images = time.time(), 0
        for _ in range(epochs):
            images += one_epoch()
        sync(device)
        reps.append({"images": images, "start": start, "end": time.time()})
    return reps


def concurrent_run(args, rank: int, threads: int, barrier, results) -> None:
    """One of N simultaneous runs: set up, warm up, wait for the others, then time its epochs."""
    try:
        torch.set_num_threads(threads)
        device = torch.device(args.device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        args.seed += rank  # different runs, as in a sweep
        one_epoch, _, _ = project_run(args, load_data(args), device)
        reps = synchronized_reps(one_epoch, device, warmup=args.warmup, repeats=args.repeats,
                                 epochs=args.epochs, barrier=barrier, timeout=1800)
        results.put({"rank": rank, "reps": reps})
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
    batches = timed_batches(args.images, args.batch_size, args.epochs)
    return {"runs": n, "threads_per_run": threads, **concurrent_stats([r["reps"] for r in runs], batches)}


def concurrent_stats(reps: list[list[dict]], batches: int) -> dict:
    """N runs' repetitions ({images, start, end} per run and repetition) as figures: per
    repetition the aggregate images/s (all runs' images over the wall time from the first start to
    the last end) and each run's own rate; medians over repetitions, the aggregate's spread."""
    aggregate, per_run, walls = [], [], []
    for rep in zip(*reps):
        wall = max(r["end"] for r in rep) - min(r["start"] for r in rep)
        walls.append(wall)
        aggregate.append(sum(r["images"] for r in rep) / wall)
        per_run.append(sum(r["images"] / (r["end"] - r["start"]) for r in rep) / len(rep))
    stats = spread_stats(aggregate, batches)
    return {"wall_s": statistics.median(walls), "aggregate_images_per_s": stats.pop("images_per_s"),
            "aggregate_images_per_s_min": stats.pop("images_per_s_min"),
            "aggregate_images_per_s_max": stats.pop("images_per_s_max"),
            "mean_run_images_per_s": statistics.median(per_run), **stats}


# ----------------------------------------------------------------------------- fused seeds

def fused_run(args, data: ImageData, device: torch.device, n: int):
    """n seeds as one stacked model; returns (one_epoch() -> all members' images, mean test acc)."""
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

    def test_acc() -> float:
        return sum(r["acc"] for r in stack.evaluate(data.test_x, data.test_y, precision=precision)) / n

    return one_epoch, test_acc


def fused_row(n: int, timing: dict, test_acc: float) -> dict:
    return {"members": n, "aggregate_images_per_s": timing["images_per_s"],
            **{k: timing[k] for k in ("images_per_s_min", "images_per_s_max", "repeats", "spread", "noisy",
                                      "timed_batches", "few_batches", "flags", "s_per_epoch", "warmup_s")},
            "mean_test_acc": test_acc}


def measure_fused(args, data: ImageData, device: torch.device, n: int) -> dict:
    """n seeds as one stacked model (what hydra/launcher=fused trains): all members' images/s.

    Each member has its own data order, augmentation and dropout stream, as in a sweep; the
    same Adam, loss and precision as the project loop (but not channels_last).
    """
    return measure_fused_sizes(args, data, device, [n])[0]


def measure_fused_sizes(args, data: ImageData, device: torch.device, sizes: list[int]) -> list[dict]:
    """measure_fused for each stack size, the stacks timed in turn within each repetition."""
    made = {n: fused_run(args, data, device, n) for n in sizes}
    timings = interleaved({n: one_epoch for n, (one_epoch, _) in made.items()}, args, device,
                          step_images={n: n * args.batch_size for n in sizes})
    return [fused_row(n, timings[n], test_acc()) for n, (_, test_acc) in made.items()]


# ----------------------------------------------------------------------------- report

def markdown(rows: list[dict], columns: dict[str, str]) -> str:
    """A markdown table of `rows`, one column per key of `columns` (key -> header)."""
    def cell(v):
        return f"{v:,.3g}" if isinstance(v, float) and abs(v) < 100 else \
            f"{v:,.0f}" if isinstance(v, (int, float)) else str(v)
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[k]) for k in columns) + " |" for r in rows]
    return "\n".join(lines)


def spread_text(row: dict, key: str = "images_per_s") -> str:
    """'1,020-1,110 (8%)': the repetitions' range and the spread, for a figure's table."""
    lo, hi = row.get(f"{key}_min"), row.get(f"{key}_max")
    if lo is None or hi is None:
        return "-"
    return f"{lo:,.0f}-{hi:,.0f} ({row['spread']:.0%})"


def flags_text(*rows: dict) -> str:
    """What makes a figure (or one computed from several) untrustworthy, or 'ok'."""
    flags = list(dict.fromkeys(f for r in rows for f in r.get("flags", [])))
    return "; ".join(flags) or "ok"


def shown(row: dict, key: str = "images_per_s") -> dict:
    """A row with its spread and flags as text, for markdown()."""
    return {**row, "spread_text": spread_text(row, key), "flags_text": flags_text(row)}


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
          f"warm-up epoch(s), then {args.repeats} repetitions of {args.epochs} timed epoch(s) "
          f"({timed_batches(args.images, args.batch_size, args.epochs)} batches each), "
          f"{torch.get_num_threads()} CPU threads\n"
          f"each figure: the median of the repetitions; spread: their range and (max - min) / median; "
          f"noisy: spread > {NOISY:.0%}\n")

    pipelines = measure_pipelines(args, data, device)
    for row in pipelines:
        row["speedup"] = row["images_per_s"] / pipelines[0]["images_per_s"]
        row["s_per_50k"] = 50_000 / row["images_per_s"]
        row["speedup_flags"] = flags_text(row, pipelines[0])
    print(markdown([shown(r) for r in pipelines],
                   {"pipeline": "pipeline", "images_per_s": "images/s (median)",
                    "spread_text": f"range of {args.repeats} (spread)",
                    "s_per_epoch": f"s/epoch ({pipelines[0]['images_per_epoch']} images)",
                    "s_per_50k": "s per 50k images", "warmup_s": "warm-up s", "test_acc": "test acc",
                    "speedup": "× eager" if args.no_plain else "× plain", "speedup_flags": "flags"}))

    alone = pipelines[-1 if not args.compile else -2]  # the project loop, eager
    sizes = [int(c) for c in args.fused.split(",") if c.strip()]
    fused = measure_fused_sizes(args, data, device, sizes) if sizes else []
    for row in fused:
        # n separate runs one after another train at one run's rate, whatever n is
        row["vs_separate"] = row["aggregate_images_per_s"] / alone["images_per_s"]
        row["vs_separate_flags"] = flags_text(row, alone)
    if fused:
        print(f"\nfused seeds on {device} (one stacked model of N members, ablate/fused.py; "
              f"aggregate = all members' images / time; N separate runs one after another "
              f"train at {alone['images_per_s']:,.0f} images/s, the project loop's rate):\n")
        print(markdown([shown(r) for r in fused],
                       {"members": "members", "aggregate_images_per_s": "aggregate images/s (median)",
                        "spread_text": f"range of {args.repeats} (spread)",
                        "s_per_epoch": "s per epoch (all members)",
                        "warmup_s": "warm-up s", "mean_test_acc": "mean test acc",
                        "vs_separate": "× N separate runs", "vs_separate_flags": "flags"}))

    concurrent = []
    for n in [int(c) for c in args.concurrency.split(",") if c.strip()]:
        concurrent.append(measure_concurrent(args, n))
        concurrent[-1]["speedup"] = concurrent[-1]["aggregate_images_per_s"] / \
            concurrent[0]["aggregate_images_per_s"]
        concurrent[-1]["speedup_flags"] = flags_text(concurrent[-1], concurrent[0])
    if concurrent:
        print(f"\nconcurrent runs of this project's loop on {device} (each {args.warmup} warm-up, "
              f"then {args.repeats} repetitions of {args.epochs} timed epoch(s), back to back, all runs "
              f"starting each together; aggregate = all runs' images / wall time):\n")
        print(markdown([shown(c, "aggregate_images_per_s") for c in concurrent],
                       {"runs": "runs", "threads_per_run": "CPU threads/run",
                        "aggregate_images_per_s": "aggregate images/s (median)",
                        "spread_text": f"range of {args.repeats} (spread)",
                        "mean_run_images_per_s": "images/s per run", "wall_s": "wall s",
                        "speedup": f"× {concurrent[0]['runs']} run(s)", "speedup_flags": "flags"}))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(device), "args": vars(args),
                                               "pipelines": pipelines, "concurrent": concurrent,
                                               "fused": fused},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
