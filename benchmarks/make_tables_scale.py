"""How make_tables scales with the number of run folders: time and peak memory.

    python benchmarks/make_tables_scale.py [--runs N ...] [--repeats 3] [--template RUN_DIR] [--code CHECKOUT]

Fabricates N realistic run folders from one real run (its .hydra/ files, result.json and
metrics.csv, with seed, optim.lr, optim.weight_decay and a per-sweep +tag varied in the
record's config and overrides, as `-m` sweeps of lr x weight_decay x seeds, each with its
multirun.yaml) into a temporary folder, then times `analysis.runs.collect` (--repeats times,
each in a fresh process with a fresh HOME: nothing of an earlier call is reused) and the whole
`analysis.make_tables.main` once, reporting the median with the range. Peak RSS from getrusage.
Without --template it trains the tiny run once (a few seconds). --code DIR measures another
checkout's analysis/ on the same folders.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = ["data=synthetic", "data.train_size=200", "data.test_size=100", "epochs=2", "model.filters=[8,16,32]"]
LRS = ("0.01", "0.003", "0.001", "0.0003")
DECAYS = ("0.0001", "0.0005")
FILES = (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "result.json", "metrics.csv")


def make_template(where: Path) -> Path:
    """One real tiny run (synthetic data, narrow CNN, two epochs)."""
    run = where / "template"
    subprocess.run([sys.executable, str(REPO / "ablate/train.py"), *TINY, f"hydra.run.dir={run}"],
                   cwd=REPO, check=True, capture_output=True)
    return run


def yaml_list(lines: list[str], indent: str) -> str:
    return "".join(f"{indent}- {line}\n" for line in lines)


class Fabricator:
    """Run folders as a sweep of the template's run leaves them: text of the real files with
    the swept values (and Hydra's per-job fields) put in."""

    def __init__(self, template: Path):
        self.config = (template / ".hydra/config.yaml").read_text()
        self.hydra = (template / ".hydra/hydra.yaml").read_text()
        self.result = json.loads((template / "result.json").read_text())
        self.metrics = (template / "metrics.csv").read_text().splitlines()
        self.base = self.result["overrides"]
        for pattern in (r"(?m)^seed: \S+$", r"(?m)^optim:\n(?:  .*\n)*?  lr: \S+$",
                        r"(?m)^optim:\n(?:  .*\n)*?  weight_decay: \S+$", r"(?m)^    task:\n(?:    - .*\n)+",
                        r"(?m)^  mode: RUN$", r"(?m)^    override_dirname: .*$", r"(?m)^    id: .*$",
                        r"(?m)^    num: .*$", r"(?m)^    output_dir: .*$"):
            assert re.search(pattern, self.config + self.hydra), f"template lacks {pattern}"

    def config_text(self, lr: str, wd: str, seed: int, tag: str) -> str:
        text = re.sub(r"(?m)^seed: \S+$", f"seed: {seed}", self.config)
        text = re.sub(r"(?m)^(optim:\n(?:  .*\n)*?  lr: )\S+$", rf"\g<1>{lr}", text)
        text = re.sub(r"(?m)^(optim:\n(?:  .*\n)*?  weight_decay: )\S+$", rf"\g<1>{wd}", text)
        return text + f"tag: {tag}\n"

    def hydra_text(self, task: list[str], job: str, num: int, out: Path, mode: str = "MULTIRUN") -> str:
        text = re.sub(r"(?m)^    task:\n(?:    - .*\n)+", lambda _: "    task:\n" + yaml_list(task, "    "),
                      self.hydra)
        text = re.sub(r"(?m)^  mode: RUN$", f"  mode: {mode}", text)
        text = re.sub(r"(?m)^    override_dirname: .*$", lambda _: f"    override_dirname: {job}", text)
        text = re.sub(r"(?m)^    id: .*$", f"    id: '{num}'", text)
        text = re.sub(r"(?m)^    num: .*$", f"    num: {num}", text)
        return re.sub(r"(?m)^    output_dir: .*$", lambda _: f"    output_dir: {out}", text)

    def sweep(self, folder: Path, index: int, seeds: int, rng: random.Random) -> int:
        """One sweep folder: multirun.yaml and len(LRS) x len(DECAYS) x seeds job folders."""
        folder.mkdir(parents=True)
        tag = f"s{index}"
        swept = [*self.base, f"+tag={tag}", f"optim.lr={','.join(LRS)}",
                 f"optim.weight_decay={','.join(DECAYS)}", f"seed={','.join(map(str, range(seeds)))}"]
        (folder / "multirun.yaml").write_text(self.hydra_text(swept, "", 0, folder).replace(
            "    id: '0'\n", "    id: ???\n").replace("    num: 0\n", "    num: ???\n") + self.config)
        for num, (lr, wd, seed) in enumerate(itertools.product(LRS, DECAYS, range(seeds))):
            task = [*self.base, f"+tag={tag}", f"optim.lr={lr}", f"optim.weight_decay={wd}", f"seed={seed}"]
            job = ",".join(sorted(task, key=lambda o: o.lstrip("+").partition("=")[0]))
            job = re.sub(r"[^A-Za-z0-9._=,+\-~@\[\]]", "_", job)
            run = folder / job
            (run / ".hydra").mkdir(parents=True)
            (run / ".hydra/config.yaml").write_text(self.config_text(lr, wd, seed, tag))
            (run / ".hydra/hydra.yaml").write_text(self.hydra_text(task, job, num, run))
            (run / ".hydra/overrides.yaml").write_text(yaml_list(task, ""))
            acc = round(min(1.0, max(0.0, 0.6 + 40 * float(lr) * (1 - 100 * float(lr)) + rng.gauss(0, 0.02))), 4)
            config = json.loads(json.dumps(self.result.get("config") or {}))
            config.update(seed=seed, tag=tag)
            config.setdefault("optim", {}).update(lr=float(lr), weight_decay=float(wd))
            record = {**self.result, "overrides": task, "seed": seed, "final_test_acc": acc,
                      "best_test_acc": acc, "config_hash": f"{rng.getrandbits(64):016x}",
                      "config": config, "row_identity": f"{tag}-{lr}-{wd}",
                      "sweep": {"kind": "grid", "dir": str(folder), "job": num, "launcher": "basic"}}
            (run / "result.json").write_text(json.dumps(record, indent=2) + "\n")
            header, *rows = self.metrics
            rows = [",".join(f"{float(v) * rng.uniform(0.95, 1.05):.6g}" if v and i not in (0, 7) else v
                             for i, v in enumerate(row.split(","))) for row in rows]
            (run / "metrics.csv").write_text("\n".join([header, *rows]) + "\n")
        return num + 1


def fabricate(template: Path, root: Path, runs: int, seeds: int) -> int:
    """At least `runs` run folders under root, in sweeps of len(LRS) x len(DECAYS) x seeds."""
    fab, rng, made, index = Fabricator(template), random.Random(0), 0, 0
    while made < runs:
        made += fab.sweep(root / f"sweep{index:03d}", index, seeds, rng)
        index += 1
    return made


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(what: str, root: Path, out: Path) -> dict:
    """Run in a fresh process: the imports first (not timed), then the call."""
    from analysis import make_tables
    from analysis.runs import collect

    import analysis.plots  # noqa: F401  (main imports matplotlib lazily; keep that out of the time)
    base = peak_rss_mb()
    start = time.perf_counter()
    if what == "collect":
        runs, _ = collect([root])
        n = len(runs)
    else:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert make_tables.main(["--root", str(root), "--out", str(out)]) == 0
        n = None
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(), "import_rss_mb": base,
            "runs": n}


def child(what: str, root: Path, out: Path, code: Path, home: Path) -> dict:
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(code), "MPLBACKEND": "Agg", "HOME": str(home)}
    env.pop("XDG_CACHE_HOME", None)
    proc = subprocess.run([sys.executable, __file__, "--measure", what, "--root", str(root), "--out", str(out),
                           "--code", str(code)], cwd=code, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, action="append", help="run folders to fabricate (repeatable; "
                        "default 2000 and 10000)")
    parser.add_argument("--seeds", type=int, default=25, help="seeds per variant: a sweep is 4 lr x 2 "
                        "weight_decay x seeds runs (default 25: 200 runs a sweep)")
    parser.add_argument("--template", type=Path, help="a real run folder to copy (default: train a tiny one)")
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose analysis/ to measure")
    parser.add_argument("--repeats", type=int, default=3, help="collect calls per size (default 3)")
    parser.add_argument("--drop-caches", action="store_true", help="empty the OS page cache before each "
                        "call (Linux, as root: /proc/sys/vm/drop_caches), so every file is read from disk")
    parser.add_argument("--only", choices=("collect", "main"), help="measure only this")
    parser.add_argument("--keep", type=Path, help="fabricate here and keep the folders")
    parser.add_argument("--measure", choices=("collect", "main"), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:  # the child process
        sys.path.insert(0, str(args.code.resolve()))
        print(json.dumps(measure(args.measure, args.root, args.out)))
        return

    work = Path(tempfile.mkdtemp(prefix="make_tables_scale_"))
    try:
        template = args.template or make_template(work)
        rows = []
        for n in args.runs or [3000, 10000]:
            root = (args.keep or work) / f"runs{n}"
            if not root.exists():
                start = time.perf_counter()
                made = fabricate(template, root, n, args.seeds)
                print(f"fabricated {made} run folders in {root} ({time.perf_counter() - start:.1f} s)",
                      file=sys.stderr)
            calls = {"collect": ["collect"] * args.repeats, "main": ["main"]}.get(
                args.only, ["collect"] * args.repeats + ["main"])
            for i, what in enumerate(calls):
                shutil.rmtree(work / "tables", ignore_errors=True)
                if args.drop_caches:
                    os.sync()
                    Path("/proc/sys/vm/drop_caches").write_text("3\n")
                r = child(what, root, work / "tables", args.code.resolve(), work / f"home{n}-{i}")
                rows.append((n, what, r))
                print(f"{n} folders, {what} #{i + 1}: {r['seconds']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB",
                      file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"analysis/ from {args.code.resolve()}; each call a fresh process with a fresh HOME"
          f"{', the page cache emptied first' if args.drop_caches else ''}\n")
    print("| run folders | call | calls | seconds, median (min-max) | peak RSS (MB) |")
    print("|---:|---|---:|---|---:|")
    for (n, what), group in itertools.groupby(rows, key=lambda row: row[:2]):
        group = list(group)
        times = sorted(r["seconds"] for _, _, r in group)
        median = statistics.median(times)
        print(f"| {n} | {'collect' if what == 'collect' else 'make_tables.main'} | {len(times)} | "
              f"{median:.2f} ({times[0]:.2f}-{times[-1]:.2f}) | {max(r['peak_rss_mb'] for _, _, r in group):.0f} |")


if __name__ == "__main__":
    main()
