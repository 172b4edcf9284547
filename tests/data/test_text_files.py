"""data=text_files on fabricated UTF-8 files: byte / char / trained-BPE / vocab.json+merges.txt tokenisers
(ids checked against independent encodings), the on-disk caches, the tail validation split, clear errors, and
a language-model run with a tokenizer trained on the fly."""
import json
import math

import numpy as np
import pytest
import torch

import fisherbench.data.text_files as tf
from fisherbench.core.errors import UserError
from fisherbench.data.download import DatasetNotFoundError
from fisherbench.data.loaders import epoch_order
from fisherbench.data.registry import BuildContext, build_data
from tests.data_fakes import STORY, gpt2_style_tokenizer, make_gpt1_tokenizer, make_text_files


@pytest.fixture
def files(tmp_path):
    return make_text_files(tmp_path / "text", repeat=20)


def opts(files, tmp_path, **kw):
    return {"name": "text_files", "train": str(files["train"]), "valid": str(files["valid"]),
            "test": str(files["test"]), "cache_dir": str(tmp_path / "cache"), "batch_size": 2, "seq_len": 16, **kw}


def tokens_of(bundle, split):
    """The token stream a split's windows hold: the first input, then every unmasked target (the sources keep
    the windows in order; training order is drawn per epoch)."""
    source = bundle.evals[split] if split != "train" else bundle.train
    x, y = (t.cpu().numpy() for t in source.windows(np.arange(source.num_windows)))
    out = [x[0, 0]]
    for row in y:
        out.extend(int(t) for t in row if t != -100)
    return np.asarray(out)


def test_byte_tokenizer_is_the_utf8_bytes(files, tmp_path):
    b = build_data(opts(files, tmp_path, tokenizer="byte"))
    assert b.task == "language_model" and b.num_classes == 256 and b.input_shape == (16,)
    for split, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        assert tokens_of(b, split).tolist() == list(files[name].read_bytes())
    assert b.fingerprint.startswith("text_files:byte:V=256:T=16:") and b.extras["tokenizer"] == "byte"
    assert b.extras["vocabulary"] == "byte"  # not GPT-1's: the GPT models train their embeddings


def test_char_tokenizer_uses_the_training_characters_and_unk(files, tmp_path):
    files["test"].write_text(files["test"].read_text() + "Ωmega\n", encoding="utf-8")  # Ω is not in train
    b = build_data(opts(files, tmp_path, tokenizer="char"))
    chars = sorted(set(files["train"].read_text(encoding="utf-8")))
    assert b.num_classes == len(chars) + 1
    ids = {c: i + 1 for i, c in enumerate(chars)}
    for split, name in (("train", "train"), ("test", "test")):
        text = files[name].read_text(encoding="utf-8")
        assert tokens_of(b, split).tolist() == [ids.get(c, 0) for c in text]
    assert 0 in tokens_of(b, "test").tolist() and 0 not in tokens_of(b, "train").tolist()


def test_trained_bpe_matches_the_library_and_is_cached(files, tmp_path, monkeypatch):
    b = build_data(opts(files, tmp_path, tokenizer="train", vocab_size=300, min_frequency=2))
    cached = list((tmp_path / "cache" / "text_files").glob("tokenizer-*.json"))
    assert len(cached) == 1 and b.extras["tokenizer"].startswith("trained on the training text")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(cached[0]))
    assert b.num_classes == tok.get_vocab_size() <= 300
    for split, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        text = files[name].read_text(encoding="utf-8")
        ids = tok.encode(text, add_special_tokens=False).ids  # the whole text in one call
        assert tokens_of(b, split).tolist() == ids
        assert tok.decode(ids) == text  # byte-level: lossless, no unknown tokens
    # the next build loads the tokenizer and the token ids from the cache
    monkeypatch.setattr(tf, "train_bpe", lambda *a: pytest.fail("tokenizer retrained"))
    monkeypatch.setattr(tf.HFTokenizer, "encode", lambda *a: pytest.fail("text re-encoded"))
    again = build_data(opts(files, tmp_path, tokenizer="train", vocab_size=300, min_frequency=2))
    assert again.fingerprint == b.fingerprint and again.extras["tokenizer"].startswith("cached")
    # other options or other training text: another tokenizer
    with pytest.raises(pytest.fail.Exception, match="retrained"):
        build_data(opts(files, tmp_path, tokenizer="train", vocab_size=280))
    files["train"].write_text(STORY * 3, encoding="utf-8")
    with pytest.raises(pytest.fail.Exception, match="retrained"):
        build_data(opts(files, tmp_path, tokenizer="train", vocab_size=300))


def test_encoding_in_pieces_equals_encoding_the_whole_text(tmp_path):
    text = (STORY * 5 + "\n\n   leading spaces after blank lines\n  \n\tx\n" + "x   \n\nY  \n \n z\u3000\n\x1c\n"
            + "tail without newline")
    tok = tf.train_bpe(text, 320, 1)
    assert tf.HFTokenizer(tok, "bpe").encode(text).tolist() == tok.encode(text, add_special_tokens=False).ids
    gpt1 = tf.folder_tokenizer(make_gpt1_tokenizer(tmp_path / "gpt1"))
    assert gpt1.encode(text).tolist() == gpt1.tokenizer.encode(text, add_special_tokens=False).ids


def test_gpt2_format_folder(files, tmp_path):
    folder = gpt2_style_tokenizer(tmp_path / "gpt2", files["train"].read_text(encoding="utf-8"), vocab_size=290)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert "Ġ" in vocab and (folder / "merges.txt").read_text().startswith("#version")
    b = build_data(opts(files, tmp_path, tokenizer=str(folder)))
    assert b.num_classes == len(vocab) and b.extras["tokenizer"] == str(folder)
    # independent decoding: vocab id -> symbol -> bytes through GPT-2's byte-to-unicode table (written out as
    # in GPT-2's encoder.py: printable bytes map to themselves, the rest to 256, 257, ...)
    inverse = {i: s for s, i in vocab.items()}
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for byte in range(256):
        if byte not in bs:
            bs.append(byte)
            cs.append(256 + n)
            n += 1
    symbol_to_byte = {chr(c): b for b, c in zip(bs, cs)}
    decoded = bytes(symbol_to_byte[ch] for i in tokens_of(b, "test") for ch in inverse[int(i)])
    assert decoded == files["test"].read_bytes()


def test_gpt1_format_folder(files, tmp_path):
    folder = make_gpt1_tokenizer(tmp_path / "gpt1")
    b = build_data(opts(files, tmp_path, tokenizer=str(folder)))
    assert b.fingerprint.startswith("text_files:gpt1-bpe:") and b.extras["vocabulary"] == "gpt1"  # frozen embeddings
    from fisherbench.data.wikitext import encode_text, gpt1_tokenizer

    assert tokens_of(b, "test").tolist() == encode_text(gpt1_tokenizer(folder),
                                                         files["test"].read_text(encoding="utf-8")).tolist()


def test_val_fraction_holds_out_the_end_of_the_training_text(files, tmp_path):
    text = files["train"].read_text(encoding="utf-8")
    b = build_data(opts(files, tmp_path, valid=None, val_fraction=0.1, tokenizer="byte"))
    head, tail = bytes(tokens_of(b, "train").astype(np.uint8)), bytes(tokens_of(b, "val").astype(np.uint8))
    assert (head + tail).decode("utf-8") == text and head.endswith(b"\n")
    assert abs(len(tail) / len(text.encode()) - 0.1) < 0.05
    assert ":val=tail0.1:" in b.fingerprint and b.extras["files"]["val"] == "last 0.1 of the training text"
    # a tokenizer trained here never sees the held-out tail
    b = build_data(opts(files, tmp_path, valid=None, val_fraction=0.1, tokenizer="char"))
    assert b.num_classes == len(set(head.decode("utf-8"))) + 1


def test_windows_count_and_per_token_accounting(files, tmp_path):
    b = build_data(opts(files, tmp_path, tokenizer="byte", seq_len=16))
    n = len(files["train"].read_bytes())
    assert b.num_train == math.ceil((n - 1) / 16) and b.extras["tokens"]["train"] == n
    for split in ("val", "test"):
        targets = b.evals[split].windows(np.arange(b.evals[split].num_windows))[1]
        assert int((targets != -100).sum()) == b.extras["tokens"][split] - 1


def test_clear_errors(files, tmp_path):
    with pytest.raises(UserError, match="needs data.valid"):
        build_data(opts(files, tmp_path, valid=None))
    with pytest.raises(UserError, match="not both"):
        build_data(opts(files, tmp_path, val_fraction=0.1))
    with pytest.raises(UserError, match="needs data.train"):
        build_data(opts(files, tmp_path, train=None))
    with pytest.raises(DatasetNotFoundError, match="is not a file"):
        build_data(opts(files, tmp_path, test=str(tmp_path / "nope.txt")))
    files["test"].write_bytes(b"caf\xe9 latin-1\n")
    with pytest.raises(DatasetNotFoundError, match="not UTF-8 text.*iconv"):
        build_data(opts(files, tmp_path))
    files["test"].write_text("  \n\n", encoding="utf-8")
    with pytest.raises(DatasetNotFoundError, match="holds no text"):
        build_data(opts(files, tmp_path))
    files["test"].write_text("ok\n", encoding="utf-8")
    with pytest.raises(DatasetNotFoundError, match="byte, char, train or a folder"):
        build_data(opts(files, tmp_path, tokenizer="gpt2"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "vocab.json").write_text("{}")
    with pytest.raises(DatasetNotFoundError, match=r"lacks \['merges.txt'\]"):
        build_data(opts(files, tmp_path, tokenizer=str(tmp_path / "half")))
    with pytest.raises(UserError, match="vocab_size must be >= 256"):
        build_data(opts(files, tmp_path, tokenizer="train", vocab_size=100))
    with pytest.raises(UserError, match="batch_size=4096 is larger than"):
        build_data(opts(files, tmp_path, batch_size=4096))


def test_text_files_run_with_a_tokenizer_trained_on_the_fly(run_train, files, tmp_path):
    r = run_train("data=text_files", f"data.train={files['train']}", f"data.valid={files['valid']}",
                  f"data.test={files['test']}", "data.tokenizer=train", "data.vocab_size=300",
                  f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=16", "data.batch_size=4",
                  "budget=steps", "budget.steps=2", base=["model=tiny_gpt", "optimizer=adam", "logger=none"])
    final = r.summary["final"]
    assert r.summary["status"] == "completed"
    for split in ("val", "test"):
        assert final[f"{split}/ppl"] == pytest.approx(math.exp(final[f"{split}/loss"]), rel=1e-9)
    meta = json.loads((r.run_dir / "meta.json").read_text())
    assert meta["dataset"]["fingerprint"].startswith("text_files:bpe-trained:V=")


# --------------------------------------------------------------------------- large inputs, caches, messages


def test_ids_are_a_memory_mapped_uint16_or_uint32_file_by_vocabulary(files, tmp_path):
    from fisherbench.data import token_ids as ti

    assert ti.id_dtype(256) == np.uint16 and ti.id_dtype(65536) == np.uint16  # ids 0..65535 fit 16 bits
    assert ti.id_dtype(65537) == np.uint32 and ti.id_dtype(100_000) == np.uint32
    b = build_data(opts(files, tmp_path, tokenizer="byte"))
    tokens = b.train.tokens
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    bins = sorted((tmp_path / "cache" / "text_files").glob("ids-*.bin"))
    assert len(bins) == 3 and {p.stat().st_size for p in bins} >= {2 * len(files["train"].read_bytes())}
    # a vocabulary past 16 bits is written as uint32 (and read back equal)
    key = ti.IdsKey("0" * 64, "test", 70_000)
    chunks = [np.array([0, 69_999, 65_536], dtype=np.int64), np.array([7], dtype=np.int64)]
    ids = ti.cached_ids(key, tmp_path / "big.bin", "test ids", lambda: iter(chunks))
    assert ids.dtype == np.uint32 and ids.tolist() == [0, 69_999, 65_536, 7]
    assert (tmp_path / "big.bin").stat().st_size == 16
    again, problem = ti.open_ids(tmp_path / "big.bin", key)
    assert problem is None and again.tolist() == ids.tolist()


def test_block_wise_encoding_equals_the_whole_text_for_every_tokenizer(tmp_path, monkeypatch):
    """Regression for the streaming build: files read in tiny blocks give the ids that encoding each whole
    text at once gives (the encoding before ids were streamed)."""
    from fisherbench.data import token_ids as ti

    monkeypatch.setattr(ti, "CHUNK_BYTES", 97)  # many blocks, cut mid-line and mid-character
    files = make_text_files(tmp_path / "text", repeat=6)
    files["train"].write_text(files["train"].read_text(encoding="utf-8") + "naïve café Ωmega 日本語\n"
                              + "x" * 300 + "\n  \n\ttail", encoding="utf-8")
    texts = {name: files[name].read_text(encoding="utf-8") for name in ("train", "valid", "test")}
    tok = tf.train_bpe(texts["train"], 300, 2)  # the in-memory training of the earlier code
    chars = sorted(set(texts["train"]))
    whole = {
        "byte": lambda t: list(t.encode("utf-8")),
        "char": lambda t: [chars.index(c) + 1 if c in chars else 0 for c in t],
        "train": lambda t: tok.encode(t, add_special_tokens=False).ids,
    }
    for kind, reference in whole.items():
        b = build_data(opts(files, tmp_path, tokenizer=kind, vocab_size=300, cache=False))
        if kind == "train":
            assert b.extras["tokenizer_sha256"] == tf.HFTokenizer(tok, "bpe-trained").digest  # same tokenizer
        for split, name in (("train", "train"), ("val", "valid"), ("test", "test")):
            assert tokens_of(b, split).tolist() == reference(texts[name]), (kind, split)


def test_window_batches_equal_the_in_memory_windows(files, tmp_path):
    from fisherbench.data.wikitext import make_windows

    b = build_data(opts(files, tmp_path, tokenizer="byte", batch_size=3, seq_len=16), BuildContext(seed=5))
    inputs, targets = make_windows(np.frombuffer(files["train"].read_bytes(), dtype=np.uint8), 16)
    order = epoch_order(len(inputs), 5, 1, True)
    for i, (x, y) in enumerate(b.train.iterate(1)):
        idx = order[i * 3:(i + 1) * 3]
        assert torch.equal(x, inputs[idx]) and torch.equal(y, targets[idx])
    assert i + 1 == len(b.train) == math.ceil(len(inputs) / 3)
    later = list(b.train.iterate(1, start_batch=2))  # a resumed epoch starts at its batch
    assert torch.equal(later[0][0], inputs[order[6:9]])


def test_altered_token_id_cache_is_detected_and_rebuilt(files, tmp_path, capsys):
    first = build_data(opts(files, tmp_path, tokenizer="train", vocab_size=300))
    reference = tokens_of(first, "train").tolist()
    folder = tmp_path / "cache" / "text_files"
    [bin_path] = [p for p in folder.glob("ids-*.bin") if p.stat().st_size == 2 * first.extras["tokens"]["train"]]
    capsys.readouterr()
    data = bytearray(bin_path.read_bytes())
    data[10:12] = (5).to_bytes(2, "little") if data[10:12] != (5).to_bytes(2, "little") else (6).to_bytes(2, "little")
    bin_path.write_bytes(bytes(data))  # one id changed, same length
    again = build_data(opts(files, tmp_path, tokenizer="train", vocab_size=300))
    err = capsys.readouterr().err
    assert "not usable" in err and "altered" in err and str(bin_path) in err
    assert tokens_of(again, "train").tolist() == reference  # rebuilt, not trained on the altered ids
    assert (folder / bin_path.name).read_bytes() != bytes(data)
    # the JSON record is untrusted input too: wrong types, out-of-range ids, garbage
    meta_path = bin_path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    for bad in ({**meta, "count": "12"}, {**meta, "count": -1}, {**meta, "vocab_size": 300.0}, [1, 2],
                {**meta, "sha256": "../../etc"}, {**meta, "dtype": "object"}):
        meta_path.write_text(json.dumps(bad))
        capsys.readouterr()
        b = build_data(opts(files, tmp_path, tokenizer="train", vocab_size=300))
        assert "not usable" in capsys.readouterr().err, bad
        assert tokens_of(b, "train").tolist() == reference
    # ids beyond the vocabulary, with a matching record (a planted pair): refused
    from fisherbench.data import token_ids as ti

    planted = np.full(first.extras["tokens"]["train"], 299, dtype="<u2")
    planted[3] = 4000
    bin_path.write_bytes(planted.tobytes())
    meta_path.write_text(json.dumps({**meta, "sha256": __import__("hashlib").sha256(planted.tobytes()).hexdigest()}))
    capsys.readouterr()
    b = build_data(opts(files, tmp_path, tokenizer="train", vocab_size=300))
    assert "outside the vocabulary" in capsys.readouterr().err and tokens_of(b, "train").tolist() == reference
    assert ti.open_ids(bin_path, ti.IdsKey("0" * 64, "x", 300))[0] is None  # another key: not these ids


def test_binary_file_is_reported_as_binary_not_as_latin1(files, tmp_path):
    files["test"].write_bytes(bytes(range(256)) * 4)  # NULs and control bytes, invalid UTF-8
    with pytest.raises(DatasetNotFoundError, match="looks binary") as e:
        build_data(opts(files, tmp_path))
    assert "iconv -f latin1" not in str(e.value) and "NUL" in str(e.value)
    files["test"].write_bytes(b"\x00" * 64 + b"valid utf-8 but with NULs\n")
    with pytest.raises(DatasetNotFoundError, match="looks binary"):
        build_data(opts(files, tmp_path))
    files["test"].write_bytes("text with a few\tcontrol\x1b[1m bytes\n".encode() * 20 + b"\x07\n")
    assert build_data(opts(files, tmp_path)).extras["tokens"]["test"] > 0  # a bell or an escape is still text
    files["test"].write_bytes("utf-16 text\n".encode("utf-16"))
    with pytest.raises(DatasetNotFoundError, match="looks binary.*iconv -f utf-16"):
        build_data(opts(files, tmp_path))


def test_asking_more_vocabulary_than_the_text_gives_says_so(files, tmp_path, capsys):
    b = build_data(opts(files, tmp_path, tokenizer="train", vocab_size=100_000))
    err = capsys.readouterr().err
    assert b.num_classes < 1000
    assert f"data.vocab_size=100000 was asked, but the training text gives only V={b.num_classes}" in err
    build_data(opts(files, tmp_path, tokenizer="train", vocab_size=300))
    assert "was asked" not in capsys.readouterr().err


def test_text_files_learns_with_a_trained_tokenizer_out_of_the_box(run_train, tmp_path):
    """The README's route (model=tiny_gpt, data=text_files, tokenizer=train, default model options): the
    embeddings train, so validation loss falls well below ln V (frozen random embeddings stayed at ln V)."""
    files = make_text_files(tmp_path / "text", repeat=30)
    r = run_train("data=text_files", f"data.train={files['train']}", f"data.valid={files['valid']}",
                  f"data.test={files['test']}", "data.tokenizer=train", "data.vocab_size=300",
                  f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=32", "data.batch_size=8",
                  "optimizer.lr=0.01", "budget=steps", "budget.steps=40", "eval.every_fraction=null",
                  base=["model=tiny_gpt", "optimizer=adamw", "logger=none"])
    assert r.summary["status"] == "completed"
    meta = json.loads((r.run_dir / "meta.json").read_text())
    vocab = int(meta["dataset"]["fingerprint"].split(":V=")[1].split(":")[0])
    val_loss = r.summary["final"]["val/loss"]
    assert val_loss < 0.75 * math.log(vocab), (val_loss, math.log(vocab))  # frozen: 0.97 ln V


def test_no_cache_keeps_ids_in_an_unnamed_temporary_file(files, tmp_path):
    b = build_data(opts(files, tmp_path, tokenizer="byte", cache=False))
    assert isinstance(b.train.tokens, np.memmap)
    assert tokens_of(b, "train").tolist() == list(files["train"].read_bytes())
    assert not list((tmp_path / "cache").rglob("ids-*"))


@pytest.mark.gpu
def test_resident_ids_on_a_gpu_give_the_cpu_batches(files, tmp_path):
    cpu = build_data(opts(files, tmp_path, tokenizer="byte", batch_size=4), BuildContext(seed=3))
    gpu = build_data(opts(files, tmp_path, tokenizer="byte", batch_size=4),
                     BuildContext(seed=3, device=torch.device("cuda")))
    assert gpu.train.tokens.dtype == torch.int32 and gpu.train.tokens.is_cuda
    for (x1, y1), (x2, y2) in zip(cpu.train.iterate(0), gpu.train.iterate(0)):
        assert x2.is_cuda and torch.equal(x1, x2.cpu()) and torch.equal(y1, y2.cpu())
    for (x1, y1), (x2, y2) in zip(cpu.evals["test"].iterate(0), gpu.evals["test"].iterate(0)):
        assert torch.equal(x1, x2.cpu()) and torch.equal(y1, y2.cpu())


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.33, 0.5, 0.9])
def test_streamed_val_cut_equals_the_in_memory_cut(tmp_path, monkeypatch, fraction):
    """The held-out tail is cut where the in-memory code cut it: at the line start nearest the character
    position len * (1 - fraction), the earlier one on a tie, read here in 13-byte blocks of multi-byte text."""
    from fisherbench.data import token_ids as ti

    monkeypatch.setattr(ti, "CHUNK_BYTES", 13)
    files = make_text_files(tmp_path / "text", repeat=4)
    text = "Ωmega naïve\n日本語の文\n" + files["train"].read_text(encoding="utf-8") + "end without newline"
    files["train"].write_text(text, encoding="utf-8")
    target = int(len(text) * (1 - fraction))
    cuts = [c + 1 for c in (text.rfind("\n", 0, target), text.find("\n", target)) if 0 <= c < len(text) - 1]
    cut = min(cuts, key=lambda c: abs(c - target))
    b = build_data(opts(files, tmp_path, valid=None, val_fraction=fraction, tokenizer="byte", cache=False))
    assert bytes(tokens_of(b, "train").astype(np.uint8)).decode("utf-8") == text[:cut]
    assert bytes(tokens_of(b, "val").astype(np.uint8)).decode("utf-8") == text[cut:]
