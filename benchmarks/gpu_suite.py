"""The GPU suite: every speed and accuracy claim of this project, measured in one call.

    python benchmarks/gpu_suite.py --out DIR [--budget-s 420] [--data-root PATH] [--work DIR]
    python benchmarks/gpu_suite.py --out DIR --dry-run      # the same path on a CPU, tiny, 90 s

Stage 1 (30% of the budget, at most 150 s): training images/s and seconds per
50k-image epoch of the plain pipeline (PIL + DataLoader, fp32) and of this project's loop (bf16 +
channels_last, eager and torch.compile) for the seed CNN, the (128,256,512) CNN, VGG-A and
ResNet-18; N = 1, 2, 4, 8 runs at once; fused members when ablate.fused exists; peak GPU memory.
Each figure is the median of 3 repetitions with its range; a noisy one (spread over 25%) or one
from fewer than 20 timed batches is flagged, and the plan for stage 2 uses none of those. Models
are named by what ran (--dry-run's tiny stand-ins say so).
Stage 2 (the rest): the seed report's rows at full length and 3 seeds, table by table in the
order activation, optimizer, scheduler, loss, best, BN study, SWA, ResNet-18 + AdamW, run the
fastest way stage 1 found; a row is started only if it is estimated to finish in time.

--out gets at most 8 small files, rewritten as results arrive, so a run cut short still returns
what it finished: results.json (every number), throughput.md, throughput.png, tables.md and
reproduction.md (analysis/make_tables.py, after each finished table), and up to three curve
PNGs. Run folders and logs go to --work (default: a new temporary folder). Stage 1 needs only
torch and torchvision; stage 2 runs ablate/train.py, which needs Hydra.
"""
from __future__ import annotations

import time

T0 = time.monotonic()  # the budget counts from here, imports included

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

# Run as a script from anywhere: the repository root holds `ablate` and `benchmarks`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import threading  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

# tqdm's first bar in a process makes a multiprocessing lock, a named semaphore; a speed-stage
# child (which imports this module under spawn) stopped at its deadline never frees it, and the
# resource tracker reports it as leaked when the suite exits. No two processes here share a bar,
# so a thread lock does.
tqdm.set_lock(threading.RLock())

from benchmarks import suite_accuracy as accuracy  # noqa: E402
from benchmarks import suite_speed as speed  # noqa: E402
from benchmarks import throughput  # noqa: E402
from benchmarks.throughput import markdown  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MAX_CURVE_PNGS = 3       # with results.json, 2 markdown tables, 2 more markdown, 1 speed PNG: 8 files
ANALYSIS_S = 15          # kept free at the end for the last tables (analysis/make_tables.py)
STARTUP_S = 8.0          # a train.py process before its first epoch (imports, data, CUDA), first guess


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="where the (at most 8) result files go")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget of the whole suite (default 420; 90 with --dry-run)")
    p.add_argument("--data-root", default=None, help="real CIFAR-10 for stage 2 (data.root)")
    p.add_argument("--work", type=Path, default=None, help="run folders and logs (default: a temp dir)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, synthetic data, tiny models, 1 epoch: the same path in 90 s")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when there is one)")
    p.add_argument("--stage1-s", type=float, default=None,
                   help="seconds for the speed stage (default: 30%% of the budget, at most 150)")
    p.add_argument("--images", type=int, default=None,
                   help="stage 1: training images per timed epoch (default 5120; 128 dry)")
    p.add_argument("--concurrency", default=None, help="stage 1: runs at once (default 1,2,4,8; 1,2 dry)")
    p.add_argument("--tables", default=",".join(accuracy.TABLES),
                   help="stage 2: tables in order (default: all, in the issue's order)")
    p.add_argument("--seeds", default="0,1,2", help="stage 2: seeds per row")
    p.add_argument("--scale", type=float, default=None,
                   help="stage 2: epochs multiplier (default 1 = the report's epochs; 0.01 dry)")
    p.add_argument("--train-size", type=int, default=None, help="stage 2: training subset")
    p.add_argument("--test-size", type=int, default=None, help="stage 2: test subset")
    p.add_argument("--seeds-per-process", type=int, default=None,
                   help="stage 2: seeds one train.py process trains in turn (default 1; 3 dry)")
    p.add_argument("--slots", type=int, default=None,
                   help="stage 2: train.py processes at once (default: the best N of stage 1)")
    args = p.parse_args(argv)
    check_args(p, args)
    dry = args.dry_run
    args.device = args.device or ("cpu" if dry or not torch.cuda.is_available() else "cuda")
    args.budget_s = args.budget_s or (90.0 if dry else 420.0)
    args.stage1_s = args.stage1_s if args.stage1_s is not None else \
        min(150.0, (0.4 if dry else 0.3) * args.budget_s)
    args.images = args.images or (128 if dry else 5_120)
    args.concurrency = [int(n) for n in (args.concurrency or ("1,2" if dry else "1,2,4,8")).split(",")
                        if n.strip()]
    args.tables = [t for t in args.tables.split(",") if t.strip()]
    unknown = [t for t in args.tables if t not in accuracy.TABLES]
    if unknown:
        p.error(f"unknown table(s) {unknown}; choose from {', '.join(accuracy.TABLES)}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.scale = args.scale if args.scale is not None else (0.01 if dry else 1.0)
    if dry:
        args.train_size, args.test_size = args.train_size or 256, args.test_size or 128
    args.seeds_per_process = args.seeds_per_process or (len(args.seeds) if dry else 1)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, in one line and before any work, what would fail late or be silently replaced."""
    for name in ("budget_s", "stage1_s", "scale"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            p.error(f"--{name.replace('_', '-')} must be a number > 0, not {value}")
    for name in ("images", "train_size", "test_size", "seeds_per_process", "slots"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, not {value}")
    for name, text in (("concurrency", args.concurrency), ("seeds", args.seeds)):
        if text is None:
            continue
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            p.error(f"--{name} must be comma-separated whole numbers, e.g. 1,2,4; not {text!r}")
        if name == "concurrency" and min(values) < 1:
            p.error(f"--concurrency counts runs at once: each must be >= 1, not {text!r}")
        if len(set(values)) < len(values):
            p.error(f"--{name} repeats a value: {text!r}")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file, not a folder")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / f".writable.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        p.error(f"--out {args.out} cannot be written: {err.strerror or err}")


def left(args) -> float:
    return args.budget_s - (time.monotonic() - T0)


def log(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f} s] {text}", flush=True)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ----------------------------------------------------------------------------- choosing the path

def trusted(row: dict) -> bool:
    """A figure to plan on: not noisy (its repetitions' spread over 25%) and from enough batches.
    A row measured before repetitions (without those marks) counts as trusted."""
    return not row.get("noisy", False) and not row.get("few_batches", False)


def figure_name(row: dict) -> str:
    """'seed CNN (64,128,256), 2.5M params project', 'seed CNN ... x4 at once', '... 8 fused'."""
    what = row.get("label") or speed.MODELS.get(row.get("model"), row.get("model"))
    if "pipeline" in row:
        return f"{what} {row['pipeline']}"
    return f"{what} x{row['runs']} at once" if "runs" in row else f"{what} {row.get('members')} fused"


def untrusted(stage1: dict) -> list[str]:
    """The figures the plan leaves out, and why."""
    rows = [*stage1["pipelines"], *stage1["concurrent"], *stage1["fused"]]
    return [f"{figure_name(r)} ({'; '.join(r.get('flags', []))})" for r in rows if not trusted(r)]


def pipeline_row(stage1: dict, model: str, pipeline: str, trusted_only: bool = True) -> dict | None:
    """The measured row of `model` in `pipeline`; with trusted_only, None for a noisy one."""
    return next((r for r in stage1["pipelines"] if r["model"] == model and r["pipeline"] == pipeline
                 and (trusted(r) or not trusted_only)), None)


def choose_compile(stage1: dict, model: str, epochs: int) -> bool:
    """torch.compile only where its measured warm-up is repaid within the run's epochs.
    The warm-up counts 1.5 times: evaluation mode compiles a second graph."""
    eager, compiled = pipeline_row(stage1, model, "project"), pipeline_row(stage1, model, "compiled")
    if eager is None or compiled is None:
        return False
    return 1.5 * compiled["setup_s"] + epochs * compiled["s_per_50k"] < \
        eager["setup_s"] + epochs * eager["s_per_50k"]


def compile_setup_s(stage1: dict, model: str) -> float:
    """torch.compile's warm-up for `model`; unmeasured: the longest measured for any model."""
    row = pipeline_row(stage1, model, "compiled")
    return row["setup_s"] if row else max(
        (r["setup_s"] for r in stage1["pipelines"] if r["pipeline"] == "compiled" and trusted(r)), default=60.0)


def single_run_rate(stage1: dict, model: str, compile: bool) -> float:
    """Training images/s of one run alone; unmeasured: a quarter of the slowest model measured."""
    row = (compile and pipeline_row(stage1, model, "compiled")) or pipeline_row(stage1, model, "project")
    if row:
        return row["images_per_s"]
    measured = [r["images_per_s"] for r in stage1["pipelines"] if r["pipeline"] == "project" and trusted(r)]
    return min(measured) / 4 if measured else 100.0


def concurrency_efficiency(stage1: dict, slots: int) -> float:
    """Each run's speed at `slots` runs at once relative to running alone (measured on the seed CNN)."""
    by_n = {c["runs"]: c["aggregate_images_per_s"] for c in stage1["concurrent"] if trusted(c)}
    if slots == 1:
        return 1.0
    if 1 in by_n and slots in by_n:
        return min(1.0, by_n[slots] / (slots * by_n[1]))
    return 1.0 / slots  # unmeasured: assume the runs only share the device


def estimate(args, stage1: dict, the_plan: dict, unit: accuracy.Unit) -> float:
    """Seconds one unit should take: start-up, then per seed its epochs (and compile warm-up)."""
    row = unit.row
    compile = the_plan["compile"].get(row.table, False)
    rate = single_run_rate(stage1, row.model, compile) * the_plan["efficiency"]
    epoch_s = ((args.train_size or 50_000) + (args.test_size or 10_000) / 3) / rate  # eval: ~1/3 step
    setup = 1.5 * compile_setup_s(stage1, row.model) if compile else 0.0
    epochs = max(1, round(row.epochs * args.scale))
    return STARTUP_S + len(unit.seeds) * (setup + epochs * epoch_s)


def choose_slots(args, stage1: dict, the_plan: dict, units: list, seconds: float) -> tuple[int, str]:
    """How many train.py processes at once: the N of stage 1 that finishes the most runs of the
    first table in the time left (more at once is slower each, and a run that cannot finish
    is worth nothing); between equals, the best aggregate images/s."""
    if args.slots:
        return args.slots, "set by --slots"
    first = [u for u in units if u.row.table == units[0].row.table] if units else []
    options = []
    for c in filter(trusted, stage1["concurrent"]):
        n = c["runs"]
        trial = {**the_plan, "efficiency": concurrency_efficiency(stage1, n)}
        length = estimate(args, stage1, trial, first[0]) if first else 1.0
        done = min(len(first), n * int(seconds // length))
        options.append((done, c["aggregate_images_per_s"], n, length))
    if not options:
        return 1, ("no concurrency measurement to trust (noisy or too few batches); one run at a time"
                   if stage1["concurrent"] else "no concurrency measurement; one run at a time")
    done, aggregate, n, length = max(options)
    return n, (f"{n} at once: {done} run(s) of the first table estimated to finish in the "
               f"{seconds:.0f} s left, {length:.0f} s each; aggregate {aggregate:,.0f} images/s")


def fused_launcher_here() -> bool:
    """The fused launcher (issue 14: hydra/launcher=fused, a plugin under hydra_plugins/)."""
    return any((REPO / "hydra_plugins").glob("**/*fused*"))


def choose_fused(stage1: dict, seeds: int) -> bool:
    """Fuse a row's seeds into one process when stage 1 measured that many fused members
    training faster than the best number of separate runs at once."""
    fused = [r for r in stage1["fused"] if r.get("members") == seeds and trusted(r) and
             isinstance(r.get("aggregate_images_per_s"), (int, float))]
    separate = max((c["aggregate_images_per_s"] for c in stage1["concurrent"] if trusted(c)), default=0.0)
    return bool(fused) and fused[0]["aggregate_images_per_s"] > separate and fused_launcher_here()


def plan(args, stage1: dict, seconds: float) -> dict:
    """How stage 2 runs in `seconds`: fused or not, torch.compile per table, runs at once."""
    fused = choose_fused(stage1, len(args.seeds))
    the_plan = {"fused": fused, "seeds_per_process": len(args.seeds) if fused else args.seeds_per_process,
                "compile": {}, "efficiency": 1.0, "left_out": untrusted(stage1)}
    for table in args.tables:
        first = accuracy.TABLES[table][0]
        the_plan["compile"][table] = args.device != "cpu" and \
            choose_compile(stage1, first.model, max(1, round(first.epochs * args.scale)))
    units = accuracy.make_units(args.tables, args.seeds, the_plan["seeds_per_process"])
    the_plan["slots"], the_plan["slots_why"] = choose_slots(args, stage1, the_plan, units, seconds)
    the_plan["efficiency"] = concurrency_efficiency(stage1, the_plan["slots"])
    return the_plan


def common_overrides(args, the_plan: dict) -> list[str]:
    """train.py overrides every unit shares: device, data, scale, threads and memory per run."""
    out = ["save_weights=false"]  # the suite reports numbers; keep the disk and the time
    out.append("device=cpu" if args.device == "cpu" else f"device={args.device}")
    if args.dry_run:
        out.append("data=synthetic")
    elif args.data_root:
        out += [f"data.root={args.data_root}", "data.download=false"]
    if args.train_size:
        out.append(f"data.train_size={args.train_size}")
    if args.test_size:
        out.append(f"data.test_size={args.test_size}")
    if args.scale != 1.0:
        out.append(f"scale={args.scale}")
    slots = the_plan["slots"]
    out.append(f"threads={max(1, (os.cpu_count() or 1) // slots)}")
    if args.device != "cpu" and slots > 1:
        out.append(f"cuda_memory_fraction={0.9 / slots:.3f}")  # one run outgrowing its share fails alone
    return out


def unit_command(args, the_plan: dict, work: Path, unit: accuracy.Unit) -> list[str]:
    common = common_overrides(args, the_plan)
    if the_plan["compile"].get(unit.row.table):
        common.append("compile=true")
    if the_plan["fused"]:
        common.append("hydra/launcher=fused")  # the row's seeds as one stacked model
    if unit.row.table == "bn_study" and args.train_size:
        common.append(f"data.val_size={max(10, args.train_size // 10)}")  # the preset holds out 5000
    return accuracy.command(unit, work, common, tiny=args.dry_run)


# ----------------------------------------------------------------------------- analysis and output

class Analysis:
    """analysis/make_tables.py (and bn_study.py) in the background after each finished table;
    when it is done its tables.md and reproduction.md are copied to --out."""

    def __init__(self, work: Path, out: Path):
        self.work, self.out = work, out
        self.proc: subprocess.Popen | None = None
        self.queued: list[list[str]] = []
        self.tables: list[str] = []
        self.wanted = False

    def request(self, tables: list[str]) -> None:
        if tables:  # nothing to tabulate before a table has runs
            self.tables, self.wanted = list(tables), True
        self.poll()

    def commands(self) -> list[list[str]]:
        # run in <work>/runs, so that the tables are titled by the table's folder name
        roots = [a for t in self.tables for a in ("--root", t)]
        cmds = [[sys.executable, str(REPO / "analysis" / "make_tables.py"), *roots,
                 "--out", "../analysis"]]
        if "bn_study" in self.tables:
            cmds.append([sys.executable, str(REPO / "analysis" / "bn_study.py"),
                         "--root", "bn_study", "--out", "../analysis/bn"])
        return cmds

    def poll(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        if self.proc is not None:
            self.proc = None
            if not self.queued:
                self.publish()
        if not self.queued and self.wanted:
            self.queued, self.wanted = self.commands(), False
        if self.queued:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
            with open(self.work / "logs" / "analysis.log", "a") as fh:
                self.proc = subprocess.Popen(self.queued.pop(0), cwd=self.work / "runs", env=env,
                                             stdout=fh, stderr=subprocess.STDOUT)

    def finish(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while (self.proc is not None or self.queued or self.wanted) and time.monotonic() < end:
            self.poll()
            time.sleep(0.1)
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def publish(self) -> None:
        """tables.md with up to three curve PNGs beside it, reproduction.md; small files in --out."""
        src = self.work / "analysis"
        if not (src / "tables.md").exists():
            return
        text = (src / "tables.md").read_text()
        bn = src / "bn" / "bn_study.md"
        if "bn_study" in self.tables and bn.exists():
            text += "\n## BN study (analysis/bn_study.py)\n\n" + bn.read_text()
        copied: list[str] = []

        def link(match: re.Match) -> str:
            png = src / match.group(1)
            if len(copied) < MAX_CURVE_PNGS and png.exists():
                copied.append(f"curves_{png.stem}.png")
                shutil.copyfile(png, self.out / copied[-1])
                return f"![training curves]({copied[-1]})"
            return f"(training curves: {png} in the work folder)"

        text = re.sub(r"!\[training curves\]\(([^)]+)\)", link, text)
        write_atomic(self.out / "tables.md", text)
        for old in self.out.glob("curves_*.png"):  # a table that came first earlier: keep 8 files
            if old.name not in copied:
                old.unlink()
        if (src / "reproduction.md").exists():
            write_atomic(self.out / "reproduction.md", (src / "reproduction.md").read_text())


def speed_markdown(stage1: dict, the_plan: dict | None, device: str) -> str:
    """throughput.md: the pipelines per model, N runs at once, fused members, and what was chosen."""
    dtype = "bf16, channels_last" if device != "cpu" else "fp32"
    workers = stage1["settings"]["workers"]
    loader = f"DataLoader x{workers}" if workers else "DataLoader, no workers"
    names = {"plain": f"plain PyTorch (PIL + {loader}, fp32)",
             "project": f"this project ({dtype})", "compiled": f"this project ({dtype}) + torch.compile"}
    plain_rows = {r["model"]: r for r in stage1["pipelines"] if r["pipeline"] == "plain"}
    rows = [{**markdown_marks(r), "model": r.get("label", speed.MODELS[r["model"]]),
             "pipeline": names[r["pipeline"]],
             "peak": "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:,.0f}",
             "x": "-" if r["x_plain"] is None else f"{r['x_plain']:.2f}",
             "flags": throughput.flags_text(r, plain_rows.get(r["model"], {}))} for r in stage1["pipelines"]]
    st = stage1["settings"]
    repeats = st.get("repeats", 1)
    text = [f"## Training speed ({st['images']} synthetic images per timed epoch, batch "
            f"{st['batch_size']}, {st['warmup']} warm-up epoch(s), then the median of {repeats} "
            f"repetitions of {st['epochs']} timed epoch(s))\n",
            markdown(rows, {"model": "model", "pipeline": "pipeline", "images_per_s": "images/s (median)",
                            "spread_text": f"range of {repeats} (spread)",
                            "s_per_50k": "s per 50k-image epoch", "setup_s": "extra warm-up s",
                            "peak": "peak GPU MiB", "x": "x plain", "flags": "flags"})
            if rows else "(nothing measured)",
            "\ns per 50k-image epoch = 50,000 / images/s (training only). Each figure is the median of "
            "its repetitions (a model's pipelines timed in turn within each); spread = (max - min) / "
            f"median, noisy above {throughput.NOISY:.0%}; few batches: fewer than "
            f"{throughput.MIN_BATCHES} timed batches per repetition. The plan uses no flagged figure. "
            "Extra warm-up: the first epoch's time beyond an ordinary one (compiling, cuDNN "
            "autotuning, loader workers), measured once. Peak GPU MiB: torch.cuda.max_memory_allocated "
            "of the measurement; n/a on a CPU."]
    if stage1["concurrent"]:
        one = next((c for c in stage1["concurrent"] if c["runs"] == 1), {})
        conc = [{**markdown_marks(c, "aggregate_images_per_s"),
                 "peak": "n/a" if c["peak_mem_mb_per_run"] is None else f"{c['peak_mem_mb_per_run']:,.0f}",
                 "x": "-" if c["x_one_run"] is None else f"{c['x_one_run']:.2f}",
                 "flags": throughput.flags_text(c, one)} for c in stage1["concurrent"]]
        what = stage1["concurrent"][0].get("label", speed.MODELS["cnn"])
        text += [f"\n### Runs at once ({what}, this project's loop, eager; repetitions back to back)\n",
                 markdown(conc, {"runs": "runs", "threads_per_run": "CPU threads/run",
                                 "aggregate_images_per_s": "aggregate images/s (median)",
                                 "spread_text": f"range of {repeats} (spread)",
                                 "mean_run_images_per_s": "images/s per run",
                                 "peak": "peak GPU MiB per run", "x": "x one run", "flags": "flags"})]
    if stage1["fused"]:
        text += [f"\n### Fused members ({stage1['fused'][0].get('label', speed.MODELS['cnn'])}, ablate.fused)\n",
                 "```", json.dumps(stage1["fused"], indent=1), "```"]
    if stage1["skipped"]:
        text += ["\nNot measured: " + "; ".join(stage1["skipped"]) + "."]
    if the_plan:
        compiled = [t for t, c in the_plan["compile"].items() if c]
        text += [f"\nStage 2 path: {the_plan['slots']} train.py runs at once ({the_plan['slots_why']}), "
                 f"{'each a row with its seeds fused' if the_plan['fused'] else 'seeds as separate runs'}; "
                 f"torch.compile for {', '.join(compiled) or 'no table'} (only where its warm-up "
                 "pays off over the table's epochs)."]
        if the_plan.get("left_out"):
            text += ["Left out of the plan (its defaults stand in): " + "; ".join(the_plan["left_out"]) + "."]
    return "\n".join(text) + "\n"


def markdown_marks(row: dict, key: str = "images_per_s") -> dict:
    """A row with its repetitions' range and spread as text (throughput.spread_text)."""
    return {**row, "spread_text": throughput.spread_text(row, key)}


def speed_figure(stage1: dict, path: Path) -> None:
    """throughput.png: images/s per model and pipeline (the median, the range of the repetitions
    as an error bar, a flagged figure hatched); aggregate images/s against runs at once (hollow:
    flagged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [2, 1]},
                               layout="constrained")
    models = list(dict.fromkeys(r["model"] for r in stage1["pipelines"]))
    labels = {r["model"]: r.get("label", speed.MODELS[r["model"]]) for r in stage1["pipelines"]}
    def short(text: str) -> str:  # the model without its size and stand-in note
        return re.sub(r", [0-9.e+-]+M params$", "", text).split(", the ")[0]

    measured = [p for p in speed.PIPELINES if any(r["pipeline"] == p for r in stage1["pipelines"])]
    for i, pipeline in enumerate(measured):  # a pipeline not measured gets no bar and no legend entry
        rows = [pipeline_row(stage1, m, pipeline, trusted_only=False) or {} for m in models]
        x = [j + 0.27 * (i - (len(measured) - 1) / 2) for j in range(len(models))]
        values = [r.get("images_per_s", 0) for r in rows]
        errors = [[max(0, v - r.get("images_per_s_min", v)) for v, r in zip(values, rows)],
                  [max(0, r.get("images_per_s_max", v) - v) for v, r in zip(values, rows)]]
        bars = a.bar(x, values, width=0.27, label=pipeline, yerr=errors, capsize=2)
        for bar, r in zip(bars, rows):
            if r and not trusted(r):
                bar.set_hatch("//")
    a.set_xticks(range(len(models)), [short(labels[m]).replace(" (", "\n(", 1) for m in models], fontsize=7)
    a.set_ylabel("training images/s (median; bar: range)")
    a.legend(fontsize=7, title="hatched: noisy or few batches", title_fontsize=7)
    conc = stage1["concurrent"]
    rates = [c["aggregate_images_per_s"] for c in conc]
    b.errorbar([c["runs"] for c in conc], rates, fmt="-", capsize=3,
               yerr=[[v - c.get("aggregate_images_per_s_min", v) for v, c in zip(rates, conc)],
                     [c.get("aggregate_images_per_s_max", v) - v for v, c in zip(rates, conc)]])
    for c in conc:  # a flagged figure drawn hollow
        b.plot(c["runs"], c["aggregate_images_per_s"], "o", color="tab:blue",
               markerfacecolor="tab:blue" if trusted(c) else "white")
    b.set_xticks([c["runs"] for c in conc])
    b.set_xlabel(f"runs at once ({short(conc[0].get('label', speed.MODELS['cnn']))})" if conc else "runs at once")
    b.set_ylabel("aggregate images/s (hollow: flagged)")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def machine(device: str) -> str:
    if device != "cpu" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        what = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        what = f"CPU ({platform.processor() or platform.machine()})"
    return f"{what}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def tables_summary(work: Path, tables: list[str]) -> dict:
    """Each finished table's rows (mean, sd, CI, n) and the reproduction rows, for results.json."""
    from analysis.reproduction import load_seed_results, reproduction_table
    from analysis.runs import collect
    from analysis.tables import sweep_reports

    roots = [work / "runs" / t for t in tables if (work / "runs" / t).is_dir()]
    if not roots:
        return {}
    runs, _ = collect(roots)
    out = {"tables": {Path(r["sweep"]).name: json.loads(r["table"].to_json(orient="records"))
                      for r in sweep_reports(runs)},
           "reproduction": json.loads(reproduction_table(runs, load_seed_results()).to_json(orient="records"))}
    return out


# ----------------------------------------------------------------------------- main

def stop_on_sigterm(signum, frame):
    # a timeout's SIGTERM: leave through the `finally`s, which stop the runs and write what exists
    raise SystemExit(143)


def save(args, result: dict) -> None:
    result["elapsed_s"] = round(time.monotonic() - T0, 1)
    write_atomic(args.out / "results.json", json.dumps(result, indent=1, default=str) + "\n")


def speed_stage(args, result: dict) -> dict:
    settings = speed.Settings(device=args.device, images=args.images, tiny=args.dry_run,
                              epochs=1, repeats=3, compile=args.device != "cpu",
                              workers=0 if args.dry_run else min(16, os.cpu_count() or 1))
    stage1 = speed.run_stage(settings, min(args.stage1_s, left(args)), args.concurrency, log=log)
    result["speed"] = stage1
    write_atomic(args.out / "throughput.md", speed_markdown(stage1, None, args.device))
    if stage1["pipelines"]:
        speed_figure(stage1, args.out / "throughput.png")
    save(args, result)
    if args.data_root and not args.dry_run:  # decode the image tree once, not in every run at once
        from ablate.data import load_cifar10

        t = time.monotonic()
        load_cifar10(args.data_root, download=False)
        result["data_cache_s"] = round(time.monotonic() - t, 1)
    return stage1


def accuracy_stage(args, work: Path, stage1: dict, result: dict) -> None:
    """Plan from stage 1, run the rows that fit, tabulate after each table and at the end."""
    grace_s = 5.0 if args.dry_run else 15.0  # for a stopped run to save its record
    deadline = T0 + args.budget_s - grace_s - ANALYSIS_S
    the_plan = plan(args, stage1, deadline - time.monotonic())
    result["plan"] = the_plan
    write_atomic(args.out / "throughput.md", speed_markdown(stage1, the_plan, args.device))
    log(f"stage 2 plan: {the_plan['slots_why']}; compile {the_plan['compile']}")
    units = accuracy.make_units(args.tables, args.seeds, the_plan["seeds_per_process"])
    analysis = Analysis(work, args.out)

    def table_done(table: str) -> None:
        analysis.request([t for t in pool.tables_done if (work / "runs" / t).is_dir()])
        save(args, {**result, "units": [u.summary() for u in units]})

    pool = accuracy.Pool(
        units, the_plan["slots"], deadline=deadline, work=work,
        make_command=lambda u: unit_command(args, the_plan, work, u),
        estimate=lambda u: estimate(args, stage1, the_plan, u),
        on_table_done=table_done, on_tick=analysis.poll, log=log, grace_s=grace_s)
    try:
        pool.run()
    finally:
        result["units"] = [u.summary() for u in units]
        result["runs"] = accuracy.run_records(work)
        ran = [t for t in args.tables if any(u.row.table == t and u.status in ("finished", "stopped")
                                             for u in units)]
        analysis.request(ran)  # the last word: every table with runs, cut short or not
        analysis.finish(timeout_s=max(5.0, left(args)))
        try:
            result.update(tables_summary(work, ran))
        except Exception as err:  # the numbers are in the runs and tables.md all the same
            result["tables_error"] = f"{type(err).__name__}: {err}"


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(args.device), "device": args.device, "dry_run": args.dry_run,
              "budget_s": args.budget_s, "work": str(work),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    log(f"{result['machine']}; budget {args.budget_s:.0f} s, stage 1 {args.stage1_s:.0f} s; "
        f"run folders in {work}")
    try:
        accuracy_stage(args, work, speed_stage(args, result), result)
    finally:
        result["files"] = sorted(p.name for p in args.out.iterdir() if not p.name.startswith("."))
        save(args, result)
    runs = result.get("runs", [])
    log(f"done: {sum(r['status'] == 'completed' for r in runs)} of {len(runs)} runs completed; "
        f"wrote {', '.join(result['files'])} to {args.out}")
    if args.work is None:  # our own temporary folder: its records are in results.json and tables.md now
        shutil.rmtree(work, ignore_errors=True)
        log(f"removed the run folders in {work} (--work DIR keeps them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
