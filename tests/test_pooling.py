"""A row pools only seeds: runs that differ in precision or data are rows of their own, a repeated
seed counts once, and copies in another sweep never take a sweep's rows (issues 20 and 23)."""
from analysis.runs import collect
from analysis.tables import sweep_reports
from test_analysis import make_run


def _sweep(root, jobs):
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    for name, overrides, config, acc in jobs:
        make_run(root / name, overrides, acc=acc, config=config)
    return root


def _config(seed, **settings):
    return {"seed": seed, "data": {"root": settings.pop("root", "./data")}, "precision": "fp32",
            "threads": settings.pop("threads", 1), **settings}


def test_precision_and_data_root_make_rows_not_seeds(tmp_path):
    root = _sweep(tmp_path / "multirun" / "d", [
        ("p32", ["precision=fp32", "seed=0"], _config(0, precision="fp32"), 0.80),
        ("p16", ["precision=bf16", "seed=0"], _config(0, precision="bf16"), 0.81),
        ("ra", ["data.root=a", "seed=0"], _config(0, root="a"), 0.70),
        ("rb", ["data.root=b", "seed=0"], _config(0, root="b"), 0.71)])
    (report,) = sweep_reports(collect([root])[0])
    table = report["table"]
    assert len(table) == 4 and list(table["n"]) == [1, 1, 1, 1]
    assert {"precision", "data.root"} <= set(report["keys"])


def test_rows_an_override_cannot_tell_apart_get_the_setting_that_differs(tmp_path):
    # precision=auto resolved to fp32 on one machine and bf16 on another: nothing typed differs
    root = _sweep(tmp_path / "multirun" / "auto", [
        ("a", ["seed=0"], _config(0, precision="fp32"), 0.80),
        ("b", ["seed=0"], _config(0, precision="bf16"), 0.81)])
    (report,) = sweep_reports(collect([root])[0])
    assert report["keys"] == ["precision"]
    assert sorted(report["table"]["precision"]) == ["bf16", "fp32"]
    assert list(report["table"]["n"]) == [1, 1]


def test_a_repeated_seed_is_one_run_whatever_the_plumbing(tmp_path):
    root = _sweep(tmp_path / "multirun" / "rep", [
        ("a", ["seed=0", "threads=1"], _config(0, threads=1), 0.80),
        ("b", ["seed=0", "threads=2"], _config(0, threads=2), 0.80),
        ("c", ["seed=1"], _config(1), 0.82)])
    runs, _ = collect([root])
    (report,) = sweep_reports(runs)
    assert list(report["table"]["n"]) == [2]  # seeds 0 and 1; the second seed-0 run is a copy
    assert (runs["status"] == "duplicate").sum() == 1


def test_copies_in_another_sweep_keep_both_sweeps_rows(tmp_path):
    jobs = [(f"s{s}", [f"seed={s}"], _config(s), 0.8 + s / 100) for s in range(3)]
    a = _sweep(tmp_path / "multirun" / "a", jobs)
    _sweep(tmp_path / "multirun" / "b", jobs)
    runs, _ = collect([a.parent])
    reports = sweep_reports(runs)
    assert [list(r["table"]["n"]) for r in reports] == [[3], [3]]
    assert "also exist, with the same settings and seed, in" in reports[0]["markdown"]
