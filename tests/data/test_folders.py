"""Tiny ImageNet (val reorganisation, class map, transforms, size check) and ImageNet (user-provided
ImageFolder tree, clear message when absent) on hand-made folder trees of small JPEGs."""
import numpy as np
import pytest
import torch

from fisherbench.data.download import OFFLINE_ENV, DatasetNotFoundError
from fisherbench.data.registry import BuildContext, build_data
from fisherbench.data.tiny_imagenet import reorganise_val
from tests.data_fakes import make_image_folder, make_tiny_imagenet

WNIDS = ("n01443537", "n01629819", "n01641577")


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    monkeypatch.setenv(OFFLINE_ENV, "1")


def test_reorganise_val_sorts_by_annotation_and_is_idempotent(tmp_path):
    base = make_tiny_imagenet(tmp_path, WNIDS, val_per_class=2)
    annotations = dict(line.split("\t")[:2] for line in (base / "val" / "val_annotations.txt").read_text().splitlines())
    assert reorganise_val(base) == 6
    assert not (base / "val" / "images").exists()
    for file_name, wnid in annotations.items():
        assert (base / "val" / wnid / file_name).is_file()
    snapshot = sorted(p.relative_to(base) for p in base.rglob("*"))
    assert reorganise_val(base) == 0  # second run: nothing to do
    assert sorted(p.relative_to(base) for p in base.rglob("*")) == snapshot


def test_reorganise_val_resumes_after_an_interruption(tmp_path):
    base = make_tiny_imagenet(tmp_path, WNIDS, val_per_class=2)
    first = (base / "val" / "val_annotations.txt").read_text().splitlines()[0].split("\t")
    (base / "val" / first[1]).mkdir()
    (base / "val" / "images" / first[0]).replace(base / "val" / first[1] / first[0])  # moved before a crash
    assert reorganise_val(base) == 5
    assert not (base / "val" / "images").exists()
    assert sum(1 for _ in (base / "val").rglob("*.JPEG")) == 6


def tiny_opts(root, **kw):
    base = dict(name="tiny_imagenet", root=str(root), verify=False, download=False, batch_size=4)
    base.update(kw)
    return base


def test_tiny_imagenet_bundle_labels_shapes_and_determinism(tmp_path):
    base = make_tiny_imagenet(tmp_path, WNIDS, train_per_class=3, val_per_class=2)
    annotations = dict(line.split("\t")[:2] for line in (base / "val" / "val_annotations.txt").read_text().splitlines())
    b = build_data(tiny_opts(tmp_path), BuildContext(seed=0))
    assert (b.num_classes, b.input_shape, b.num_train) == (3, (3, 64, 64), 9)
    classes = b.extras["classes"]
    assert classes == sorted(WNIDS)
    # val labels follow val_annotations.txt through the class map
    val = b.evals["test"].dataset.dataset  # TorchLoaderSource -> SeededDataset -> LabelledImageFiles
    for path, label in val.samples:
        assert classes[label] == annotations[path.rsplit("/", 1)[-1]]
    for path, label in b.train.dataset.dataset.samples:
        assert f"/train/{classes[label]}/images/" in path
    x, y = next(iter(b.train.iterate(0)))
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    x2, y2 = next(iter(build_data(tiny_opts(tmp_path), BuildContext(seed=0)).train.iterate(0)))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    xe, _ = next(iter(b.evals["test"].iterate(0)))
    assert xe.shape == (4, 3, 64, 64)


def test_tiny_imagenet_eval_transform_is_resize_centercrop_normalise(tmp_path):
    from PIL import Image

    make_tiny_imagenet(tmp_path, WNIDS, train_per_class=1, val_per_class=1, size=16)
    b = build_data(tiny_opts(tmp_path, cutout=False, batch_size=3))
    val = b.evals["test"].dataset.dataset
    path, _ = val.samples[0]
    img = Image.open(path).convert("RGB").resize((64, 64), Image.BILINEAR)
    ref = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    ref = (ref - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    out, _ = val[0]
    assert out.shape == (3, 64, 64)
    assert (out - ref).abs().max() < 0.05  # PIL vs tensor resize rounding only


def test_tiny_imagenet_cutout_option_puts_a_zero_hole_in_training_images(tmp_path):
    make_tiny_imagenet(tmp_path, WNIDS, train_per_class=2, val_per_class=1)
    with_cutout = build_data(tiny_opts(tmp_path, cutout=True, cutout_length=16))
    without = build_data(tiny_opts(tmp_path, cutout=False))
    zeros = lambda b: (next(iter(b.train.iterate(0)))[0] == 0).all(1).sum((1, 2))  # noqa: E731
    z = zeros(with_cutout)
    assert ((z >= 64) & (z <= 256)).all()  # an 8x8 (corner) .. 16x16 hole in every image
    assert (zeros(without) < 8).all()


def test_tiny_imagenet_verify_reports_counts_and_missing_folder(tmp_path):
    make_tiny_imagenet(tmp_path, WNIDS)
    with pytest.raises(DatasetNotFoundError, match=r"classes: 3 \(expected 200\).*data.verify=false"):
        build_data(tiny_opts(tmp_path, verify=True))
    with pytest.raises(DatasetNotFoundError) as e:
        build_data(tiny_opts(tmp_path / "empty"))
    assert "tiny-imagenet-200" in str(e.value) and "prepare-data tiny_imagenet" in str(e.value)


def test_imagenet_from_a_user_folder(tmp_path):
    make_image_folder(tmp_path / "imagenet", classes=("n01440764", "n01443537"), train_per_class=3, val_per_class=2)
    for root in (tmp_path, tmp_path / "imagenet"):  # <root>/imagenet/{train,val} or <root>/{train,val}
        b = build_data({"name": "imagenet", "root": str(root), "verify": False, "batch_size": 2})
        assert (b.num_classes, b.input_shape, b.num_train) == (2, (3, 224, 224), 6)
        x, y = next(iter(b.evals["test"].iterate(0)))
        assert x.shape == (2, 3, 224, 224)
    x, y = next(iter(b.train.iterate(0)))
    assert x.shape == (2, 3, 224, 224)


def test_imagenet_absent_or_incomplete_has_clear_messages(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="image-net.org") as e:
        build_data({"name": "imagenet", "root": str(tmp_path)})
    assert "data.root" in str(e.value) and str(tmp_path) in str(e.value)
    make_image_folder(tmp_path, classes=("n01440764",), train_per_class=1, val_per_class=1)
    with pytest.raises(DatasetNotFoundError, match=r"classes: 1 \(expected 1000\)"):
        build_data({"name": "imagenet", "root": str(tmp_path)})
