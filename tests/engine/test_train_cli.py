"""`python train.py` as users run it: the default run, bad input, multirun, W&B offline read-back."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fisherbench.core.store import iter_run_dirs
from fisherbench.results.wandb_offline import find_run_files, read_run

REPO = Path(__file__).resolve().parents[2]
TRAIN = [sys.executable, str(REPO / "train.py")]
TINY = ["model=small_cnn", "model.width=4", "model.hidden=16", "data=synthetic_image", "data.shape=[3,8,8]",
        "data.num_train=32", "data.num_test=16", "data.batch_size=16", "optimizer=adam"]


def train(*args, cwd, env=None):
    return subprocess.run([*TRAIN, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_default_run_end_to_end_on_a_tiny_budget(tmp_path):
    """The default composition (small CNN on the real MNIST-5k digits), cut to 12 steps."""
    p = train("budget=steps", "budget.steps=12", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    line = p.stdout.strip().splitlines()[-1]
    assert line.startswith("[fisherbench] completed")
    for part in ("best test/acc1", "epochs", "train", "eval", "wall", " runs/"):
        assert part in line
    (run,) = list(iter_run_dirs(tmp_path / "runs"))
    s = run.summary()
    assert s["data"] == "mnist5k" and s["model"] == "small_cnn" and s["steps"] == 12
    assert run.meta()["dataset"]["num_train"] == 4000
    assert s["final"]["test/acc1"] > 0.2  # 12 steps on real digits already beat chance (0.1)


@pytest.mark.parametrize(
    "args, message",
    [
        (["optimizer.lrr=0.1"], "Valid keys in optimizer: name, lr,"),  # composition error, explained
        (["data=cifar10", "data.download=false"], "data.download"),  # missing dataset files
        (["results_dir=/proc/forbidden"], "results_dir /proc/forbidden is not writable"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(tmp_path, args, message):
    base = [a for a in TINY if not (a.startswith("data") and any(x.startswith("data=") for x in args))]
    if not any(a.startswith("results_dir") for a in args):
        args = [*args, f"results_dir={tmp_path / 'runs'}"]
    p = train(*base, *args, cwd=tmp_path)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "configuration error" in p.stderr
    assert message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert not list(iter_run_dirs(tmp_path / "runs"))  # nothing that looks like a run


def test_multirun_runs_every_job(tmp_path):
    p = train("-m", *TINY, "budget=steps", "budget.steps=2", "seed=0,1", "optimizer=adam,sgd",
              f"results_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    runs = list(iter_run_dirs(tmp_path / "runs"))
    assert len(runs) == 4
    assert sorted((r.summary()["optimizer"], r.summary()["seed"]) for r in runs) == [
        ("adam", 0), ("adam", 1), ("sgd", 0), ("sgd", 1)]
    assert not (tmp_path / "multirun.yaml").exists()  # Hydra's sweep record goes under results_dir


def test_wandb_offline_mirrors_the_store(tmp_path):
    p = train(*TINY, "budget=steps", "budget.steps=4", "logger=wandb", "logger.mode=offline",
              f"results_dir={tmp_path / 'runs'}", cwd=tmp_path, env={"WANDB_SILENT": "true"})
    assert p.returncode == 0, p.stderr
    (run,) = list(iter_run_dirs(tmp_path / "runs"))
    (wandb_file,) = find_run_files(run.path)
    record = read_run(wandb_file)
    assert record["run_id"] == run.run_id  # the W&B id is the store's run id (resume continues it)
    metrics = run.metrics()
    logged = [h for h in record["history"] if "test/acc1" in h]
    assert [h["test/acc1"] for h in logged] == [m["test/acc1"] for m in metrics]
    assert [h["_step"] for h in logged] == [m["step"] for m in metrics]
    assert record["config"]["optimizer"]["name"] == "adam"
    summary = run.summary()
    assert record["summary"]["status"] == "completed"
    assert record["summary"]["ledger.train_s"] == pytest.approx(summary["ledger"]["train_s"])


def test_help_lists_only_the_groups_train_accepts(tmp_path):
    p = train("--help", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    for group in ("model:", "data:", "optimizer:", "budget:", "logger:", "experiment:"):
        assert group in p.stdout
    for internal in ("schema/", "sweep:", " _cifar", "_fixed", "_networks"):
        assert internal not in p.stdout
    assert "debug" in p.stdout and "name: small_cnn" in p.stdout


@pytest.mark.parametrize("combo", [["model=tiny_vit", "data=synthetic_image", "optimizer=kfac"],
                                   ["model=tiny_gpt", "data=synthetic_tokens", "optimizer=adafisherw"]])
def test_debug_preset_smoke_tests_any_combination(tmp_path, combo):
    p = train("experiment=debug", *combo, f"results_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "(4 steps)" in p.stdout


def test_without_a_terminal_a_run_prints_one_line_per_evaluation(tmp_path):
    p = train("experiment=debug", "budget.steps=6", "eval.every_fraction=0.5", f"results_dir={tmp_path / 'runs'}",
              cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("[fisherbench] eval ")]
    assert [line.split(" · ")[0] for line in lines] == ["[fisherbench] eval 0", "[fisherbench] eval 1"]
    assert "step 3" in lines[0] and "test/acc1" in lines[0]
    quiet = train("experiment=debug", "budget.steps=6", "seed=1", "logger.progress=never",
                  f"results_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert "[fisherbench] eval" not in quiet.stderr
