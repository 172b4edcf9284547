"""data.val_fraction: a seeded, stratified validation split carved from the training set of every
classification dataset (no overlap, training set shrinks, evaluation transform, recorded in the fingerprint),
and the default 0 leaves the paper's protocol unchanged."""
import numpy as np
import pytest
import torch

from fisherbench.core.errors import UserError
from fisherbench.data.download import OFFLINE_ENV
from fisherbench.data.registry import BuildContext, build_data
from fisherbench.data.splits import hold_out
from tests.data_fakes import make_cifar, make_image_folder, make_tiny_imagenet


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    monkeypatch.setenv(OFFLINE_ENV, "1")


def test_hold_out_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    a = hold_out(labels, len(labels), 0.1, seed=3)
    assert np.array_equal(np.sort(np.concatenate([a.train, a.val])), np.arange(100))
    assert not set(a.train) & set(a.val)
    assert np.bincount(labels[a.val]).tolist() == [1, 2, 3, 4]  # round(n_c * 0.1) per class
    again, other = hold_out(labels, 100, 0.1, seed=3), hold_out(labels, 100, 0.1, seed=4)
    assert np.array_equal(a.val, again.val) and a.tag == again.tag
    assert not np.array_equal(a.val, other.val) and a.tag != other.tag
    assert a.record() == {"val_fraction": 0.1, "seed": 3, "num_train": 90, "num_val": 10,
                          "val_indices_sha256": a.tag.rsplit(":", 1)[-1]}
    assert hold_out(labels, 100, 0.0, seed=3) is None


def test_hold_out_rejects_fractions_that_leave_nothing():
    labels = np.arange(6) % 3  # two examples per class
    with pytest.raises(UserError, match=r"holds out no example.*val_fraction >= 0.25"):
        hold_out(labels, 6, 0.2, seed=0)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(UserError, match=r"must be in \[0, 1\)"):
            hold_out(labels, 6, bad, seed=0)


def cifar_opts(root, **kw):
    return {"name": "cifar10", "root": str(root), "verify": False, "download": False, "batch_size": 8, **kw}


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    return root, make_cifar(root, "cifar10", per_file=20, seed=1)  # 100 training images


@pytest.mark.parametrize("loader", ["resident", "torch"])
def test_cifar_val_split_comes_out_of_the_training_set(cifar_root, loader):
    root, written = cifar_root
    train_images, train_labels = written["train"]
    b = build_data(cifar_opts(root, loader=loader, val_fraction=0.2), BuildContext(seed=5))
    assert list(b.evals) == ["val", "test"]
    split = b.extras["split"]
    assert split["num_train"] + split["num_val"] == 100 and b.num_train == split["num_train"]
    assert split["num_val"] == pytest.approx(20, abs=5)  # stratified rounding per class
    assert ":val=0.2@seed5:" in b.fingerprint
    # every val image is a training image, seen with the evaluation transform, and never in the train source
    val = [(x, y) for x, y in b.evals["val"].iterate(0)]
    xv, yv = torch.cat([x for x, _ in val]), torch.cat([y for _, y in val])
    assert len(xv) == split["num_val"]
    plain = build_data(cifar_opts(root, loader=loader, augment=False, cutout=False, val_fraction=0.2),
                       BuildContext(seed=5))
    xt = torch.cat([x for x, _ in plain.train.iterate(0)])
    assert len(xt) == split["num_train"]
    flat = lambda t: {tuple(r.tolist()) for r in t.flatten(1)}  # noqa: E731
    assert not flat(xv) & flat(xt)
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2023, 0.1994, 0.2010])
    pixels = torch.from_numpy(train_images).permute(0, 3, 1, 2).float() / 255
    norm = (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert flat(xv) | flat(xt) == flat(norm)  # together they are exactly the training set
    yt = torch.cat([y for _, y in plain.train.iterate(0)])
    assert sorted(yv.tolist() + yt.tolist()) == sorted(train_labels.tolist())


def test_cifar_val_split_is_seeded_and_default_is_the_papers_protocol(cifar_root):
    root, _ = cifar_root
    a = build_data(cifar_opts(root, val_fraction=0.2), BuildContext(seed=1))
    b = build_data(cifar_opts(root, val_fraction=0.2), BuildContext(seed=1))
    c = build_data(cifar_opts(root, val_fraction=0.2), BuildContext(seed=2))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    xa, xb, xc = (torch.cat([x for x, _ in bb.evals["val"].iterate(0)]) for bb in (a, b, c))
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    default = build_data(cifar_opts(root), BuildContext(seed=1))
    assert list(default.evals) == ["test"] and default.num_train == 100 and "split" not in default.extras
    assert default.fingerprint.startswith("cifar10:train=100:test=20:sha256=") and "val=" not in default.fingerprint


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_offline_sets_val_split_keeps_the_fixed_test_split(name):
    base = build_data({"name": name})
    held = build_data({"name": name, "val_fraction": 0.1}, BuildContext(seed=0))
    test_a = torch.cat([x for x, _ in base.evals["test"].iterate(0)])
    assert held.num_train + held.extras["split"]["num_val"] == base.num_train
    assert list(held.evals) == ["val", "test"]
    yv = torch.cat([y for _, y in held.evals["val"].iterate(0)])
    assert len(yv) == held.extras["split"]["num_val"] and len(torch.unique(yv)) == 10  # stratified
    # the test split is the same images; only its normalisation differs (statistics of the smaller training
    # part): test_b = alpha * test_a + beta exactly
    test_b = torch.cat([x for x, _ in held.evals["test"].iterate(0)])
    assert test_a.shape == test_b.shape
    a, b = test_a.flatten().double(), test_b.flatten().double()
    alpha = ((a - a.mean()) * (b - b.mean())).sum() / ((a - a.mean()) ** 2).sum()
    assert torch.allclose(b, alpha * (a - a.mean()) + b.mean(), atol=1e-5)


def test_folder_datasets_val_split_uses_the_evaluation_transform(tmp_path):
    make_tiny_imagenet(tmp_path, ("n01443537", "n01629819"), train_per_class=5, val_per_class=1)
    b = build_data({"name": "tiny_imagenet", "root": str(tmp_path), "verify": False, "download": False,
                    "batch_size": 2, "val_fraction": 0.4}, BuildContext(seed=0))
    assert list(b.evals) == ["val", "test"] and b.num_train == 6 and b.extras["split"]["num_val"] == 4
    val_files = b.evals["val"].dataset.dataset
    train_files = b.train.dataset.dataset
    assert not {p for p, _ in val_files.samples} & {p for p, _ in train_files.samples}
    # the evaluation transform is deterministic: the same val image twice is the same tensor
    assert torch.equal(val_files[0][0], val_files[0][0])
    assert "CenterCrop" in repr(val_files.transform) and "RandomResizedCrop" in repr(train_files.transform)
    make_image_folder(tmp_path / "inet", train_per_class=5, val_per_class=1)
    b = build_data({"name": "imagenet", "root": str(tmp_path / "inet"), "verify": False, "batch_size": 2,
                    "val_fraction": 0.2}, BuildContext(seed=0))
    assert list(b.evals) == ["val", "test"] and b.num_train == 8 and ":val=0.2@seed0:" in b.fingerprint


def test_val_split_reaches_the_trainer_as_val_metrics(run_train, tmp_path):
    make_cifar(tmp_path, "cifar10", per_file=8)
    r = run_train("data=cifar10", f"data.root={tmp_path}", "data.verify=false", "data.download=false",
                  "data.batch_size=8", "data.val_fraction=0.25", "budget=steps", "budget.steps=2",
                  base=["model=small_cnn", "model.width=4", "model.hidden=16", "optimizer=adam", "logger=none"])
    final = r.summary["final"]
    assert r.summary["status"] == "completed"
    assert 0.0 <= final["val/acc1"] <= 1.0 and 0.0 <= final["test/acc1"] <= 1.0
    meta = (r.run_dir / "meta.json").read_text()
    assert ":val=0.25@seed" in meta  # the split is part of the recorded fingerprint
