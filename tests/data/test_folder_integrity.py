"""Hostile and careless image trees: symlink loops and links counted once, identical files across splits
(test/train overlap refused unless data.allow_duplicates=true), FIFOs and devices skipped without a read,
16-bit PNGs scaled to 8 bits; identical train/test text files refused; the content cache validated."""
import os
import shutil
import signal
import warnings

import numpy as np
import pytest

import fisherbench.data.image_folder as imf
from fisherbench.core.errors import UserError
from fisherbench.data.content import DataWarning, NotARegularFile, file_sha256, group_digests, open_regular
from fisherbench.data.registry import build_data, data_content
from tests.data_fakes import make_text_files, make_user_images


def opts(root, tmp_path, **kw):
    return {"name": "image_folder", "root": str(root), "cache_dir": str(tmp_path / "cache"), "batch_size": 2,
            "num_workers": 0, "image_size": 8, "mean": [0.5] * 3, "std": [0.25] * 3, **kw}


def all_paths(bundle):
    return [p for s in (bundle.train, *bundle.evals.values()) for p, _ in s.dataset.dataset.samples]


@pytest.fixture
def deadline():
    """Fail instead of hanging (a FIFO read blocks forever)."""
    signal.signal(signal.SIGALRM, lambda *a: pytest.fail("hung"))
    signal.alarm(60)
    yield
    signal.alarm(0)


def test_a_symlink_loop_does_not_duplicate_images(tmp_path):
    root = make_user_images(tmp_path / "imgs", {"": 6})  # flat: 12 images, test carved from them
    os.symlink(".", root / "cat" / "self")  # before: 12 images became hundreds, test entries were training files
    os.symlink("../cat", root / "dog" / "cats")  # a second link to a folder already listed
    with pytest.warns(DataWarning, match="not followed") as record:
        b = build_data(opts(root, tmp_path))
    paths = all_paths(b)
    assert len(paths) == 12 and len({os.path.realpath(p) for p in paths}) == 12
    assert b.num_train + len(b.evals["test"].dataset.dataset) == 12
    assert any("2 linked folder(s)" in str(w.message) for w in record)


def test_a_file_reached_twice_is_counted_once(tmp_path):
    root = make_user_images(tmp_path / "imgs", {"train": 3, "test": 1})
    first = sorted((root / "train" / "cat").iterdir())[0]
    os.symlink(first, root / "train" / "cat" / "zz_link.png")
    with pytest.warns(DataWarning, match="reach a file already listed"):
        b = build_data(opts(root, tmp_path))
    assert b.num_train == 6


def test_identical_images_in_train_and_test_are_refused_unless_allowed(tmp_path):
    root = make_user_images(tmp_path / "imgs", {"train": 3, "test": 2})
    src = sorted((root / "train" / "dog").iterdir())[0]
    shutil.copy(src, root / "test" / "dog" / "copy.png")
    with pytest.raises(UserError, match="1 test image.*same content as train.*allow_duplicates"):
        build_data(opts(root, tmp_path))
    with pytest.warns(DataWarning, match="1 test image"):
        b = build_data(opts(root, tmp_path, allow_duplicates=True))
    assert b.extras["duplicates"] == {"train/test": 1}


def test_duplicates_within_a_split_are_a_warning_with_the_count(tmp_path):
    root = make_user_images(tmp_path / "imgs", {"train": 3, "test": 1})
    for i in range(2):
        shutil.copy(sorted((root / "train" / "cat").iterdir())[0], root / "train" / "cat" / f"dup{i}.png")
    with pytest.warns(DataWarning, match="2 file.s. of the train split have the same content"):
        b = build_data(opts(root, tmp_path))
    assert b.extras["duplicates"] == {"train": 2}


def test_a_carved_test_split_with_copies_of_training_images_is_refused(tmp_path):
    root = make_user_images(tmp_path / "imgs", {"": 5})
    for f in list((root / "cat").iterdir()):
        shutil.copy(f, root / "cat" / f"copy_{f.name}")  # every cat image twice: the carve splits some pairs
    with pytest.raises(UserError, match="same content as train"):
        build_data(opts(root, tmp_path))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_named_like_an_image_is_skipped_without_hanging(tmp_path, deadline):
    root = make_user_images(tmp_path / "imgs", {"train": 2, "test": 1})
    os.mkfifo(root / "train" / "cat" / "pipe.png")  # before: the scan blocked forever reading it
    with pytest.warns(DataWarning, match="pipe.png .a FIFO"):
        b = build_data(opts(root, tmp_path))
    assert b.num_train == 4
    with pytest.raises(NotARegularFile, match="FIFO"):
        open_regular(root / "train" / "cat" / "pipe.png")  # O_NONBLOCK: refused without blocking


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_device_linked_as_an_image_is_never_read(tmp_path, deadline):
    root = make_user_images(tmp_path / "imgs", {"train": 2, "test": 1})
    os.symlink("/dev/zero", root / "train" / "dog" / "zero.png")  # before: MemoryError, recorded as a bug
    with pytest.warns(DataWarning, match="zero.png .a character device"):
        b = build_data(opts(root, tmp_path))
    assert b.num_train == 4
    with pytest.raises(NotARegularFile, match="character device"):
        file_sha256(root / "train" / "dog" / "zero.png")


def _save_16bit(path, values):
    from PIL import Image

    Image.fromarray(values.astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"


def test_16_bit_pngs_are_scaled_to_8_bits(tmp_path):
    root = make_user_images(tmp_path / "imgs", {"train": 1, "test": 1}, size=(8, 8))
    values = np.array([[0, 257, 32896, 65535] * 2] * 8)  # 8-bit 0, 1, 128, 255
    _save_16bit(root / "train" / "cat" / "deep.png", values)
    b = build_data(opts(root, tmp_path))
    files = b.train.dataset.dataset
    (index,) = [i for i, (p, _) in enumerate(files.samples) if p.endswith("deep.png")]
    files = files.subset([index], transform=None)
    img, _ = files[0]
    rgb = np.asarray(img)
    assert rgb.shape == (8, 8, 3) and rgb[0, :4, 0].tolist() == [0, 1, 128, 255]  # before: all 255
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    gray = imf.LabelledImageFiles(root / "train", ["cat", "dog"], mode="L", samples=[(files.samples[0][0], 0)])[0][0]
    assert np.asarray(gray)[0, :4].tolist() == [0, 1, 128, 255]


def test_floating_point_images_are_refused_with_a_message(tmp_path):
    from PIL import Image

    root = make_user_images(tmp_path / "imgs", {"train": 1, "test": 1}, size=(8, 8))
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), mode="F").save(root / "train" / "cat" / "f.tif")
    with pytest.raises(UserError, match="f.tif.*floating-point"):
        build_data(opts(root, tmp_path))


def test_identical_train_and_test_text_files_are_refused_unless_allowed(tmp_path):
    files = make_text_files(tmp_path / "text", repeat=4)
    shutil.copy(files["train"], files["test"])
    o = {"name": "text_files", "train": str(files["train"]), "valid": str(files["valid"]),
         "test": str(files["test"]), "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(UserError, match="data.train and data.test have identical content"):
        data_content(o)
    assert data_content({**o, "allow_duplicates": True}).startswith("text_files:sha256=")


def test_a_tampered_content_cache_is_recomputed_not_believed(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello")
    cache = tmp_path / "c.json"
    first = group_digests({"g": [("a", f)]}, [cache])
    cache.write_text('{"version": 1, "groups": {"g": {"key": "x", "digest": [1, 2]}}}')
    assert group_digests({"g": [("a", f)]}, [cache]) == first
    cache.write_text("[" * 100000)
    assert group_digests({"g": [("a", f)]}, [cache]) == first


def test_no_warning_for_a_clean_tree(tmp_path):
    root = make_user_images(tmp_path / "imgs", {"train": 2, "test": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        build_data(opts(root, tmp_path))


def test_a_file_removed_after_listing_is_reported_not_a_crash(tmp_path):
    root = make_user_images(tmp_path / "imgs", {"train": 1, "test": 1})
    gone = str(root / "train" / "cat" / "gone.png")
    scan = imf.scan_images(root, [gone], tmp_path / "cache", "decode")
    assert "FileNotFoundError" in scan.errors(["train/cat/gone.png"])["train/cat/gone.png"]
