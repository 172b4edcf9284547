"""data=text_files on fabricated UTF-8 files: byte / char / trained-BPE / vocab.json+merges.txt tokenisers
(ids checked against independent encodings), the on-disk caches, the tail validation split, clear errors, and
a language-model run with a tokenizer trained on the fly."""
import json
import math

import numpy as np
import pytest

import fisherbench.data.text_files as tf
from fisherbench.core.errors import UserError
from fisherbench.data.download import DatasetNotFoundError
from fisherbench.data.registry import build_data
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
    x, y = source.inputs.cpu().numpy(), source.targets.cpu().numpy()
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
    assert b.fingerprint.startswith("text_files:gpt1-bpe:")
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
        targets = b.evals[split].targets
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
