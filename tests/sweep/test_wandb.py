"""W&B runs get readable names (`model/optimizer/seed`) and a group per sweep or multirun; read back from the
offline run files that `wandb` writes (no server)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fisherbench.core.store import iter_run_dirs
from fisherbench.results.wandb_offline import find_run_files, raw_records
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[2]


def _name_and_group(run_dir: Path) -> tuple[str, str]:
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = find_run_files(run_dir)
    found = None
    for blob in raw_records(path):
        rec = pb.Record()
        rec.ParseFromString(blob)
        if rec.WhichOneof("record_type") == "run":
            found = (rec.run.display_name, rec.run.run_group)
    assert found is not None, f"no run record in {path}"
    return found


def test_run_names_are_readable():
    from fisherbench.engine.loggers import run_name

    base = {"model": {"name": "resnet18_cifar"}, "optimizer": {"name": "adafisher", "variant": "paper"}, "seed": 3}
    assert run_name({**base, "_choices": {"model": "resnet18_cifar", "optimizer": "adafisher_paper"}}) == \
        "resnet18_cifar/adafisher_paper/3"
    assert run_name({**base, "_choices": {"model": "swin_tiny_official", "optimizer": "adafisherw_vit"}}) == \
        "swin_tiny_official/adafisherw_vit-paper/3"
    assert run_name({"model": {"name": "small_cnn"}, "optimizer": {"name": "adam"}, "seed": 0}) == "small_cnn/adam/0"


def test_a_sweeps_runs_share_its_group(tmp_path, run_train):
    """What a sweep passes (`logger.group=<spec>`) reaches W&B, with the readable name."""
    result = run_train("budget=steps", "budget.steps=2", "logger=wandb", "logger.mode=offline",
                       "logger.group=table2_cifar10", "seed=4", base=[t for t in TINY if t != "logger=none"])
    assert result.status == "completed"
    assert _name_and_group(result.run_dir) == ("small_cnn/adam/4", "table2_cifar10")


def test_a_multirun_is_one_group(tmp_path):
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(REPO / "train.py"), "-m", "seed=0,1",
                        *[t for t in TINY if t != "logger=none"], "budget=steps", "budget.steps=2", "logger=wandb",
                        "logger.mode=offline", f"results_dir={tmp_path / 'runs'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    (multirun_dir,) = (tmp_path / "runs" / "_multirun").iterdir()
    found = sorted(_name_and_group(rd.path) for rd in iter_run_dirs(tmp_path / "runs"))
    group = f"multirun/{multirun_dir.name}"
    assert found == [("small_cnn/adam/0", group), ("small_cnn/adam/1", group)]
