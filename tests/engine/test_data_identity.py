"""A run's identity covers its data: other files under the same options are another run (not skipped, not
resumed from the other data's checkpoint); unchanged files are the same run (skipped, resumed); the content
is hashed once and then only `stat`ed; a checkpoint trained on other data is refused (exit 2)."""
import json
import shutil

import pytest

import fisherbench.data.content as content
import fisherbench.data.image_folder as imf
import fisherbench.engine.faults as faults_mod
from fisherbench.core import checkpoint as ckpt
from fisherbench.core.errors import UserError
from fisherbench.core.store import iter_run_dirs
from fisherbench.data import registry
from fisherbench.engine.compose import compose_config
from fisherbench.engine.identity import run_id_of
from fisherbench.engine.lifecycle import run
from tests.data_fakes import make_text_files, make_user_images

MODEL = ["model=small_cnn", "model.width=4", "model.hidden=16", "optimizer=adam", "logger=none"]
LM = ["model=tiny_gpt", "optimizer=adam", "logger=none"]


class SimulatedCrash(BaseException):
    """Raised instead of os._exit in-process: nothing after the crash point runs (no checkpoint, no summary)."""


def _images(tmp_path, root, *extra):
    return [*MODEL, "data=image_folder", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.image_size=8", "data.batch_size=4", "data.num_workers=0", "data.mean=[0.5,0.5,0.5]",
            "data.std=[0.25,0.25,0.25]", f"results_dir={tmp_path / 'runs'}", *extra]


def _texts(tmp_path, files, *extra):
    return [*LM, "data=text_files", f"data.train={files['train']}", f"data.valid={files['valid']}",
            f"data.test={files['test']}", f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=16",
            "data.batch_size=4", f"results_dir={tmp_path / 'runs'}", "budget=steps", "budget.steps=2", *extra]


def test_another_folder_with_the_same_options_is_another_run(tmp_path):
    a = make_user_images(tmp_path / "a", {"train": 4, "test": 2}, size=(10, 10), seed=0)
    b = make_user_images(tmp_path / "b", {"train": 4, "test": 2}, size=(10, 10), seed=1)
    first = run(compose_config(_images(tmp_path, a, "budget=steps", "budget.steps=2")))
    assert first.status == "completed" and not first.skipped
    other = run(compose_config(_images(tmp_path, b, "budget=steps", "budget.steps=2")))
    assert not other.skipped and other.status == "completed"  # before: "skipped (already completed)" with a's result
    assert other.run_dir != first.run_dir
    meta = json.loads((other.run_dir / "meta.json").read_text())
    assert meta["dataset"]["content"].startswith("image_folder:sha256=")  # what the run id holds of the data
    assert meta["dataset"]["content"][19:35] in meta["dataset"]["fingerprint"]  # the same content hash
    assert meta["dataset"]["fingerprint"] != json.loads((first.run_dir / "meta.json").read_text())["dataset"][
        "fingerprint"]
    # unchanged data is still the same run (skipped), and so are the same files in another folder
    assert run(compose_config(_images(tmp_path, a, "budget=steps", "budget.steps=2"))).skipped
    moved = shutil.copytree(a, tmp_path / "a_copy")
    again = run(compose_config(_images(tmp_path, moved, "budget=steps", "budget.steps=2")))
    assert again.skipped and again.run_dir == first.run_dir


def test_a_run_killed_on_folder_a_is_not_resumed_on_folder_b(tmp_path, monkeypatch):
    a = make_user_images(tmp_path / "a", {"train": 8, "test": 2}, size=(10, 10), seed=0)
    b = make_user_images(tmp_path / "b", {"train": 8, "test": 2}, size=(10, 10), seed=1)
    overrides = ["budget=epochs", "budget.epochs=2", "checkpoint.every_epochs=1"]
    monkeypatch.setattr(faults_mod.os, "_exit", lambda code: (_ for _ in ()).throw(SimulatedCrash(code)))
    monkeypatch.setenv("FISHERBENCH_FAULT_AT_STEP", "5")  # 4 steps per epoch: killed after the epoch-1 checkpoint
    with pytest.raises(SimulatedCrash):
        run(compose_config(_images(tmp_path, a, *overrides)))
    monkeypatch.delenv("FISHERBENCH_FAULT_AT_STEP")
    (killed,) = list(iter_run_dirs(tmp_path / "runs"))
    assert killed.checkpoint_path.exists()
    on_b = run(compose_config(_images(tmp_path, b, *overrides)))
    assert on_b.status == "completed" and on_b.run_dir != killed.path
    meta = json.loads((on_b.run_dir / "meta.json").read_text())
    assert meta["resumed"] is False and meta["resume_count"] == 0  # before: resumed a's checkpoint on b
    assert killed.checkpoint_path.exists()  # a's run is untouched, and resumes on a
    on_a = run(compose_config(_images(tmp_path, a, *overrides)))
    assert on_a.run_dir == killed.path and json.loads((on_a.run_dir / "meta.json").read_text())["resumed"] is True


def test_a_checkpoint_trained_on_other_data_is_refused(tmp_path, monkeypatch):
    """The second line: a checkpoint records its data's fingerprint, and resuming it on other data (the run
    id made to collide here, as by a checkpoint copied over) is a clear error, exit 2."""
    a = make_user_images(tmp_path / "a", {"train": 8, "test": 2}, size=(10, 10), seed=0)
    b = make_user_images(tmp_path / "b", {"train": 8, "test": 2}, size=(10, 10), seed=1)
    overrides = ["budget=epochs", "budget.epochs=2", "checkpoint.every_epochs=1"]
    monkeypatch.setitem(registry._CONTENT, "image_folder", lambda opts: "same")
    monkeypatch.setattr(faults_mod.os, "_exit", lambda code: (_ for _ in ()).throw(SimulatedCrash(code)))
    monkeypatch.setenv("FISHERBENCH_FAULT_AT_STEP", "5")
    with pytest.raises(SimulatedCrash):
        run(compose_config(_images(tmp_path, a, *overrides)))
    monkeypatch.delenv("FISHERBENCH_FAULT_AT_STEP")
    (killed,) = list(iter_run_dirs(tmp_path / "runs"))
    payload, _ = ckpt.read_checkpoint(killed.checkpoint_path)
    assert payload["data_fingerprint"].startswith("image_folder:")
    with pytest.raises(UserError, match="trained on other data"):  # UserError: exit 2
        run(compose_config(_images(tmp_path, b, *overrides)))
    with pytest.raises(ckpt.CheckpointError, match="other data"):
        ckpt.load_latest(killed.checkpoint_path, payload["run_id"], data_fingerprint="image_folder:other")
    assert ckpt.load_latest(killed.checkpoint_path, payload["run_id"],
                            data_fingerprint=payload["data_fingerprint"])[0] is not None


def test_replacing_the_training_text_is_a_new_run_and_the_hashes_are_cached(tmp_path, monkeypatch):
    files = make_text_files(tmp_path / "text", repeat=4)
    first = run(compose_config(_texts(tmp_path, files)))
    assert first.status == "completed"
    reads = []
    real = content.file_sha256
    monkeypatch.setattr(content, "file_sha256", lambda path: reads.append(str(path)) or real(path))
    again = run(compose_config(_texts(tmp_path, files)))
    assert again.skipped and again.run_dir == first.run_dir and reads == []  # unchanged: stat only, no read
    files["train"].write_text(files["train"].read_text(encoding="utf-8")[::-1], encoding="utf-8")
    changed = run(compose_config(_texts(tmp_path, files)))
    assert not changed.skipped and changed.run_dir != first.run_dir  # before: skipped as completed
    assert reads == [str(files["train"])]  # only the changed file is read again


def test_the_image_scan_is_cached_for_the_run_id(tmp_path, monkeypatch):
    root = make_user_images(tmp_path / "imgs", {"train": 3, "test": 1})
    cfg = compose_config(_images(tmp_path, root))
    rid = run_id_of(cfg)
    monkeypatch.setattr(imf, "_check_file", lambda *a: pytest.fail("unchanged file re-read"))
    assert run_id_of(cfg) == rid
    monkeypatch.undo()
    target = sorted((root / "train" / "cat").iterdir())[0]
    data = target.read_bytes()
    target.unlink()
    target.write_bytes(data)  # same bytes, new inode: read again, same id
    calls = []
    real = imf._check_file
    monkeypatch.setattr(imf, "_check_file", lambda *a: calls.append(a) or real(*a))
    assert run_id_of(cfg) == rid and len(calls) == 1


def test_bundled_and_synthetic_data_keep_config_only_ids():
    from fisherbench.engine.identity import identity_of

    for data in ("data=mnist5k", "data=digits", "data=synthetic_image"):
        assert "data_content" not in identity_of(compose_config([*MODEL, data]))


def test_planning_without_the_data_lists_the_run_and_a_run_needs_it(tmp_path):
    cfg = compose_config([*MODEL, "data=cifar10", f"data.root={tmp_path / 'none'}", "data.download=false"])
    assert run_id_of(cfg) != run_id_of(compose_config([*MODEL, "data=mnist5k"]))  # planned, data absent
    with pytest.raises(UserError, match="cifar10"):
        run_id_of(cfg, data_required=True)


def test_planning_a_sweep_checks_each_dataset_once(tmp_path, monkeypatch):
    """Planning computes every run's id; within `unchanged_data()` (sweep expansion) a dataset's content is
    computed once for all its runs, while a run computes its own every time."""
    root = make_user_images(tmp_path / "imgs", {"train": 3, "test": 1})
    calls = []
    real = registry._CONTENT["image_folder"]
    monkeypatch.setitem(registry._CONTENT, "image_folder", lambda opts: calls.append(1) or real(opts))
    cfgs = [compose_config(_images(tmp_path, root, f"seed={s}")) for s in range(3)]
    with registry.unchanged_data():
        ids = [run_id_of(c) for c in cfgs]
    assert len(calls) == 1 and len(set(ids)) == 3
    assert [run_id_of(c) for c in cfgs] == ids and len(calls) == 4
