"""WikiText-2 pipeline on hand-made raw files and a GPT-1-format tokenizer built from local vocab/merges:
tokenisation, 257-token windows with stride 256 (brute force), masking, per-token NLL accounting, cache."""
import math

import numpy as np
import pytest
import torch

import fisherbench.data.wikitext as wt
from fisherbench.data.download import OFFLINE_ENV, DatasetNotFoundError
from fisherbench.data.registry import BuildContext, build_data
from tests.data_fakes import WIKI_TEXT, make_gpt1_tokenizer, make_wikitext_raw


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    monkeypatch.setenv(OFFLINE_ENV, "1")


@pytest.fixture
def tok_dir(tmp_path):
    return make_gpt1_tokenizer(tmp_path / "openai-gpt")


def test_gpt1_tokenizer_lowercases_uses_end_of_word_merges_and_unk(tok_dir):
    tok = wt.gpt1_tokenizer(tok_dir)
    enc = tok.encode(" = The CAT = \n the cat sat on the mat . Zoë, #", add_special_tokens=False)
    assert enc.tokens == ["=</w>", "the</w>", "cat</w>", "=</w>", "the</w>", "cat</w>", "sat</w>", "on</w>",
                          "the</w>", "mat</w>", ".</w>", "z", "o", "e</w>", ",</w>", "<unk>"]
    vocab = __import__("json").loads((tok_dir / "vocab.json").read_text())
    assert tok.get_vocab_size() == len(vocab) and enc.ids[1] == vocab["the</w>"]
    assert tok.decode(enc.ids[:3]) == "= the cat"


def test_encode_text_by_lines_equals_encoding_the_whole_text(tok_dir):
    tok = wt.gpt1_tokenizer(tok_dir)
    text = WIKI_TEXT["train"] * 3
    assert wt.encode_text(tok, text).tolist() == tok.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("n,seq_len", [(2, 4), (9, 4), (10, 4), (11, 4), (1000, 256), (513, 256)])
def test_make_windows_brute_force(n, seq_len):
    tokens = np.random.default_rng(n).integers(1, 50, n)
    inputs, targets = wt.make_windows(tokens, seq_len)
    num_windows = math.ceil((n - 1) / seq_len)
    assert inputs.shape == targets.shape == (num_windows, seq_len)
    assert inputs.dtype == targets.dtype == torch.int64
    for w in range(num_windows):
        for t in range(seq_len):
            pos = w * seq_len + t  # window w covers tokens[w*T : w*T + T + 1]
            assert inputs[w, t] == (tokens[pos] if pos < n else 0)
            assert targets[w, t] == (tokens[pos + 1] if pos + 1 < n else -100)
    # every next-token target appears exactly once
    assert int((targets != -100).sum()) == n - 1
    assert sorted(targets[targets != -100].tolist()) == sorted(tokens[1:].tolist())
    with pytest.raises(ValueError):
        wt.make_windows(tokens[:1], seq_len)


def wiki_opts(root, tok, **kw):
    base = dict(name="wikitext2", root=str(root), tokenizer_dir=str(tok), download=False, batch_size=2, seq_len=8)
    base.update(kw)
    return base


def test_bundle_splits_shapes_and_summed_nll_is_per_token(tmp_path, tok_dir):
    make_wikitext_raw(tmp_path, repeat=3)
    b = build_data(wiki_opts(tmp_path, tok_dir), BuildContext(seed=0))
    tok = wt.gpt1_tokenizer(tok_dir)
    assert b.task == "language_model" and b.num_classes == tok.get_vocab_size() and b.input_shape == (8,)
    assert set(b.evals) == {"val", "test"} and b.extras["ignore_index"] == -100
    assert b.extras["vocabulary"] == "gpt1"  # GPT-1's ids: the GPT models keep the paper's frozen embeddings
    streams = {s: tok.encode(WIKI_TEXT[f] * 3, add_special_tokens=False).ids
               for s, f in (("train", "train"), ("val", "valid"), ("test", "test"))}
    assert b.extras["tokens"] == {s: len(v) for s, v in streams.items()}
    assert b.num_train == math.ceil((len(streams["train"]) - 1) / 8)
    # a fixed unigram model: the summed masked NLL over the batches = the brute-force sum over the stream
    logp = torch.log_softmax(torch.randn(b.num_classes, generator=torch.Generator().manual_seed(0)), 0)
    for split in ("val", "test"):
        total, count = 0.0, 0
        for _x, y in b.evals[split].iterate(0):
            logits = logp.expand(*y.shape, -1)
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, b.num_classes), y.reshape(-1),
                                                       reduction="sum").item()
            count += int((y != -100).sum())
        stream = streams[split]
        assert count == len(stream) - 1
        assert total == pytest.approx(-sum(logp[t].item() for t in stream[1:]), rel=1e-5)
    batches = list(b.train.iterate(0))
    again = list(build_data(wiki_opts(tmp_path, tok_dir), BuildContext(seed=0)).train.iterate(0))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(batches, again))


def test_tokenised_splits_are_cached_and_invalidated_when_text_changes(tmp_path, tok_dir, monkeypatch):
    folder = make_wikitext_raw(tmp_path)
    first = build_data(wiki_opts(tmp_path, tok_dir))
    cached = sorted((folder / "gpt1_cache").glob("*.bin"))
    assert len(cached) == 3

    def no_tokenising(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(wt, "encode_text", no_tokenising)
    second = build_data(wiki_opts(tmp_path, tok_dir))
    assert second.fingerprint == first.fingerprint
    (folder / "wiki.test.raw").write_text(" the end . \n")
    with pytest.raises(AssertionError, match="cache"):
        build_data(wiki_opts(tmp_path, tok_dir))


def test_altered_token_ids_are_rebuilt_not_trained_on(tmp_path, tok_dir, capsys):
    folder = make_wikitext_raw(tmp_path, repeat=3)
    first = build_data(wiki_opts(tmp_path, tok_dir))
    assert isinstance(first.train.tokens, np.memmap) and first.train.tokens.dtype == np.uint16
    stream = first.train.tokens.tolist()
    [train_bin] = (folder / "gpt1_cache").glob("wiki.train.raw.*.bin")
    altered = np.frombuffer(train_bin.read_bytes(), dtype="<u2").copy()
    altered[0] = (altered[0] + 1) % first.num_classes
    train_bin.write_bytes(altered.tobytes())
    capsys.readouterr()
    second = build_data(wiki_opts(tmp_path, tok_dir))
    assert "not usable" in capsys.readouterr().err
    assert second.train.tokens.tolist() == stream and train_bin.read_bytes() != altered.tobytes()


def test_tokens_variant_reads_the_tokens_files(tmp_path, tok_dir):
    folder = tmp_path / "wikitext-2"
    folder.mkdir()
    for stem, text in WIKI_TEXT.items():
        (folder / f"wiki.{stem}.tokens").write_text(text.replace("mat", "<unk>"))
    b = build_data(wiki_opts(tmp_path, tok_dir, variant="tokens", cache=False))
    assert b.fingerprint.startswith("wikitext2-tokens:")
    with pytest.raises(ValueError, match="variant"):
        build_data(wiki_opts(tmp_path, tok_dir, variant="nope"))


def test_missing_text_or_tokenizer_gives_clear_messages(tmp_path, tok_dir):
    with pytest.raises(DatasetNotFoundError) as e:
        build_data(wiki_opts(tmp_path, tok_dir))
    assert "wikitext-2-raw" in str(e.value) and "prepare-data wikitext2" in str(e.value)
    with pytest.raises(DatasetNotFoundError, match="Downloading it failed.*FISHERBENCH_OFFLINE"):
        build_data(wiki_opts(tmp_path, tok_dir, download=True))
    make_wikitext_raw(tmp_path)
    with pytest.raises(DatasetNotFoundError) as e:
        build_data(wiki_opts(tmp_path, tmp_path / "no_tokenizer"))
    assert "vocab.json" in str(e.value) and "prepare-data gpt1_tokenizer" in str(e.value)
    assert "tokenizer_dir" in str(e.value)


def test_text_files_are_written_from_the_hf_dataset_rows(tmp_path, tok_dir, monkeypatch):
    import datasets

    rows = {"train": [" = A = \n", "", " the cat sat . \n"], "validation": [" the mat \n"], "test": [" on the \n"]}
    calls = []

    def fake_load_dataset(name, config):
        calls.append((name, config))
        return {split: {"text": lines} for split, lines in rows.items()}

    monkeypatch.delenv(OFFLINE_ENV)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    b = build_data(wiki_opts(tmp_path, tok_dir, download=True, cache=False, batch_size=1))  # 1 window of 8
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1")]
    assert (tmp_path / "wikitext-2-raw" / "wiki.train.raw").read_text() == " = A = \n\n the cat sat . \n"
    assert (tmp_path / "wikitext-2-raw" / "wiki.valid.raw").read_text() == " the mat \n"
    assert b.extras["tokens"] == {"train": 7, "val": 2, "test": 2}


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache for every test here (the machine's own cache must not leak in)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_gpt1_tokenizer_fetch_honours_hf_hub_offline(tmp_path, hf_cache, monkeypatch):
    calls = []
    monkeypatch.setattr(wt, "download", lambda url, dest, *a, **k: calls.append(url))
    monkeypatch.delenv(OFFLINE_ENV)
    for value in ("1", "true", "ON"):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        with pytest.raises(DatasetNotFoundError) as e:
            wt.ensure_tokenizer(tmp_path / "openai-gpt", download_missing=True)
        msg = str(e.value)
        assert f"HF_HUB_OFFLINE={value} is set" in msg and "not contacted" in msg
        assert "prepare-data gpt1_tokenizer" in msg and "tokenizer_dir" in msg
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(DatasetNotFoundError, match="FISHERBENCH_OFFLINE=1 is set"):
        wt.ensure_tokenizer(tmp_path / "openai-gpt", download_missing=True)
    assert calls == []  # nothing was fetched
    monkeypatch.delenv(OFFLINE_ENV)
    wt.ensure_tokenizer(tmp_path / "openai-gpt", download_missing=True)
    assert calls == list(wt.GPT1_FILES.values())  # online: the Hub URLs


def test_gpt1_tokenizer_comes_from_the_local_hf_cache_offline(tmp_path, hf_cache, monkeypatch):
    # the hub cache layout: models--org--name/{refs/main, snapshots/<revision>/<file>}
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_cache / "models--openai-community--openai-gpt"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    make_gpt1_tokenizer(repo / "snapshots" / revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(wt, "download", lambda *a, **k: pytest.fail("downloaded"))
    folder = wt.ensure_tokenizer(tmp_path / "openai-gpt", download_missing=True)
    for name in wt.GPT1_FILES:
        assert (folder / name).read_bytes() == (repo / "snapshots" / revision / name).read_bytes()
    make_wikitext_raw(tmp_path)
    b = build_data({"name": "wikitext2", "root": str(tmp_path), "download": False, "batch_size": 1, "seq_len": 8})
    assert b.num_classes == wt.gpt1_tokenizer(folder).get_vocab_size()


def test_tokenize_split_in_small_blocks_equals_the_whole_text(tmp_path, tok_dir, monkeypatch):
    from fisherbench.data import token_ids as ti

    monkeypatch.setattr(ti, "CHUNK_BYTES", 50)  # blocks cut mid-line: the encoder waits for a line break
    folder = make_wikitext_raw(tmp_path, repeat=3)
    path = folder / "wiki.train.raw"
    path.write_text(path.read_text() + " Zoë's tail\r\n = B = \n\n last line without newline", encoding="utf-8")
    tok = wt.gpt1_tokenizer(tok_dir)
    ids = wt.tokenize_split(path, tok_dir, tok, cache=False)
    assert ids.tolist() == tok.encode(path.read_bytes().decode("utf-8"), add_special_tokens=False).ids
