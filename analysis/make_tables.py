"""Markdown accuracy tables and training-curve plots from every run under outputs/ and multirun/.

    python analysis/make_tables.py [--root DIR ...] [--out DIR]
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from analysis.reproduction import load_seed_results, reproduction_table
from analysis.reproduction import to_markdown as reproduction_markdown
from analysis.runs import collect
from analysis.tables import sweep_reports


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[-80:] or "runs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", action="append", type=Path,
                        help="folder to search for runs (repeatable; default: outputs and multirun)")
    parser.add_argument("--out", type=Path, default=Path("outputs/tables"),
                        help="where tables.md and the PNG plots go (default: outputs/tables)")
    args = parser.parse_args(argv)
    roots = args.root or [Path("outputs"), Path("multirun")]
    missing = [str(r) for r in roots if not r.is_dir()]
    roots = [r for r in roots if r.is_dir()]
    if missing:
        print(f"note: no such folder: {', '.join(missing)}", file=sys.stderr)
    runs, curves = collect(roots)
    if runs.empty:
        print(f"no runs found under {', '.join(map(str, roots)) or 'the given roots'}; "
              "train some with `python ablate/train.py ...` first", file=sys.stderr)
        return 1

    from analysis.plots import curves_figure  # matplotlib is slow to import; only when needed

    args.out.mkdir(parents=True, exist_ok=True)
    sections = []
    for report in sweep_reports(runs):
        name = slug(report["sweep"])
        md = report["markdown"]
        sweep_runs = runs[runs["sweep"] == report["sweep"]]
        sweep_curves = curves[curves["run_dir"].isin(sweep_runs["run_dir"])] if len(curves) else curves
        if len(sweep_curves):
            fig = curves_figure(sweep_runs, sweep_curves, report["keys"], report["sweep"])
            fig.savefig(args.out / f"{name}.png", dpi=110)
            md += f"\n![training curves]({name}.png)\n"
        sections.append(md)
    repro = reproduction_table(runs, load_seed_results())
    if (repro["n"] > 0).any():  # only when some run reproduces a row of the seed report
        sections.append(reproduction_markdown(repro))
        (args.out / "reproduction.md").write_text(sections[-1])
    text = "\n".join(sections)
    (args.out / "tables.md").write_text(text)
    print(text)
    print(f"wrote {args.out / 'tables.md'} and {len(list(args.out.glob('*.png')))} plots", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
