"""benchmarks/gpu_suite.py: its scheduling, its choices, and a whole dry run on the CPU."""
from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch
import yaml

from analysis.reproduction import SEED_RESULTS
from analysis.runs import parse_override
from benchmarks import gpu_suite
from benchmarks import suite_accuracy as accuracy
from conftest import run_script


def sleeper(seconds: float) -> list[str]:
    return [sys.executable, "-c", f"import time; time.sleep({seconds})"]


@pytest.mark.slow
def test_pool_skips_what_cannot_finish_and_stops_what_overruns(tmp_path):
    quick, big, slow = (accuracy.Row(t, t, (), 1, "cnn") for t in ("quick", "big", "slow"))
    units = [accuracy.Unit(quick, (0,)), accuracy.Unit(quick, (1,)), accuracy.Unit(big, (0,)),
             accuracy.Unit(slow, (0,))]
    sleeps = {"quick": 0.1, "big": 0.1, "slow": 60}
    estimates = {"quick": 0.5, "big": 100, "slow": 1}
    done = []
    pool = accuracy.Pool(units, slots=2, deadline=time.monotonic() + 6, work=tmp_path,
                         make_command=lambda u: sleeper(sleeps[u.row.table]),
                         estimate=lambda u: estimates[u.row.table],
                         on_table_done=done.append, log=lambda _: None, grace_s=2)
    start = time.monotonic()
    pool.run()
    assert [u.status for u in units] == ["finished", "finished", "skipped", "stopped"]
    assert "left" in units[2].why and units[3].why == "stopped at the deadline"
    assert units[3].returncode != 0 and units[3].proc.poll() is not None  # really ended
    assert done == ["quick"]  # a table with nothing finished is not analysed
    assert time.monotonic() - start < 6 + 2 + 3


def test_a_stopped_suite_leaves_no_run_behind(tmp_path):
    row = accuracy.Row("slow", "slow", (), 1, "cnn")
    units = [accuracy.Unit(row, (0,)), accuracy.Unit(row, (1,)), accuracy.Unit(row, (2,))]
    started = time.monotonic()

    def tick():  # the suite gets SIGTERM (gpu_suite turns it into SystemExit) a second in
        if time.monotonic() - started > 1:
            raise SystemExit(143)

    pool = accuracy.Pool(units, slots=2, deadline=time.monotonic() + 60, work=tmp_path,
                         make_command=lambda u: sleeper(60), estimate=lambda u: 1.0,
                         on_table_done=lambda t: None, on_tick=tick, log=lambda _: None, grace_s=2)
    with pytest.raises(SystemExit):
        pool.run()
    assert [u.status for u in units] == ["stopped", "stopped", "skipped"]  # 2 slots
    assert all(u.why == "the suite itself was stopped" for u in units)
    assert all(u.proc.poll() is not None for u in units[:2])
    assert time.monotonic() - started < 10


def test_units_keep_the_issue_order_and_one_folder_per_row_and_seed(tmp_path):
    units = accuracy.make_units(["activation", "loss"], [0, 1, 2], seeds_per_unit=1)
    assert len(units) == 3 * 3 + 4 * 3
    assert [(u.row.name, u.seeds) for u in units[:4]] == [
        ("leaky_relu", (0,)), ("leaky_relu", (1,)), ("leaky_relu", (2,)), ("relu", (0,))]
    grouped = accuracy.make_units(["activation"], [0, 1, 2], seeds_per_unit=3)
    cmd = accuracy.command(grouped[1], tmp_path, ["device=cpu"], tiny=True)
    assert "+experiment=activation_base" in cmd and "model/activation=relu" in cmd
    assert "seed=0,1,2" in cmd and "model.filters=[8,16,32]" in cmd
    assert f"hydra.sweep.dir={tmp_path / 'runs' / 'activation'}" in cmd
    assert "hydra.sweep.subdir=relu_s${seed}" in cmd


def test_every_row_of_the_seed_report_is_planned():
    planned = [dict(parse_override(o) for o in row.overrides)
               for rows in accuracy.TABLES.values() for row in rows]
    for seed_row in yaml.safe_load(SEED_RESULTS.read_text()):
        assert any(all(p.get(k) == v for k, v in seed_row["match"].items()) for p in planned), seed_row
    assert list(accuracy.TABLES) == ["activation", "optimizer", "scheduler", "loss", "best",
                                     "bn_study", "swa", "resnet_adamw"]


def speed_rows(eager_s: float, compiled_s: float, compile_setup_s: float) -> dict:
    row = {"model": "cnn", "images_per_s": 50_000 / eager_s}
    return {"pipelines": [{**row, "pipeline": "project", "s_per_50k": eager_s, "setup_s": 1.0},
                          {**row, "pipeline": "compiled", "s_per_50k": compiled_s,
                           "setup_s": compile_setup_s}],
            "concurrent": [{"runs": 1, "aggregate_images_per_s": 100.0},
                           {"runs": 2, "aggregate_images_per_s": 190.0},
                           {"runs": 4, "aggregate_images_per_s": 300.0},
                           {"runs": 8, "aggregate_images_per_s": 310.0}],
            "fused": []}


def test_compile_only_where_its_warm_up_pays_off():
    # 50 epochs: saving 1 s per epoch repays a 30 s compile (x1.5 for the eval graph), not a 60 s one
    assert gpu_suite.choose_compile(speed_rows(2.0, 1.0, 30.0), "cnn", 50)
    assert not gpu_suite.choose_compile(speed_rows(2.0, 1.0, 60.0), "cnn", 50)
    assert not gpu_suite.choose_compile(speed_rows(2.0, 1.0, 30.0), "resnet18", 50)  # unmeasured


def test_runs_at_once_finish_the_most_runs_in_the_time_left(tmp_path):
    args = gpu_suite.parse_args(["--out", str(tmp_path), "--device", "cpu", "--tables", "activation"])
    stage1 = speed_rows(2.0, 1.0, 30.0)  # alone 25,000 images/s: 2.13 s per epoch with the test set
    assert gpu_suite.concurrency_efficiency(stage1, 4) == 300.0 / (4 * 100.0)
    # A 50-epoch run (8 s start-up) takes 115 s alone, 120 s with 2 at once, 150 s with 4, 283 s
    # with 8; the activation table has 9 runs.
    def slots(seconds):
        return gpu_suite.plan(args, stage1, seconds)["slots"]
    assert slots(1000) == 8  # 9 runs finish with 2, 4 or 8 at once: 8 has the best aggregate
    assert slots(300) == 8   # 8 runs finish with 4 at once (two waves) or 8 (one)
    assert slots(200) == 4   # 4 finish, against 2 with 2 at once and none with 8
    assert slots(130) == 2
    assert slots(115) == 1   # only a run alone finishes
    the_plan = gpu_suite.plan(args, stage1, 200)
    assert the_plan["efficiency"] == 0.75 and "4 run(s) of the first table" in the_plan["slots_why"]


def test_a_rows_seeds_are_fused_only_where_fusing_measured_faster(tmp_path, monkeypatch):
    args = gpu_suite.parse_args(["--out", str(tmp_path), "--device", "cpu", "--tables", "activation"])
    stage1 = speed_rows(2.0, 1.0, 30.0)
    stage1["fused"] = [{"members": 3, "aggregate_images_per_s": 900.0}]
    monkeypatch.setattr(gpu_suite, "fused_launcher_here", lambda: True)
    the_plan = gpu_suite.plan(args, stage1, 1000)
    assert the_plan["fused"] and the_plan["seeds_per_process"] == 3
    unit = accuracy.make_units(args.tables, args.seeds, the_plan["seeds_per_process"])[0]
    cmd = gpu_suite.unit_command(args, the_plan, tmp_path, unit)
    assert "hydra/launcher=fused" in cmd and "seed=0,1,2" in cmd
    stage1["fused"] = [{"members": 3, "aggregate_images_per_s": 200.0}]  # slower than 4 separate
    assert not gpu_suite.plan(args, stage1, 1000)["fused"]
    monkeypatch.setattr(gpu_suite, "fused_launcher_here", lambda: False)  # not in this checkout
    stage1["fused"] = [{"members": 3, "aggregate_images_per_s": 900.0}]
    the_plan = gpu_suite.plan(args, stage1, 1000)
    assert not the_plan["fused"] and the_plan["seeds_per_process"] == 1
    unit = accuracy.make_units(["activation"], [0, 1, 2], 1)[0]
    cmd = gpu_suite.unit_command(args, the_plan, tmp_path, unit)
    assert not any("launcher" in c for c in cmd) and "seed=0" in cmd
    assert f"threads={max(1, (os.cpu_count() or 1) // the_plan['slots'])}" in cmd  # runs share the cores


def test_the_fused_hook_calls_throughput_measure_fused_as_throughput_does(monkeypatch):
    from benchmarks import suite_speed, throughput

    calls = []

    def measure_fused(args, data, device, n):  # the fused branch's signature
        calls.append((args.filters, len(data.train_y), device.type, n))
        return {"members": n, "aggregate_images_per_s": 123.0}

    monkeypatch.setattr(throughput, "measure_fused", measure_fused, raising=False)
    sent = []
    settings = suite_speed.Settings(device="cpu", images=64, tiny=True)
    suite_speed.fused_worker(4, settings, type("Queue", (), {"put": staticmethod(sent.append)}))
    assert calls == [("8,16,32", 64, "cpu", 4)]
    assert sent == [{"model": "cnn", "label": "tiny CNN (8,16,32), the seed CNN's stand-in", "members": 4,
                     "aggregate_images_per_s": 123.0, "peak_mem_mb": None}, None]


def test_published_tables_keep_at_most_three_curve_pngs(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "analysis").mkdir(parents=True)
    out.mkdir()
    for name in "abcd":
        (work / "analysis" / f"{name}.png").write_bytes(b"png")
    (work / "analysis" / "tables.md").write_text(
        "".join(f"### {n}\n![training curves]({n}.png)\n" for n in "abcd"))
    (work / "analysis" / "reproduction.md").write_text("## Reproduction\n")
    (out / "curves_z.png").write_bytes(b"from an earlier publish")
    gpu_suite.Analysis(work, out).publish()
    assert sorted(p.name for p in out.iterdir()) == [
        "curves_a.png", "curves_b.png", "curves_c.png", "reproduction.md", "tables.md"]
    tables = (out / "tables.md").read_text()
    assert "![training curves](curves_c.png)" in tables and "d.png in the work folder" in tables


@pytest.mark.slow
def test_dry_run_writes_its_files_and_tables(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    # Two tables, done in about a minute on two idle cores; the budget leaves room for a busy
    # machine (the suite ends when its work is done, not when the budget is). On a very busy one
    # the later measurements and rows are skipped, as on a GPU that runs out of time.
    run_script("benchmarks/gpu_suite.py", "--dry-run", "--out", str(out), "--work", str(work),
               "--tables", "activation,swa", "--budget-s", "180", "--stage1-s", "100", timeout=300)
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).stat().st_size < 200_000 for f in files), files
    assert {"results.json", "throughput.md", "throughput.png", "tables.md",
            "reproduction.md"} <= set(files)
    result = json.loads((out / "results.json").read_text())
    speed = result["speed"]
    measured = {(r["model"], r["pipeline"]) for r in speed["pipelines"]}
    assert ("cnn", "plain") in measured and ("cnn", "project") in measured
    assert all(r["images_per_s"] > 0 and r["peak_mem_mb"] is None for r in speed["pipelines"])
    assert [c["runs"] for c in speed["concurrent"]][:1] == [1]
    # fused members: measured, or listed as not measured (over their share on a busy machine)
    assert speed["fused"] or any("fused" in s for s in speed["skipped"])
    assert all(r["aggregate_images_per_s"] > 0 for r in speed["fused"])
    for model in ("cnn_wide", "resnet18", "vgg_a"):  # measured, or listed as not measured
        assert (model, "project") in measured or any(model in s for s in speed["skipped"])
    assert result["plan"]["slots"] >= 1 and result["plan"]["compile"] == {"activation": False,
                                                                          "swa": False}

    units = result["units"]
    assert [(u["table"], u["row"]) for u in units] == [
        ("activation", "leaky_relu"), ("activation", "relu"), ("activation", "elu"), ("swa", "swa")]
    assert units[0]["status"] == "finished"
    assert all(u["status"] == "finished" or u["status"] == "skipped" and "left" in u["why"]
               for u in units)
    finished = [f"{u['table']}/{u['row']}_s{s}" for u in units if u["status"] == "finished"
                for s in u["seeds"]]
    assert sorted(r["run"] for r in result["runs"]) == sorted(finished)
    assert all(r["status"] == "completed" and r["epochs_run"] == 1 for r in result["runs"])
    assert all(r["swa_test_acc"] is not None for r in result["runs"] if r["run"].startswith("swa/"))

    assert len(result["tables"]["activation"]) == sum(u["status"] == "finished" for u in units[:3])
    repro = {r["Row"]: r for r in result["reproduction"]}
    assert repro["LeakyReLU"]["n"] == 3 and repro["SGD"]["n"] == 0
    tables = (out / "tables.md").read_text()
    assert "### activation" in tables and "leaky_relu" in tables
    assert "![training curves](curves_activation.png)" in tables and "curves_activation.png" in files
    assert "synthetic data" in (out / "reproduction.md").read_text()  # labelled reduced scale
    speed_md = (out / "throughput.md").read_text()
    assert "seed CNN" in speed_md and "seed CNN (64,128,256)" not in speed_md  # the stand-in, named as such
    assert "tiny CNN (8,16,32)" in speed_md and "range of 3" in speed_md
    # 128 images in batches of 128: every figure is flagged, and the plan stands on its defaults
    assert all(r["few_batches"] and r["repeats"] == 3 for r in speed["pipelines"])
    assert result["plan"]["left_out"] and "Left out of the plan" in speed_md


# ----------------------------------------------------------------------------- noise

def test_a_figure_is_the_median_of_interleaved_repetitions_with_its_spread():
    from benchmarks import throughput

    calls = []

    def epoch(name, seconds):
        def one_epoch():
            calls.append(name)
            time.sleep(seconds)
            return 64 * 20
        return one_epoch

    args = throughput.parse_args(["--device", "cpu", "--images", "1280", "--batch-size", "64"])
    assert (args.repeats, args.epochs) == (3, 1)
    out = throughput.interleaved({"a": epoch("a", 0.02), "b": epoch("b", 0.04)}, args, torch.device("cpu"))
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-ups, then each repetition times both in turn
    assert out["a"]["repeats"] == 3 and out["a"]["timed_batches"] == 20 and not out["a"]["few_batches"]
    assert out["a"]["images_per_s_min"] <= out["a"]["images_per_s"] <= out["a"]["images_per_s_max"]
    assert out["a"]["images_per_s"] > out["b"]["images_per_s"]
    stats = throughput.spread_stats([100.0, 130.0, 95.0], batches=12)
    assert stats["images_per_s"] == 100.0 and stats["spread"] == pytest.approx(0.35)
    assert stats["noisy"] and stats["few_batches"]
    assert stats["flags"] == ["noisy: spread 35% > 25%", "few batches: 12 < 20 timed per repetition"]
    assert not throughput.spread_stats([100.0, 110.0, 105.0], batches=20)["flags"]


def test_too_few_batches_or_repetitions_are_refused_unless_asked(capsys):
    from benchmarks import throughput

    with pytest.raises(SystemExit):
        throughput.parse_args(["--images", "512", "--batch-size", "64"])  # 8 batches
    assert "8 timed batches per repetition, fewer than 20" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        throughput.parse_args(["--images", "5120", "--repeats", "2"])
    assert throughput.parse_args(["--images", "512", "--batch-size", "64", "--allow-few-batches"]).images == 512


def test_concurrent_figures_are_medians_over_repetitions():
    from benchmarks import throughput

    reps = [[{"images": 100, "start": 0.0, "end": 1.0}, {"images": 100, "start": 10.0, "end": 12.0},
             {"images": 100, "start": 20.0, "end": 21.0}],
            [{"images": 100, "start": 0.0, "end": 1.0}, {"images": 100, "start": 10.0, "end": 11.0},
             {"images": 100, "start": 20.0, "end": 21.0}]]
    row = throughput.concurrent_stats(reps, batches=40)
    assert row["aggregate_images_per_s"] == 200.0 and row["aggregate_images_per_s_min"] == 100.0
    assert row["noisy"] and row["repeats"] == 3 and row["wall_s"] == 1.0


def test_the_plan_stands_on_no_noisy_figure(tmp_path):
    args = gpu_suite.parse_args(["--out", str(tmp_path), "--device", "cpu", "--tables", "activation"])
    stage1 = speed_rows(2.0, 1.0, 30.0)
    noisy = {"noisy": True, "flags": ["noisy: spread 40% > 25%"]}
    stage1["concurrent"][2].update(noisy)  # 4 at once: noisy
    assert gpu_suite.plan(args, stage1, 200)["slots"] == 2  # the best of what is left
    for c in stage1["concurrent"]:
        c.update(noisy)
    the_plan = gpu_suite.plan(args, stage1, 1000)
    assert the_plan["slots"] == 1 and "to trust" in the_plan["slots_why"]
    assert len(the_plan["left_out"]) == 4 and "x4 at once (noisy: spread 40% > 25%)" in the_plan["left_out"][2]
    assert gpu_suite.choose_compile(stage1, "cnn", 50)
    stage1["pipelines"][1].update(noisy)  # the compiled figure is noisy: no compile on its strength
    assert not gpu_suite.choose_compile(stage1, "cnn", 50)
    stage1["fused"] = [{"members": 3, "aggregate_images_per_s": 900.0, "few_batches": True}]
    assert not gpu_suite.choose_fused(stage1, 3)


def test_speed_tables_name_what_ran():
    from benchmarks import suite_speed

    assert suite_speed.label("cnn", tiny=False, params=2_500_000) == "seed CNN (64,128,256), 2.5M params"
    assert "seed CNN (64,128,256)" not in suite_speed.label("cnn", tiny=True)
    row = {"model": "cnn", "label": suite_speed.label("resnet18", tiny=True), "pipeline": "project",
           "images_per_s": 100.0, "images_per_s_min": 90.0, "images_per_s_max": 140.0, "spread": 0.5,
           "noisy": True, "flags": ["noisy: spread 50% > 25%"], "s_per_50k": 500.0, "setup_s": 0.0,
           "peak_mem_mb": None, "x_plain": None}
    stage1 = {"settings": {"workers": 0, "images": 128, "batch_size": 128, "warmup": 1, "epochs": 1,
                           "repeats": 3},
              "pipelines": [row], "concurrent": [], "fused": [], "skipped": []}
    text = gpu_suite.speed_markdown(stage1, None, "cpu")
    assert "ResNet-18 at width 4" in text and "90-140 (50%)" in text and "noisy: spread 50%" in text


@pytest.mark.parametrize("argv, message", [
    (["--budget-s", "nan"], "--budget-s must be a number > 0, not nan"),
    (["--budget-s", "0"], "--budget-s must be a number > 0, not 0.0"),
    (["--budget-s", "-5"], "--budget-s must be a number > 0, not -5.0"),
    (["--concurrency", "0"], "--concurrency counts runs at once: each must be >= 1"),
    (["--concurrency", "1,x"], "--concurrency must be comma-separated whole numbers"),
    (["--seeds", ""], "--seeds must be comma-separated whole numbers"),
    (["--seeds", "0,0"], "--seeds repeats a value"),
    (["--images", "0"], "--images must be >= 1, not 0"),
])
def test_bad_options_are_refused_in_one_line_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        gpu_suite.parse_args(["--out", str(tmp_path / "out"), "--dry-run", *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_an_out_that_is_a_file_or_cannot_be_written_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "file", "is a file, not a folder"),
                         (tmp_path / "file" / "sub", "cannot be written")):
        with pytest.raises(SystemExit):
            gpu_suite.parse_args(["--out", str(out), "--dry-run"])
        assert message in capsys.readouterr().err
