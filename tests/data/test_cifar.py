"""CIFAR-10/100 on hand-made files in the real pickle format: reading (cross-checked with torchvision's own
reader), checksum and missing-file errors, both loaders (torch / resident): determinism, identical evaluation
batches, and augmentation that is a crop+flip of the padded image with a 0-valued hole."""
import numpy as np
import pytest
import torch

import fisherbench.data.cifar as cifar
from fisherbench.data.augment import CIFAR10_MEAN, CIFAR10_STD
from fisherbench.data.download import OFFLINE_ENV, DatasetNotFoundError, DownloadError
from fisherbench.data.registry import BuildContext, build_data
from tests.data_fakes import make_cifar


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    monkeypatch.setenv(OFFLINE_ENV, "1")


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    written = {v: make_cifar(root, v, per_file=8, seed=i) for i, v in enumerate(("cifar10", "cifar100"))}
    return root, written


def opts(root, **kw):
    base = dict(name="cifar10", root=str(root), verify=False, download=False, batch_size=8)
    base.update(kw)
    return base


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_reader_matches_the_written_arrays_and_torchvision(cifar_root, variant, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    root, written = cifar_root
    arrays = cifar.read_cifar(root, cifar.CIFAR_SPECS[variant])
    assert np.array_equal(arrays.train_images, written[variant]["train"][0])
    assert np.array_equal(arrays.train_labels, written[variant]["train"][1])
    assert np.array_equal(arrays.test_images, written[variant]["test"][0])
    assert np.array_equal(arrays.test_labels, written[variant]["test"][1])
    assert len(arrays.classes) == cifar.CIFAR_SPECS[variant].num_classes
    # torchvision reads the same files once its MD5 check is bypassed
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    tv_class = cifar.CIFAR_SPECS[variant].tv
    for train, ours in ((True, (arrays.train_images, arrays.train_labels)),
                        (False, (arrays.test_images, arrays.test_labels))):
        ref = tv_class(str(root), train=train, download=False)
        assert np.array_equal(ref.data, ours[0]) and list(ref.targets) == ours[1].tolist()
        assert ref.classes == arrays.classes


def test_verify_rejects_hand_made_files_with_a_clear_message(cifar_root):
    root, _ = cifar_root
    with pytest.raises(DatasetNotFoundError, match="MD5 mismatch") as e:
        build_data(opts(root, verify=True))
    assert "data.verify=false" in str(e.value) and "prepare-data cifar10" in str(e.value)


def test_missing_files_message_names_path_flag_and_script(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        build_data(opts(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg
    assert "data.download" in msg and "python -m fisherbench prepare-data cifar10" in msg


def test_failed_download_is_reported_not_raised_raw(tmp_path, monkeypatch):
    calls = []

    def offline_download(url, dest, md5=None, timeout=60.0):
        calls.append((url, md5))
        raise DownloadError(f"could not download {url}: <urlopen error no network>")

    monkeypatch.setattr(cifar, "download", offline_download)
    with pytest.raises(DatasetNotFoundError, match="Downloading it failed") as e:
        build_data(opts(tmp_path, name="cifar100", download=True))
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85")]
    assert "prepare-data cifar100" in str(e.value)


def test_bundle_shapes_and_the_papers_normalisation_constants(cifar_root):
    root, _ = cifar_root
    paper = {  # the official `Image_Classification/src/utils/data.py`, written out independently of data.augment
        "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
        "cifar100": (tuple(v / 255 for v in (125.3, 123.0, 113.9)), tuple(v / 255 for v in (63.0, 62.1, 66.7))),
    }
    for name, classes, num_train in (("cifar10", 10, 40), ("cifar100", 100, 8)):
        b = build_data(opts(root, name=name))
        assert (b.num_classes, b.input_shape, b.num_train, b.task) == (classes, (3, 32, 32), num_train,
                                                                       "classification")
        assert list(b.evals) == ["test"] and b.extras["loader"] == "resident"
        spec = cifar.CIFAR_SPECS[name]
        assert (spec.mean, spec.std) == paper[name]


def collect(source, epoch, start=0):
    return [(x.clone(), y.clone()) for x, y in source.iterate(epoch, start)]


@pytest.mark.parametrize("loader", ["resident", "torch"])
def test_loaders_are_deterministic_and_resumable(cifar_root, loader):
    root, _ = cifar_root
    a = build_data(opts(root, loader=loader), BuildContext(seed=3))
    b = build_data(opts(root, loader=loader), BuildContext(seed=3))
    e0a, e0b, e1 = collect(a.train, 0), collect(b.train, 0), collect(a.train, 1)
    assert len(e0a) == len(a.train) == 5  # 40 images, batch 8, no drop_last
    for (xa, ya), (xb, yb) in zip(e0a, e0b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not all(torch.equal(x0, x1) for (x0, _), (x1, _) in zip(e0a, e1))
    resumed = collect(a.train, 0, start=3)
    for (x, y), (xr, yr) in zip(e0a[3:], resumed):
        assert torch.equal(x, xr) and torch.equal(y, yr)
    other_seed = collect(build_data(opts(root, loader=loader), BuildContext(seed=4)).train, 0)
    assert not all(torch.equal(x0, x1) for (x0, _), (x1, _) in zip(e0a, other_seed))


def test_both_loaders_give_identical_evaluation_batches(cifar_root):
    root, written = cifar_root
    res = collect(build_data(opts(root, loader="resident")).evals["test"], 0)
    tv = collect(build_data(opts(root, loader="torch")).evals["test"], 0)
    assert len(res) == len(tv) == 1
    assert torch.equal(res[0][0], tv[0][0]) and torch.equal(res[0][1], tv[0][1])
    x = torch.from_numpy(written["cifar10"]["test"][0]).permute(0, 3, 1, 2).float() / 255
    ref = (x - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.allclose(res[0][0], ref, atol=1e-6)


def test_unaugmented_training_batches_agree_between_loaders(cifar_root):
    root, _ = cifar_root
    kw = dict(augment=False, cutout=False)
    res = collect(build_data(opts(root, loader="resident", **kw), BuildContext(seed=1)).train, 0)
    tv = collect(build_data(opts(root, loader="torch", **kw), BuildContext(seed=1)).train, 0)
    for (xr, yr), (xt, yt) in zip(res, tv):  # same order (seed, epoch) and same normalisation
        assert torch.equal(xr, xt) and torch.equal(yr, yt)


def explain(aug_img, original_hwc, mean, std, padding=4):
    """Brute force over every flip and crop offset: (flipped, dy, dx, hole size) such that `aug_img` =
    normalise(crop(zero-pad(flip?(original)))) outside its 0-valued hole; None if no explanation exists."""
    hole = (aug_img == 0).all(0)
    pixels = (aug_img * std + mean) * 255
    src = torch.from_numpy(original_hwc).permute(2, 0, 1).float()
    for flipped, s in ((False, src), (True, src.flip(-1))):
        padded = torch.nn.functional.pad(s, (padding,) * 4)
        windows = padded.unfold(1, 32, 1).unfold(2, 32, 1)  # (3, dy, dx, 32, 32)
        # screen every offset on the first channel, then confirm the best one on all channels
        err = ((windows[0] - pixels[0]).abs() * (~hole)).amax(dim=(2, 3))  # (dy, dx)
        dy, dx = divmod(int(err.argmin()), err.shape[1])
        full = ((windows[:, dy, dx] - pixels).abs() * (~hole)).amax()
        if full < 2e-3:
            return flipped, dy, dx, int(hole.sum())
    return None


@pytest.mark.parametrize("loader", ["resident", "torch"])
def test_training_augmentation_is_crop_flip_then_cutout(cifar_root, loader):
    root, written = cifar_root
    images, labels = written["cifar10"]["train"]
    b = build_data(opts(root, loader=loader, batch_size=40), BuildContext(seed=0))
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    flips, holes, offsets = [], [], set()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small tensor ops: one thread is faster, and robust to a busy machine
    try:
        for epoch in range(2):
            (x, y), = collect(b.train, epoch)
            for img, label in zip(x, y):
                # the original is the unique training image with this label whose crop explains `img`
                found = [e for i in np.flatnonzero(labels == int(label))
                         if (e := explain(img, images[i], mean, std)) is not None]
                assert len(found) == 1, "each augmented image is a crop/flip/cutout of exactly one original"
                flipped, dy, dx, hole = found[0]
                flips.append(flipped)
                offsets.add((dy, dx))
                holes.append(hole)
    finally:
        torch.set_num_threads(threads)
    holes = np.array(holes)
    assert 64 <= holes.min() and holes.max() <= 256 and (holes == 256).any()  # 8x8 (corner) .. 16x16
    assert 0.3 < np.mean(flips) < 0.7  # 80 draws of p=0.5
    assert len(offsets) > 35  # spread over the 81 possible windows (about 51 distinct expected)


def test_resident_is_the_default_and_resident_rejected_for_folder_datasets(cifar_root, tmp_path):
    root, _ = cifar_root
    assert build_data(opts(root)).extras["loader"] == "resident"
    with pytest.raises(ValueError, match="loader=resident"):
        build_data({"name": "tiny_imagenet", "root": str(tmp_path), "loader": "resident", "download": False})


@pytest.mark.gpu
def test_resident_loader_on_cuda(cifar_root):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    root, written = cifar_root
    ctx = BuildContext(seed=0, device=torch.device("cuda"))
    a, b = build_data(opts(root), ctx), build_data(opts(root), ctx)
    for (xa, ya), (xb, yb) in zip(a.train.iterate(0), b.train.iterate(0)):
        assert xa.is_cuda and torch.equal(xa, xb) and torch.equal(ya, yb)
    (xe, _), = collect(a.evals["test"], 0)
    (xc, _), = collect(build_data(opts(root)).evals["test"], 0)
    assert torch.equal(xe.cpu(), xc)  # same normalisation on both devices
    images, labels = written["cifar10"]["train"]
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    for x, y in a.train.iterate(1):
        for img, label in zip(x.cpu(), y.cpu()):
            assert any(explain(img, images[i], mean, std) is not None for i in np.flatnonzero(labels == int(label)))
