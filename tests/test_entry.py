"""The entry point refuses what it cannot run in one line and leaves nothing behind; a sweep job
that already ran under another folder name is that run."""
from __future__ import annotations

import pytest

from analysis.runs import collect
from conftest import TINY, run_script

ONE = [*TINY, "epochs=1", "data.train_size=200", "data.test_size=100", "save_weights=false"]


@pytest.mark.slow
def test_a_sweep_config_without_multirun_is_refused_in_one_line(tmp_path):
    proc = run_script("ablate/train.py", "+ablation=activation", *ONE, f"hydra.run.dir={tmp_path / 'run'}",
                      check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: this config is a sweep (") and "run it with -m: python ablate/train.py -m" in last
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


@pytest.mark.slow
@pytest.mark.parametrize("override, said", [("+epoch=1", "did you mean `epochs`?"),
                                            ("device=gpu", "device='gpu'")])
def test_a_refused_run_leaves_no_folder(tmp_path, override, said):
    run_dir = tmp_path / "outputs" / "run"
    proc = run_script("ablate/train.py", *ONE, override, f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == 1 and said in proc.stderr.strip().splitlines()[-1]
    assert not run_dir.exists()


@pytest.mark.slow
def test_a_sweep_rerun_with_a_new_key_does_not_retrain_the_job_it_already_ran(tmp_path):
    sweep = tmp_path / "smoke"
    run_script("ablate/train.py", "-m", "loss=ce", *ONE, f"hydra.sweep.dir={sweep}")
    out = run_script("ablate/train.py", "-m", "loss=ce", *ONE, "seed=0,1", f"hydra.sweep.dir={sweep}")
    text = out.stdout + out.stderr
    assert "2 jobs: 1 completed, 1 skipped" in text and "the same config already completed in" in text
    runs, _ = collect([sweep])
    assert sorted(runs["seed"]) == [0, 1] and (runs["status"] == "completed").all()
    assert len(list(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))) == 2


@pytest.mark.slow
def test_a_mistyped_data_root_whose_download_fails_leaves_no_folder(tmp_path):
    root = tmp_path / "cifar_typo"
    # a proxy nobody answers: the download fails at once, with or without a network
    proxy = {k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
    with pytest.MonkeyPatch.context() as env:
        for key, value in proxy.items():
            env.setenv(key, value)
        proc = run_script("ablate/train.py", "model.filters=[8,16,32]", "epochs=1", f"data.root={root}",
                          f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 1 and "CIFAR-10 not found in" in proc.stderr.strip().splitlines()[-1]
    assert not root.exists()  # the download failed, and the folder it made is gone
