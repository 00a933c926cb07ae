"""Stage 1 of the GPU suite: training speed per model and pipeline, N runs at once, fused members.

Measurements run in a spawned worker process, one after another, each with a deadline: a
torch.compile that takes too long, or a run that hangs, is killed with its process without losing
what was already measured (each result is sent back as soon as it exists), and a new worker takes
the next measurement. N runs at once are N spawned processes. The pipelines are those of
benchmarks/throughput.py, built from the same pieces (benchmarks/plain.py, ablate.loop), for four
models instead of two. Each figure is the median of Settings.repeats repetitions, with its range,
spread and flags (throughput.interleaved: a model's pipelines are timed in turn within each).
"""
from __future__ import annotations

import functools
import importlib.util
import multiprocessing as mp
import os
import queue as queue_module
import time
import traceback
from dataclasses import dataclass

import torch
from torch import nn

from ablate.data import make_synthetic
from ablate.loop import pick_precision, train_one_epoch
from ablate.models import CNN, ResNet
from ablate.vgg import VGG
from benchmarks import plain, throughput

# name -> what the tables call it (the full-size model; --dry-run's stand-ins: TINY_NAMES)
MODELS = {
    "cnn": "seed CNN (64,128,256)",
    "cnn_wide": "CNN (128,256,512)",
    "vgg_a": "VGG-A",
    "resnet18": "ResNet-18",
}
TINY_NAMES = {
    "cnn": "tiny CNN (8,16,32), the seed CNN's stand-in",
    "cnn_wide": "tiny CNN (16,32,64), the (128,256,512) CNN's stand-in",
    "vgg_a": "tiny VGG-A (widths 8-16, hidden 32)",
    "resnet18": "ResNet-18 at width 4",
}


def label(name: str, tiny: bool, params: int | None = None) -> str:
    """What ran, for the tables: the model or its --dry-run stand-in, with its size."""
    text = TINY_NAMES[name] if tiny else MODELS[name]
    return f"{text}, {params / 1e6:.2g}M params" if params else text
PIPELINES = ("plain", "project", "compiled")


@dataclass
class Settings:
    """What every measurement shares; picklable, so spawned children get it whole."""

    device: str
    images: int           # training images per timed epoch (s per 50k epoch is extrapolated)
    batch_size: int = 128
    warmup: int = 1       # untimed epochs: workers starting, cuDNN autotuning, compiling
    epochs: int = 1       # timed epochs per repetition (throughput.interleaved reads .warmup,
    repeats: int = 3      # .epochs, .repeats and .batch_size): each figure is the median of repeats
    workers: int = 8      # DataLoader workers of the plain pipeline
    tiny: bool = False    # --dry-run: small models of the same families
    compile: bool = True  # also measure torch.compile (off on a CPU: minutes, and never used there)


# --dry-run's stand-ins, the sizes of suite_accuracy.TINY_MODEL
TINY_VGG = {"widths": (8, 8, 16, 16, 16, 16, 16, 16), "hidden": 32}


def build(name: str, tiny: bool) -> nn.Module:
    """The model as the configs build it (conf/model/*.yaml), or a tiny one of the same kind."""
    torch.manual_seed(0)
    leaky = functools.partial(nn.LeakyReLU, negative_slope=0.1)  # conf/model/activation default
    if name == "cnn":
        return CNN(leaky, filters=(8, 16, 32) if tiny else (64, 128, 256))
    if name == "cnn_wide":
        return CNN(leaky, filters=(16, 32, 64) if tiny else (128, 256, 512))
    if name == "vgg_a":
        return VGG(nn.ReLU, batchnorm=False, **(TINY_VGG if tiny else {}))
    if name == "resnet18":
        return ResNet(nn.ReLU, width=4 if tiny else 64)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def setup(device: torch.device, threads: int | None = None) -> None:
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as ablate/train.py does on CUDA
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    """Peak GPU memory allocated by tensors since the last reset (None on a CPU: n/a)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# ----------------------------------------------------------------------------- one process, one model

def project_epoch(model: nn.Module, data, device: torch.device, compile: bool, batch_size: int):
    """This project's loop (throughput.project_run's set-up for any model): one_epoch() -> images."""
    data = data.to(device)
    precision = pick_precision("auto", device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()
    optimizer, loss_fn = throughput.adam(model), nn.CrossEntropyLoss()
    generator = torch.Generator(device=device).manual_seed(0)
    return lambda: train_one_epoch(model, data.train_x, data.train_y, loss_fn=loss_fn,
                                   optimizer=optimizer, batch_size=batch_size, generator=generator,
                                   precision=precision, desc="bench")["images"]


def pipeline_epoch(model: nn.Module, pipeline: str, data, s: Settings, device: torch.device):
    """one_epoch() -> images of `model` in `pipeline` (plain, project or compiled)."""
    if pipeline == "plain":
        loader = plain.make_loader(data.train_x, data.train_y, batch_size=s.batch_size,
                                   workers=s.workers, train=True, device=device)
        optimizer, loss_fn = throughput.adam(model), nn.CrossEntropyLoss()
        return lambda: plain.train_epoch(model, loader, loss_fn=loss_fn, optimizer=optimizer,
                                         device=device)["images"]
    return project_epoch(model, data, device, pipeline == "compiled", s.batch_size)


def pipeline_row(name: str, pipeline: str, params: int, timing: dict, s: Settings, peak) -> dict:
    return {"model": name, "label": label(name, s.tiny, params), "pipeline": pipeline, "params": params,
            **timing, "s_per_50k": 50_000 / timing["images_per_s"],
            # the warm-up epoch minus an ordinary one: compiling (and cuDNN autotuning) time
            "setup_s": max(0.0, timing["warmup_s"] - s.warmup * timing["s_per_epoch"]),
            "peak_mem_mb": peak}


def measure_pipeline(name: str, pipeline: str, data, s: Settings) -> dict:
    """Images/s of one model in one pipeline, its warm-up and its peak GPU memory."""
    return measure_model_pipelines(name, (pipeline,), data, s)[0]


def measure_model_pipelines(name: str, pipelines: tuple[str, ...], data, s: Settings) -> list[dict]:
    """Images/s of one model in each pipeline, timed in turn within each repetition
    (throughput.interleaved), with warm-ups and peak GPU memory (of them all, on a GPU)."""
    device = torch.device(s.device)
    setup(device)
    models = {p: build(name, s.tiny).to(device) for p in pipelines}
    params = sum(p.numel() for p in next(iter(models.values())).parameters())
    timings = throughput.interleaved({p: pipeline_epoch(models[p], p, data, s, device) for p in pipelines},
                                     s, device)
    return [pipeline_row(name, p, params, timings[p], s, peak_mb(device)) for p in pipelines]


def pipelines_worker(name: str, pipelines: tuple[str, ...], s: Settings, results) -> None:
    """Child process: some pipelines of one model, timed against each other; the results are sent
    when they all exist."""
    try:
        data = make_synthetic(train_size=s.images, test_size=256, seed=0)
        for row in measure_model_pipelines(name, pipelines, data, s):
            results.put(row)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except BaseException:
        results.put({"model": name, "error": traceback.format_exc(limit=3)})
    finally:
        results.put(None)


# ----------------------------------------------------------------------------- N processes at once

def concurrent_worker(name: str, s: Settings, rank: int, threads: int, barrier, results) -> None:
    """One of N simultaneous runs (as throughput.concurrent_run): warm up, wait, time its epochs."""
    try:
        device = torch.device(s.device)
        setup(device, threads)
        one_epoch = project_epoch(build(name, s.tiny).to(device),
                                  make_synthetic(train_size=s.images, test_size=64, seed=rank),
                                  device, compile=False, batch_size=s.batch_size)
        reps = throughput.synchronized_reps(one_epoch, device, warmup=s.warmup, repeats=s.repeats,
                                            epochs=s.epochs, barrier=barrier, timeout=600)
        results.put({"rank": rank, "reps": reps, "peak_mem_mb": peak_mb(device)})
    except BaseException:
        barrier.abort()  # do not leave the other runs waiting
        results.put({"rank": rank, "error": traceback.format_exc(limit=3)})
    finally:
        results.put(None)


def summarize_concurrent(name: str, n: int, threads: int, runs: list[dict], s: Settings) -> dict:
    """Aggregate images/s of n runs (throughput.concurrent_stats: per repetition all their images
    over the wall time from first start to last end; the median, its range and flags)."""
    peaks = [r["peak_mem_mb"] for r in runs if r["peak_mem_mb"] is not None]
    batches = throughput.timed_batches(s.images, s.batch_size, s.epochs)
    return {"model": name, "label": label(name, s.tiny), "runs": n, "threads_per_run": threads,
            **throughput.concurrent_stats([r["reps"] for r in runs], batches),
            "peak_mem_mb_per_run": max(peaks) if peaks else None}


# ----------------------------------------------------------------------------- fused members

def fused_available() -> bool:
    """Whether ablate.fused (N seeds trained as one stacked model) and its benchmark are here."""
    return importlib.util.find_spec("ablate.fused") is not None and hasattr(throughput, "measure_fused")


def fused_worker(n: int, s: Settings, results) -> None:
    """Child process: n seed-CNN members as one stacked model, measured by throughput.measure_fused
    (args, data, device, n) as throughput.py calls it."""
    try:
        device = torch.device(s.device)
        setup(device)
        args = throughput.parse_args(["--device", s.device, "--images", str(s.images),
                                      "--epochs", str(s.epochs), "--warmup", str(s.warmup),
                                      "--repeats", str(max(s.repeats, throughput.REPEATS)),
                                      "--batch-size", str(s.batch_size), "--allow-few-batches",
                                      "--filters", "8,16,32" if s.tiny else "64,128,256"])
        row = throughput.measure_fused(args, throughput.load_data(args), device, n)
        results.put({"model": "cnn", "label": label("cnn", s.tiny), "members": n, **row,
                     "peak_mem_mb": peak_mb(device)})
    except BaseException:
        results.put({"model": "cnn", "members": n, "error": traceback.format_exc(limit=3)})
    finally:
        results.put(None)


# ----------------------------------------------------------------------------- running children

def gather(results, procs, expected: int, deadline: float) -> tuple[list[dict], bool]:
    """What the children send until `expected` of them have said they are done (a None), or the
    deadline passes, or they all died. Returns (results, whether all finished)."""
    got, done = [], 0
    while done < expected and time.monotonic() < deadline:
        try:
            item = results.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
        except queue_module.Empty:
            if not any(p.is_alive() for p in procs):
                break  # died without its sentinel (killed by the OS)
            continue
        if item is None:
            done += 1
        else:
            got.append(item)
    return got, done == expected


def run_children(targets: list[tuple], deadline: float) -> tuple[list[dict], bool]:
    """One spawned process per (function, args...), all at once; stopped at the deadline."""
    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    results = ctx.Queue()
    procs = [ctx.Process(target=fn, args=(*args, results)) for fn, *args in targets]
    try:
        for p in procs:
            p.start()
        return gather(results, procs, len(procs), deadline)
    finally:  # also when the suite itself is stopped
        stop(procs)


def serve(tasks, results) -> None:
    """A worker process's loop: say it is ready (its imports are done), then run (function,
    args) tasks until told to stop (a None)."""
    results.put(None)
    for fn, args in iter(tasks.get, None):
        fn(*args, results)  # each function ends by sending None itself


class Worker:
    """One spawned process that measures one task after another, so torch and CUDA start once;
    a task that overruns its deadline takes the process with it and the next task gets a new one."""

    def __init__(self):
        self.proc = None

    def start(self, deadline: float) -> bool:
        """Start the process and wait until it has imported everything; False if it could not."""
        ctx = mp.get_context("spawn")
        # fresh queues too: a process killed while writing can leave a queue unusable
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=serve, args=(self.tasks, self.results))
        self.proc.start()
        _, ready = gather(self.results, [self.proc], 1, deadline)
        if not ready:
            self.close()
        return ready

    def run(self, fn, args: tuple, deadline: float) -> tuple[list[dict], bool]:
        if self.proc is None and not self.start(deadline):
            return [], False
        self.tasks.put((fn, args))
        finished = False
        try:
            got, finished = gather(self.results, [self.proc], 1, deadline)
            return got, finished
        finally:  # overran, or the suite itself is stopped
            if not finished:
                self.close()

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.is_alive():
                self.tasks.put(None)
                self.proc.join(timeout=2)
            stop([self.proc])
            self.proc = None


def stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()


# ----------------------------------------------------------------------------- the stage

def last_line(error: str) -> str:
    return error.strip().splitlines()[-1]


def measure_pipelines(name: str, pipelines: tuple[str, ...], s: Settings, worker: Worker,
                      deadline: float, out: dict) -> None:
    t0 = time.monotonic()
    rows, finished = worker.run(pipelines_worker, (name, pipelines, s), deadline)
    out["pipelines"] += [r for r in rows if "error" not in r]
    out["skipped"] += [f"pipelines {name}: {last_line(r['error'])}" for r in rows if "error" in r]
    missing = [p for p in pipelines if not any(r.get("pipeline") == p for r in rows)]
    if missing and not finished:
        out["skipped"].append(f"pipelines {name} {'/'.join(missing)}: over its "
                              f"{deadline - t0:.0f} s share, stopped")


def measure_concurrent(name: str, s: Settings, counts: list[int], deadline: float, out: dict) -> None:
    cores = os.cpu_count() or 1
    for n in counts:
        if time.monotonic() >= deadline - 1:  # not worth starting processes only to stop them
            out["skipped"].append(f"concurrent {name} x{n}: over its share")
            continue
        threads = max(1, cores // n)
        barrier = mp.get_context("spawn").Barrier(n)
        rows, finished = run_children(
            [(concurrent_worker, name, s, rank, threads, barrier) for rank in range(n)], deadline)
        errors = [r["error"] for r in rows if "error" in r]
        if finished and not errors and len(rows) == n:
            out["concurrent"].append(summarize_concurrent(name, n, threads, rows, s))
        else:
            why = last_line(errors[0]) if errors else "over its share, stopped"
            out["skipped"].append(f"concurrent {name} x{n}: {why}")


def measure_fused(s: Settings, counts: list[int], worker: Worker, deadline: float, out: dict) -> None:
    if not fused_available():
        out["skipped"].append("fused members: ablate.fused (and throughput.measure_fused) "
                              "not in this checkout")
        return
    for n in counts:
        rows, finished = worker.run(fused_worker, (n, s), deadline)
        out["fused"] += [r for r in rows if "error" not in r]
        out["skipped"] += [f"fused x{n}: {last_line(r['error'])}" for r in rows if "error" in r]
        if not finished:
            out["skipped"].append(f"fused x{n}: over its share, stopped")
            return


def run_stage(s: Settings, seconds: float, concurrency: list[int], log=print) -> dict:
    """Measure in priority order within `seconds`; whatever does not fit is listed as skipped.

    Order: the seed CNN eager (plain and this project's loop), N runs of it at once (what
    stage 2 needs to choose its path), the other three models eager, then torch.compile for each
    model (its warm-up is the least predictable part), then fused members. Each task gets a
    share of the time; a share left unused passes on to the next task.
    """
    start = time.monotonic()
    end = start + seconds
    worker = Worker()
    worker.start(end)  # not charged to the first task: on a busy CPU importing torch takes a while
    out = {"settings": vars(s).copy(), "pipelines": [], "concurrent": [], "fused": [], "skipped": []}
    if not s.compile:
        out["skipped"].append("torch.compile: not measured on a CPU (stage 2 uses it only on a GPU)")
    eager, others = ("plain", "project"), ("cnn_wide", "resnet18", "vgg_a")
    tasks = [("pipelines", "cnn", eager, 0.15), ("concurrent", "cnn", (), 0.3)]
    tasks += [("pipelines", m, eager, 0.2 / 3) for m in others]
    if s.compile:
        tasks += [("pipelines", m, ("compiled",), share)
                  for m, share in zip(("cnn", *others), (0.09, 0.07, 0.07, 0.07))]
    tasks += [("fused", "cnn", (), 0.05)]
    planned, rest = time.monotonic(), end - time.monotonic()
    total = sum(share for *_, share in tasks)
    try:
        for kind, name, pipelines, share in tasks:
            planned += share / total * rest
            deadline = min(end, max(planned, time.monotonic() + 0.05 * rest))
            if time.monotonic() >= end:
                out["skipped"].append(f"{kind} {name} {'/'.join(pipelines)}: stage 1 time used up")
                continue
            t0 = time.monotonic()
            if kind == "pipelines":
                measure_pipelines(name, pipelines, s, worker, deadline, out)
            elif kind == "concurrent":
                measure_concurrent(name, s, concurrency, deadline, out)
            else:
                measure_fused(s, concurrency, worker, deadline, out)
            log(f"stage 1: {kind} {name} {'/'.join(pipelines)} in {time.monotonic() - t0:.1f} s ({len(out['pipelines'])} "
                f"pipelines, {len(out['concurrent'])} concurrency rows so far)")
    finally:  # also when the suite itself is stopped
        worker.close()
    plain_rate = {r["model"]: r["images_per_s"] for r in out["pipelines"] if r["pipeline"] == "plain"}
    for r in out["pipelines"]:
        r["x_plain"] = r["images_per_s"] / plain_rate[r["model"]] if r["model"] in plain_rate else None
    one = next((c for c in out["concurrent"] if c["runs"] == 1), None)
    for c in out["concurrent"]:
        c["x_one_run"] = c["aggregate_images_per_s"] / one["aggregate_images_per_s"] if one else None
    out["seconds"] = time.monotonic() - start
    return out
