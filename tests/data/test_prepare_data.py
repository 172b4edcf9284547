"""python -m fisherbench prepare-data without network: offline failures are reported per target with the path and a
fix, and the local parts (checksum report, val reorganisation, tokenising + cache, ImageNet check) work on
hand-made files."""

import pytest

from fisherbench.data.download import OFFLINE_ENV, file_digest
from tests.data_fakes import make_cifar, make_gpt1_tokenizer, make_image_folder, make_tiny_imagenet, make_wikitext_raw


@pytest.fixture(scope="module")
def prepare():
    from fisherbench import prepare_data

    return prepare_data


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    monkeypatch.setenv(OFFLINE_ENV, "1")


def test_offline_failures_are_reported_per_target(prepare, tmp_path, capsys):
    assert prepare.main(["--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    for target, folder in (("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                           ("tiny_imagenet", "tiny-imagenet-200"), ("wikitext2", "wikitext-2-raw")):
        assert f"== {target}" in out and str(tmp_path / folder) in out
        assert f"prepare-data {target} --root {tmp_path}" in out
    assert "4 of 4 failed" in out and "FISHERBENCH_OFFLINE" in out


def test_check_reports_checksums_and_rejects_hand_made_cifar(prepare, tmp_path, capsys):
    make_cifar(tmp_path, "cifar10", per_file=2)
    assert prepare.main(["cifar10", "--root", str(tmp_path), "--check"]) == 1
    assert "MD5 mismatch" in capsys.readouterr().out
    assert prepare.main(["cifar10", "--root", str(tmp_path), "--check", "--no-verify"]) == 0
    out = capsys.readouterr().out
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    assert "10 train / 2 test images, 10 classes" in out and f"md5:{file_digest(batch)}" in out


def test_tiny_imagenet_is_reorganised_and_counted(prepare, tmp_path, capsys):
    base = make_tiny_imagenet(tmp_path, train_per_class=2, val_per_class=2)
    assert prepare.main(["tiny_imagenet", "--root", str(tmp_path), "--check"]) == 1  # 3 classes, not 200
    assert "expected 200" in capsys.readouterr().out
    assert prepare.main(["tiny_imagenet", "--root", str(tmp_path), "--check", "--no-verify"]) == 0
    assert "3 classes, 6 train / 6 val images" in capsys.readouterr().out
    assert not (base / "val" / "images").exists()


def test_wikitext_is_tokenised_and_cached(prepare, tmp_path, capsys):
    make_wikitext_raw(tmp_path)
    make_gpt1_tokenizer(tmp_path / "openai-gpt")
    assert prepare.main(["wikitext2", "--root", str(tmp_path), "--check"]) == 1  # not GPT-1's 40,478 tokens
    assert "40478" in capsys.readouterr().out
    assert prepare.main(["wikitext2", "--root", str(tmp_path), "--check", "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert "GPT-1 tokens" in out and "sha256:" in out
    assert len(list((tmp_path / "wikitext-2-raw" / "gpt1_cache").glob("*.bin"))) == 3


def test_imagenet_check(prepare, tmp_path, capsys):
    assert prepare.main(["imagenet", "--imagenet-root", str(tmp_path)]) == 1
    assert "image-net.org" in capsys.readouterr().out
    make_image_folder(tmp_path / "imagenet", classes=("a", "b"))
    assert prepare.main(["imagenet", "--root", str(tmp_path), "--no-verify"]) == 0
    assert "2 classes, 6 train / 4 val images" in capsys.readouterr().out


def test_unknown_target_is_a_usage_error(prepare):
    with pytest.raises(SystemExit) as e:
        prepare.main(["cifar1O"])
    assert e.value.code == 2
