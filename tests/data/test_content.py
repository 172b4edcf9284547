"""The run-id content of every dataset read from files a user can change: another byte in any file changes
it, the same files in another folder keep it, an unchanged tree is not read again (stat only), and datasets
with fixed content have none."""
import shutil

import pytest

import fisherbench.data.content as content
from fisherbench.data.registry import data_content
from tests.data_fakes import make_cifar, make_gpt1_tokenizer, make_image_folder, make_tiny_imagenet, make_wikitext_raw


def _cifar(root):
    make_cifar(root)
    return {"name": "cifar10", "root": str(root), "download": False}, root / "cifar-10-batches-py" / "data_batch_3"


def _tiny(root):
    base = make_tiny_imagenet(root)
    return ({"name": "tiny_imagenet", "root": str(root), "download": False},
            sorted((base / "train" / "n01443537" / "images").iterdir())[0])


def _imagenet(root):
    make_image_folder(root)
    return {"name": "imagenet", "root": str(root)}, sorted((root / "val" / "n01440764").iterdir())[0]


def _wikitext(root):
    folder = make_wikitext_raw(root)
    make_gpt1_tokenizer(root / "openai-gpt")
    return {"name": "wikitext2", "root": str(root), "download": False}, folder / "wiki.test.raw"


@pytest.mark.parametrize("make", [_cifar, _tiny, _imagenet, _wikitext], ids=["cifar10", "tiny_imagenet",
                                                                           "imagenet", "wikitext2"])
def test_content_follows_the_bytes_not_the_folder(tmp_path, monkeypatch, make):
    opts, victim = make(tmp_path / "a")
    first = data_content(opts)
    assert first.startswith(f"{opts['name']}:sha256=")
    reads = []
    real = content.file_sha256
    monkeypatch.setattr(content, "file_sha256", lambda p: reads.append(p) or real(p))
    assert data_content(opts) == first and reads == []  # cached: a stat per file, no read
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert data_content({**opts, "root": str(tmp_path / "b")}) == first  # the same files elsewhere
    with open(victim, "ab") as f:
        f.write(b"\0")
    assert data_content(opts) != first
    assert len(reads) >= 1 and all("/b/" in str(r) or str(victim.parent) in str(r) for r in reads)


def test_fixed_content_datasets_have_none():
    for name in ("mnist5k", "digits", "synthetic_image", "synthetic_tokens"):
        assert data_content({"name": name}) is None
