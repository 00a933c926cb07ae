"""Markdown accuracy tables and training-curve plots from every run under the given roots.

    python analysis/make_tables.py [--root DIR ...] [--out DIR] [--tune KEY ...] [--plan]
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from analysis.plan import plan_markdown, plan_table
from analysis.reproduction import hydra_composer, load_seed_results, reproduction_table
from analysis.reproduction import to_markdown as reproduction_markdown
from analysis.runs import collect, printable
from analysis.tables import sweep_reports
from analysis.tuning import TuningError, budget_curves, tuned_markdown, tuned_table, tuned_title

MANIFEST = ".written"  # what the last call wrote into its output folder, to clear it next time


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[-80:] or "runs"


def unique(name: str, taken: list[str]) -> str:
    """`name`, or name_2, name_3, ... when two sweep folders share a name."""
    stem, k = name.removesuffix(".png"), 2
    while name in taken:
        name, k = f"{stem}_{k}.png", k + 1
    return name


def default_out(roots: list[Path]) -> Path:
    """<root>/tables for one root; for several (or the defaults), outputs/tables."""
    return roots[0] / "tables" if len(roots) == 1 else Path("outputs/tables")


def prepare_out(out: Path) -> None:
    """An output folder that will hold exactly what this call writes: the files of the previous
    call (listed in its manifest) go; a folder holding anything else is refused, not emptied."""
    if out.is_dir():
        if (out / MANIFEST).exists():
            listed = set((out / MANIFEST).read_text().split("\n"))
        else:  # a folder from before manifests: tables.md beside its reproduction.md and plots
            listed = {p.name for p in out.glob("*.png")} | {"tables.md", "reproduction.md"} \
                if (out / "tables.md").exists() else set()
        # other tools' subfolders (e.g. bn_study's --out DIR/bn) are left alone; loose files are not ours
        foreign = [p.name for p in out.iterdir() if p.is_file() and p.name not in listed | {MANIFEST}]
        if foreign:
            raise SystemExit(f"error: {out} holds files this tool did not write ({', '.join(foreign[:3])}); "
                             "choose another --out")
        for name in listed:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def tuned_reports(runs, reports: list[dict], tune: list[str]) -> dict:
    """sweep -> (tuned table, budget curves) for every sweep that swept all of `tune`."""
    if not tune:
        return {}
    out = {}
    for report in reports:
        if all(k in report["keys"] for k in tune):
            group = runs[runs["sweep"] == report["sweep"]]
            report["arms"] = [k for k in report["keys"] if k not in tune]
            out[report["sweep"]] = (tuned_table(group, report["keys"], tune),
                                    budget_curves(group, report["keys"], tune))
    if not out:
        swept = sorted({k for r in reports for k in r["keys"]})
        raise TuningError(f"no sweep swept {', '.join(tune)} (swept keys: {', '.join(swept) or 'none'})")
    return out


def save(fig, path: Path) -> None:
    """Write a figure and free it: a call over many sweeps would otherwise hold every one."""
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def write_reports(out: Path, runs, frames: dict, reports: list[dict], tuned: dict,
                  tune: list[str]) -> tuple[str, list[str]]:
    """Write tables.md (with reproduction.md when some run reproduces the seed report) and the
    plots into `out`; returns the markdown and the names written."""
    from analysis.plots import curves_figure  # matplotlib is slow to import; only when needed
    from analysis.tuning import budget_figure

    prepare_out(out)
    written, sections, curves = [], [], frames["metrics"]
    for report in reports:
        md = report["markdown"]
        sweep_runs = runs[runs["sweep"] == report["sweep"]]
        sweep_curves = curves[curves["run_dir"].isin(sweep_runs["run_dir"])]
        if len(report["table"]) and len(sweep_curves):
            name = unique(f"{slug(Path(report['sweep']).name)}.png", written)
            save(curves_figure(sweep_runs, sweep_curves, report["keys"], report["title"]), out / name)
            written.append(name)
            md += f"\n![training curves]({name})\n"
        if report["sweep"] in tuned:
            table, budget = tuned[report["sweep"]]
            title = tuned_title(table, report["arms"], tune)
            name = unique(f"{slug(Path(report['sweep']).name)}_budget.png", written)
            save(budget_figure(budget, report["arms"], tune, title), out / name)
            written.append(name)
            md += "\n" + tuned_markdown(table, report["arms"], tune, title)
            md += f"\n![budget curves]({name})\n"
        sections.append(md)
    repro = reproduction_table(runs, load_seed_results(), hydra_composer())
    if (repro["n"] > 0).any():  # only when some run reproduces a row of the seed report
        sections.append(printable(reproduction_markdown(repro)))
        (out / "reproduction.md").write_text(sections[-1])
        written.append("reproduction.md")
    text = printable("\n".join(sections))
    (out / "tables.md").write_text(text)
    written.append("tables.md")
    (out / MANIFEST).write_text("\n".join(written))
    return text, written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", action="append", type=Path,
                        help="folder to search for runs (repeatable; default: outputs and multirun)")
    parser.add_argument("--out", type=Path, help="where tables.md and the PNG plots go "
                        "(default: <root>/tables for one root, else outputs/tables)")
    parser.add_argument("--tune", action="append", default=[], metavar="KEY",
                        help="a swept key to tune per arm on validation accuracy (repeatable), "
                             "e.g. optim.lr; adds a tuned table and a budget plot per sweep")
    parser.add_argument("--plan", action="store_true",
                        help="for each row whose verdict against the best is open, estimate how many "
                             "more seeds would settle it and print the command that adds them")
    args = parser.parse_args(argv)
    roots = args.root or [Path("outputs"), Path("multirun")]
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        print(f"note: no such folder: {', '.join(missing)}", file=sys.stderr)
    runs, frames = collect([r for r in roots if r.is_dir()])
    if runs.empty:
        print(f"no runs found under {', '.join(map(str, roots))}; "
              "train some with `python ablate/train.py ...` first", file=sys.stderr)
        return 1

    reports = sweep_reports(runs)
    if args.plan:
        # a sweep with any trial of a tuning sweeper (optuna) is a study, not seeded rows
        kinds = runs.groupby("sweep")["sweep_kind"].agg(
            lambda k: next((x for x in k if isinstance(x, str) and x not in ("grid", "single")), k.iloc[0]))
        for report in reports:
            comparisons = max(len(report["table"]) - 1, 1)
            plan = plan_table(report["table"], report["sweep"], report["keys"], kinds[report["sweep"]])
            report["markdown"] += "\n" + plan_markdown(plan, report["sweep"], comparisons)
    try:  # before anything is written: a sweep that cannot be tuned fairly stops the call
        tuned = tuned_reports(runs, reports, args.tune)
    except TuningError as err:
        raise SystemExit(f"error: {err}") from None
    out = args.out or default_out(roots)
    try:  # a read-only or full --out: one line, not a traceback
        text, written = write_reports(out, runs, frames, reports, tuned, args.tune)
    except OSError as err:
        raise SystemExit(f"error: cannot write the tables to {out}: "
                         f"{err.strerror or err}{f' ({err.filename})' if err.filename else ''}") from None
    print(text)
    plots = sum(name.endswith(".png") for name in written)
    print(f"wrote {', '.join(n for n in written if n.endswith('.md'))} and {plots} "
          f"plot{'s' * (plots != 1)} to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
