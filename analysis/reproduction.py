"""The reproduction report: each row of the seed report's tables beside our runs of exactly it.

A run counts for a seed row only when every result-affecting setting equals the preset's at the
run's own scale; other settings make it a variant row. Reduced-scale and synthetic-data runs get
rows of their own and no difference against the seed's full-scale CIFAR-10 number.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Callable

import pandas as pd
import yaml

from ablate.record import OPERATIONAL_KEYS
from analysis.tables import bootstrap_interval, short

SEED_RESULTS = Path(__file__).with_name("seed_results.yaml")
CONF = Path(__file__).resolve().parent.parent / "conf"
FULL_TRAIN_IMAGES, FULL_TEST_IMAGES = 50_000, 10_000
# Settings that shrink a run without changing what it is; the preset is composed at the run's values.
SCALE_KEYS = ("epochs", "scale", "data.train_size", "data.test_size", "data.val_size")
# Where the data lies and the precision are shown in columns of their own, never pooled across.
NOT_SETTINGS = (*OPERATIONAL_KEYS, "seed", "data.root", "precision")

Composer = Callable[[tuple, tuple], dict]  # (match items, scale overrides) -> flat resolved config


def load_seed_results(path: Path = SEED_RESULTS) -> list[dict]:
    with open(path) as fh:
        return yaml.safe_load(fh)


def hydra_composer(conf_dir: Path = CONF) -> Composer:
    """Compose a seed row's preset with this checkout's configs (cached; torch-free)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from analysis.runs import flatten

    @lru_cache(maxsize=None)
    def preset(match: tuple, scale: tuple) -> dict:
        overrides = [f"+{k}={v}" if k == "experiment" else f"{k}={v}" for k, v in match] + list(scale)
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return flatten(OmegaConf.to_container(compose("config", overrides=overrides), resolve=True))
    return preset


def settings(run: pd.Series) -> dict[str, str]:
    """A run's group choices and overrides as one mapping (what the user typed wins)."""
    return {**(run.get("choices") or {}), **(run.get("overrides") or {})}


def matches(run: pd.Series, match: dict, preset: str | None = None) -> bool:
    """The run typed the row's `match`, or chose `preset`, the one-file preset of the same row
    (+ablation=report trains +experiment=activation_relu for activation_base with relu)."""
    have = settings(run)
    if preset is not None and str(have.get("experiment")) == preset:
        return True
    return all(str(have.get(k)) == str(v) for k, v in match.items())


def scale_overrides(run: pd.Series) -> tuple:
    """The run's data source and size settings, as overrides to compose its preset with."""
    cfg = run["config"]
    values = [f"{k}={'null' if cfg.get(k) is None else cfg.get(k)}" for k in SCALE_KEYS if k in cfg]
    return (f"data={run['choices'].get('data', 'cifar10')}", *values)


def differences(run_cfg: dict, preset_cfg: dict) -> dict:
    """Result-affecting settings where the run differs from its preset (scale keys aside)."""
    keys = [k for k in {**preset_cfg, **run_cfg} if k not in NOT_SETTINGS and k not in SCALE_KEYS]
    return {k: run_cfg.get(k, "(absent)") for k in sorted(keys)
            if str(run_cfg.get(k, "(absent)")) != str(preset_cfg.get(k, "(absent)"))}


def scale_text(run: pd.Series, seed_epochs: int) -> str:
    """'full scale', 'synthetic data', or 'reduced: 3 epochs, 10000 train images, ...'."""
    if run.get("data_source") == "synthetic" or run["choices"].get("data") == "synthetic":
        return "synthetic data"
    cfg, notes = run["config"], []
    epochs = int(run.get("epochs_run") or seed_epochs)  # completed: ran every (scaled) epoch
    if epochs != seed_epochs:
        notes.append(f"{epochs} epochs")
    train = int(run.get("train_images") or 0)
    if train + int(run.get("val_images") or 0) < FULL_TRAIN_IMAGES:
        notes.append(f"{train} train images")
    elif run.get("val_images"):
        notes.append(f"{train} train + {int(run['val_images'])} validation images")
    if cfg.get("data.test_size") not in (None, FULL_TEST_IMAGES):
        notes.append(f"{cfg['data.test_size']} test images")
    return "reduced: " + ", ".join(notes) if notes else "full scale"


def _metric(run: pd.Series, name: str | None) -> float:
    if name:  # a study-specific number, e.g. the SWA model's accuracy
        value = (run.get("extra") or {}).get(name)
        return float(value) if isinstance(value, (int, float)) and 0 <= value <= 1 else math.nan
    return run["acc"]


def reproduction_table(runs: pd.DataFrame, seed_rows: list[dict], preset: Composer | None = None) -> pd.DataFrame:
    """One line per seed row and kind of run (exact, variant; full, reduced, synthetic scale);
    `preset` composes a row's preset (default: from this checkout's conf/)."""
    preset = preset or hydra_composer()
    # one run counts once, though copies of it may sit in several sweeps
    done = runs[(runs["status"] == "completed")].drop_duplicates("identity")
    out = []
    for row in seed_rows:
        match = tuple(sorted(row["match"].items()))
        ours = []
        for _, run in done.iterrows():
            if not matches(run, row["match"], row.get("preset")):
                continue
            try:
                diff = differences(run["config"], preset(match, scale_overrides(run)))
                kind = "variant: " + ", ".join(f"{k}={v}" for k, v in diff.items()) if diff else "as preset"
            except Exception as err:  # the preset no longer composes in this checkout
                kind = f"preset not composable here: {short(str(err), 60)}"
            ours.append({"kind": kind, "scale": scale_text(run, row["epochs"]),
                         "precision": str(run["config"].get("precision", "?")),
                         "data": str(run.get("data_source") or "?"),
                         "acc": _metric(run, row.get("metric")), "epochs": run["epochs_run"],
                         "best": run.get("best_test_acc") if not row.get("metric") else None})
        base = {"Table": row["table"], "Row": row["row"], "Seed (%)": row["accuracy"]}
        if not ours:
            out.append({**base, "Runs": "-", "Scale": "-", "Precision": "-", "Data": "-",
                        "Ours (%)": "not run", "95% interval": "-", "n": 0,
                        "Ours, best epoch (%)": "-", "Epochs (ours / seed)": f"- / {row['epochs']}",
                        "Difference (pts)": "-", "Difference, best epoch (pts)": "-"})
            continue
        frame = pd.DataFrame(ours)
        # exact full-scale runs first, then reduced scale, synthetic, variants
        frame["order"] = (frame["kind"] != "as preset") * 2 + (frame["scale"] != "full scale")
        groups = frame.groupby(["order", "kind", "scale", "precision", "data"], sort=True)
        for (_, kind, scale, precision, data), group in groups:
            acc = group["acc"].dropna().to_numpy(dtype=float) * 100
            mean = float(acc.mean()) if len(acc) else math.nan
            lo, hi = bootstrap_interval(acc)
            comparable = kind == "as preset" and scale == "full scale" and len(acc)
            epochs = "/".join(str(int(e)) for e in sorted(group["epochs"].dropna().unique())) or "-"
            best = pd.to_numeric(group["best"], errors="coerce").dropna() * 100
            out.append({**base, "Runs": kind, "Scale": scale, "Precision": precision, "Data": data,
                        "Ours (%)": f"{mean:.2f}" if len(acc) else "no usable accuracy",
                        "95% interval": f"[{lo:.2f}, {hi:.2f}]" if len(acc) > 1 else "-",
                        "n": len(acc),
                        "Ours, best epoch (%)": f"{best.mean():.2f}" if len(best) else "-",
                        "Epochs (ours / seed)": f"{epochs} / {row['epochs']}",
                        "Difference (pts)": f"{mean - row['accuracy']:+.2f}" if comparable else
                        "- (not comparable)",
                        # like for like: the seed's number is its best test epoch too
                        "Difference, best epoch (pts)": f"{best.mean() - row['accuracy']:+.2f}"
                        if comparable and len(best) else "-"})
    return pd.DataFrame(out)


def to_markdown(table: pd.DataFrame) -> str:
    return ("## Reproduction of the seed report\n\n" + table.to_markdown(index=False) +
            "\n\nOurs: mean over seeds with a 95% percentile-bootstrap interval of the mean (none "
            "for a single run); test accuracy at the best validation epoch when the runs held out "
            "a validation split, else after the last epoch. A run counts as the row itself ('as "
            "preset') only when every result-affecting setting equals the preset's; otherwise it "
            "is a variant, listed with the settings that differ. Only full-scale CIFAR-10 runs of "
            "the preset itself get a difference: reduced-scale and synthetic-data runs are shown "
            "apart and never pooled with them. The seed's numbers are single runs, best epoch on "
            "the test set; 'Ours, best epoch' is that selection on our runs (the highest test "
            "accuracy over epochs, which flatters as the seed's number does), beside our "
            "last-epoch number. 'Difference' is Ours minus the seed's (our last epoch, or our "
            "best validation epoch, against the seed's best test epoch: not like for like); "
            "'Difference, best epoch' compares that selection with the seed's, like for like. "
            "Runs in other precisions or on other data are listed apart.\n")
