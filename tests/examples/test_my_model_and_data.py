"""examples/my_model_and_data: an own model and an own dataset train like built-ins, from a copy of the folder."""
import shutil
from pathlib import Path

from fisherbench.core import plugins
from fisherbench.core.store import iter_run_dirs
from fisherbench.engine.compose import compose_config
from fisherbench.engine.lifecycle import run

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "my_model_and_data"


def test_own_model_and_dataset_train_and_are_recorded_by_name(tmp_path, monkeypatch):
    folder = tmp_path / "my_model_and_data"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.syspath_prepend(str(folder))  # what `export PYTHONPATH=...` does for the command line
    monkeypatch.setenv(plugins.CONFIG_PATH_ENV, str(folder / "conf"))
    cfg = compose_config(["model=mlp", "data=blobs", "optimizer=adam", "budget=epochs", "budget.epochs=2",
                          "data.spread=1.0", f"results_dir={tmp_path / 'runs'}", "logger.progress=never"])
    result = run(cfg)
    assert result.status == "completed"
    (rd,) = list(iter_run_dirs(tmp_path / "runs"))
    summary = rd.summary()
    assert (summary["model"], summary["data"], summary["epochs_done"]) == ("mlp", "blobs", 2)
    assert summary["best"]["test/acc1"] > 0.5  # 4 separable blobs: far above chance (0.25) after 2 epochs
    assert rd.meta()["dataset"]["num_train"] == 1600
