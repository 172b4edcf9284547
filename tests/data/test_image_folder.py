"""data=image_folder on fabricated PNG/JPEG trees: the three layouts, splits (fixed test carve, seeded val
hold-out, no overlap), image size, normalisation computed from the training images (brute force) and cached,
the content fingerprint, worker cap, clear errors, and a run through the trainer."""
import json

import numpy as np
import pytest
import torch

import fisherbench.data.image_folder as imf
import fisherbench.data.loaders as loaders
from fisherbench.core.errors import UserError
from fisherbench.data.download import DatasetNotFoundError
from fisherbench.data.registry import BuildContext, build_data
from tests.data_fakes import make_user_images


def opts(root, tmp_path, **kw):
    return {"name": "image_folder", "root": str(root), "cache_dir": str(tmp_path / "cache"), "batch_size": 4,
            "num_workers": 0, **kw}


def paths(source):
    return [p for p, _ in source.dataset.dataset.samples]  # TorchLoaderSource -> SeededDataset -> files


def test_split_layout_with_val_and_test_folders(tmp_path):
    root = make_user_images(tmp_path / "imgs", {"train": 6, "val": 2, "test": 3}, classes=("b", "a", "c"))
    b = build_data(opts(root, tmp_path), BuildContext(seed=0))
    assert b.task == "classification" and b.num_classes == 3 and b.extras["classes"] == ["a", "b", "c"]
    assert list(b.evals) == ["val", "test"] and b.num_train == 18
    assert b.extras["splits"] == {"val": "val/ folder", "test": "test/ folder"} and b.extras["layout"] == "split"
    for split, folder, n in (("val", "val", 6), ("test", "test", 9)):
        files = paths(b.evals[split])
        assert len(files) == n and all(f"/{folder}/" in p for p in files)
    # labels follow the class folder names through the sorted class list
    for p, label in b.train.dataset.dataset.samples:
        assert f"/train/{b.extras['classes'][label]}/" in p
    assert b.fingerprint.startswith("image_folder:split:classes=3:files=train/18,val/6,test/9:sha256=")


def test_one_held_out_folder_is_the_test_split_and_val_fraction_carves_val(tmp_path):
    root = make_user_images(tmp_path / "imgs", {"train": 10, "val": 2})
    b = build_data(opts(root, tmp_path), BuildContext(seed=0))
    assert list(b.evals) == ["test"] and b.extras["splits"] == {"test": "val/ folder"} and b.num_train == 20
    held = build_data(opts(root, tmp_path, val_fraction=0.2), BuildContext(seed=0))
    assert list(held.evals) == ["val", "test"] and held.num_train == 16
    train, val = set(paths(held.train)), set(paths(held.evals["val"]))
    assert len(val) == 4 and not train & val and train | val == set(paths(b.train))
    assert all("/train/" in p for p in val)
    assert held.extras["split"]["num_val"] == 4 and ":val=0.2@seed0:" in held.fingerprint


def test_flat_layout_carves_a_fixed_test_split_and_a_seeded_val_split(tmp_path):
    root = make_user_images(tmp_path / "imgs", {"": 10}, classes=("x", "y"))
    runs = {seed: build_data(opts(root, tmp_path, val_fraction=0.2), BuildContext(seed=seed)) for seed in (0, 1)}
    for b in runs.values():
        assert b.extras["layout"] == "flat" and list(b.evals) == ["val", "test"]
        # 10 per class: test round(10 * 0.2) = 2 per class, then val round(8 * 0.2) = 2 per class
        assert (b.num_train, len(paths(b.evals["val"])), len(paths(b.evals["test"]))) == (12, 4, 4)
        parts = [set(paths(b.train)), set(paths(b.evals["val"])), set(paths(b.evals["test"]))]
        assert sum(map(len, parts)) == 20 and len(set.union(*parts)) == 20
    # test is the same for every seed (every run is scored on the same images); val follows the seed
    assert paths(runs[0].evals["test"]) == paths(runs[1].evals["test"])
    assert paths(runs[0].evals["val"]) != paths(runs[1].evals["val"])
    again = build_data(opts(root, tmp_path, val_fraction=0.2), BuildContext(seed=0))
    assert paths(again.evals["val"]) == paths(runs[0].evals["val"]) and again.fingerprint == runs[0].fingerprint
    b = build_data(opts(root, tmp_path, test_fraction=0.5), BuildContext(seed=0))
    assert len(paths(b.evals["test"])) == 10 and ":test=0.5@seed" in b.fingerprint


@pytest.mark.parametrize("augment", ["crop", "resized_crop", "none"])
def test_any_image_size_and_channels(tmp_path, augment):
    root = make_user_images(tmp_path / "imgs", {"train": 4, "test": 2}, size=(30, 20))
    b = build_data(opts(root, tmp_path, image_size=12, augment=augment), BuildContext(seed=0))
    assert b.input_shape == (3, 12, 12)
    x, y = next(iter(b.train.iterate(0)))
    assert x.shape == (4, 3, 12, 12) and x.dtype == torch.float32 and y.dtype == torch.int64
    xe, _ = next(iter(b.evals["test"].iterate(0)))
    assert xe.shape == (4, 3, 12, 12)
    gray = build_data(opts(root, tmp_path, image_size=12, augment=augment, channels=1))
    assert gray.input_shape == (1, 12, 12) and next(iter(gray.train.iterate(0)))[0].shape == (4, 1, 12, 12)
    x1, _ = next(iter(b.train.iterate(0)))
    assert torch.equal(x, x1)  # seeded augmentation: deterministic per (seed, epoch, index)


def test_image_size_defaults_to_the_median_shorter_side(tmp_path):
    root = make_user_images(tmp_path / "imgs", {"train": 4, "test": 1}, size=(30, 18))  # heights 18 / 22
    b = build_data(opts(root, tmp_path))
    assert b.extras["image_size"] == 20 and b.input_shape == (3, 20, 20)


def brute_force_stats(files, size):
    """Per-channel mean/std over the Resize(shorter side = size) + CenterCrop(size) pixels, with PIL + numpy."""
    from PIL import Image

    pixels = []
    for path in files:
        img = Image.open(path).convert("RGB")
        w, h = img.size
        nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        img = img.resize((nw, nh), Image.BILINEAR)
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        pixels.append(np.asarray(img, dtype=np.float64)[top:top + size, left:left + size] / 255.0)
    stack = np.stack(pixels)
    return stack.mean(axis=(0, 1, 2)), stack.std(axis=(0, 1, 2))


def test_normalisation_is_computed_from_the_training_images_and_cached(tmp_path, monkeypatch):
    root = make_user_images(tmp_path / "imgs", {"train": 6, "val": 3}, size=(20, 14))
    b = build_data(opts(root, tmp_path, image_size=10, val_fraction=0.34), BuildContext(seed=2))
    norm = b.extras["normalization"]
    mean, std = brute_force_stats(paths(b.train), 10)  # the training part only: no val image contributes
    assert np.allclose(norm["mean"], mean, atol=2e-3) and np.allclose(norm["std"], std, atol=2e-3)
    assert norm["source"] == f"computed from {b.num_train} training images"
    # evaluation images are normalised with exactly these statistics
    from torchvision import transforms as T

    test_files = b.evals["test"].dataset.dataset
    unnormalised = test_files.subset([0], T.Compose([T.Resize(10), T.CenterCrop(10), T.ToTensor()]))[0][0]
    expected = (unnormalised - torch.tensor(norm["mean"]).view(3, 1, 1)) / torch.tensor(norm["std"]).view(3, 1, 1)
    assert torch.allclose(test_files[0][0], expected.float(), atol=1e-5)
    # a second build reads the cache; another split (seed) computes its own statistics
    monkeypatch.setattr(imf, "channel_stats", lambda *a, **k: pytest.fail("statistics recomputed"))
    again = build_data(opts(root, tmp_path, image_size=10, val_fraction=0.34), BuildContext(seed=2))
    assert again.extras["normalization"]["mean"] == norm["mean"]
    with pytest.raises(pytest.fail.Exception, match="recomputed"):
        build_data(opts(root, tmp_path, image_size=10, val_fraction=0.34), BuildContext(seed=3))
    given = build_data(opts(root, tmp_path, image_size=10, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]))
    assert given.extras["normalization"] == {"source": "given", "mean": [0.5] * 3, "std": [0.25] * 3}


def test_given_statistics_normalise_the_pixels(tmp_path):
    from PIL import Image

    root = make_user_images(tmp_path / "imgs", {"train": 2, "test": 1}, size=(8, 8))
    b = build_data(opts(root, tmp_path, image_size=8, batch_size=2, mean=[0.1, 0.2, 0.3], std=[0.5, 0.25, 2.0]))
    test_files = b.evals["test"].dataset.dataset
    x, _ = test_files[0]
    img = np.asarray(Image.open(test_files.samples[0][0]).convert("RGB"), dtype=np.float32) / 255.0
    ref = (torch.from_numpy(img).permute(2, 0, 1) - torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)) \
        / torch.tensor([0.5, 0.25, 2.0]).view(3, 1, 1)
    assert torch.allclose(x, ref, atol=1e-6)  # 8x8 images at image_size 8: resize and crop are identities


def test_fingerprint_hashes_file_contents_and_the_scan_is_cached(tmp_path, monkeypatch):
    root = make_user_images(tmp_path / "imgs", {"train": 3, "test": 1})
    first = build_data(opts(root, tmp_path)).fingerprint
    monkeypatch.setattr(imf, "_check_file", lambda *a: pytest.fail("unchanged file re-read"))
    assert build_data(opts(root, tmp_path)).fingerprint == first
    monkeypatch.undo()
    target = sorted((root / "train" / "cat").iterdir())[0]
    from PIL import Image

    Image.new("RGB", (24, 16), (1, 2, 3)).save(target)
    assert build_data(opts(root, tmp_path)).fingerprint != first
    cache = json.loads(next((tmp_path / "cache" / "image_folder").glob("scan-*.json")).read_text())
    assert len(cache["entries"]) == 8 and all(len(e["sha256"]) == 64 for e in cache["entries"].values())


def test_workers_are_capped_at_the_available_cores(tmp_path, monkeypatch):
    root = make_user_images(tmp_path / "imgs", {"train": 2, "test": 1})
    monkeypatch.setattr(loaders.os, "sched_getaffinity", lambda pid: {0, 1})
    b = build_data(opts(root, tmp_path, num_workers=8, image_size=8))
    assert b.train.num_workers == 2 and b.extras["num_workers"] == 2
    assert b.evals["test"].num_workers == 2
    monkeypatch.setattr(loaders.os, "sched_getaffinity", lambda pid: {3})
    assert build_data(opts(root, tmp_path, num_workers=8, image_size=8)).train.num_workers == 1
    monkeypatch.setattr(loaders.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 ranks share the node's 16 cores
    assert build_data(opts(root, tmp_path, num_workers=8, image_size=8)).train.num_workers == 4
    assert build_data(opts(root, tmp_path, num_workers=0, image_size=8)).train.num_workers == 0


def test_clear_errors(tmp_path):
    with pytest.raises(UserError, match="needs data.root"):
        build_data({"name": "image_folder", "batch_size": 2})
    with pytest.raises(DatasetNotFoundError, match="is not a folder"):
        build_data(opts(tmp_path / "missing", tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no class folders"):
        build_data(opts(tmp_path / "empty", tmp_path))
    one = make_user_images(tmp_path / "one", {"": 3}, classes=("only",))
    with pytest.raises(DatasetNotFoundError, match="only the class folder 'only'.*at least 2 classes"):
        build_data(opts(one, tmp_path))
    root = make_user_images(tmp_path / "imgs", {"train": 3, "val": 1})
    (root / "train" / "empty_class").mkdir()
    (root / "train" / "empty_class" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetNotFoundError, match=r"no image files in the class folder\(s\) \['empty_class'\]"):
        build_data(opts(root, tmp_path))
    (root / "train" / "empty_class" / "notes.txt").unlink()
    (root / "train" / "empty_class").rmdir()
    (root / "val" / "zebra").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"class folders that train/ lacks: \['zebra'\]"):
        build_data(opts(root, tmp_path))
    (root / "val" / "zebra").rmdir()
    with pytest.raises(UserError, match="test_fraction carves a test split only when"):
        build_data(opts(root, tmp_path, test_fraction=0.3))
    (tmp_path / "noval" / "val" / "a").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="no train/ folder"):
        build_data(opts(tmp_path / "noval", tmp_path))
    both = make_user_images(tmp_path / "both", {"train": 3, "val": 1, "test": 1})
    with pytest.raises(UserError, match="has val/ and test/ folders"):
        build_data(opts(both, tmp_path, val_fraction=0.2))
    for bad, match in ((dict(augment="flip"), "data.augment"), (dict(channels=2), "data.channels"),
                       (dict(mean=[0.5] * 3), "both data.mean and data.std"),
                       (dict(mean=[0.5], std=[0.2]), "need 3 values"), (dict(check_images="none"), "check_images")):
        with pytest.raises(UserError, match=match):
            build_data(opts(both, tmp_path, **bad))


@pytest.mark.parametrize("damage", ["garbage", "truncated png", "truncated jpeg"])
def test_unreadable_images_are_listed_before_training(tmp_path, damage):
    root = make_user_images(tmp_path / "imgs", {"train": 4, "test": 1}, size=(64, 64))
    files = sorted((root / "train" / "dog").iterdir())
    target = {"garbage": files[0], "truncated png": files[0], "truncated jpeg": files[1]}[damage]
    assert target.suffix == (".jpg" if damage == "truncated jpeg" else ".png")
    raw = target.read_bytes()
    target.write_bytes(b"this is not an image" if damage == "garbage" else raw[: len(raw) // 2])
    with pytest.raises(DatasetNotFoundError, match="cannot be read as images") as e:
        build_data(opts(root, tmp_path))
    assert str(target) in str(e.value) and "Remove or replace" in str(e.value)


def test_image_folder_trains_through_the_runner_with_val_metrics(run_train, tmp_path):
    root = make_user_images(tmp_path / "imgs", {"train": 12, "val": 4}, size=(12, 12))
    r = run_train("data=image_folder", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}",
                  "data.image_size=8", "data.batch_size=4", "data.val_fraction=0.25", "data.num_workers=0",
                  "budget=steps", "budget.steps=3",
                  base=["model=small_cnn", "model.width=4", "model.hidden=16", "optimizer=adam", "logger=none"])
    s = r.summary
    assert s["status"] == "completed" and s["steps"] == 3
    assert {"val/acc1", "test/acc1", "val/loss", "test/loss"} <= set(s["final"])
    meta = json.loads((r.run_dir / "meta.json").read_text())
    assert meta["dataset"]["fingerprint"].startswith("image_folder:split:classes=2:files=train/24,val/8:")
    assert meta["dataset"]["input_shape"] == [3, 8, 8] and meta["dataset"]["num_train"] == 18
