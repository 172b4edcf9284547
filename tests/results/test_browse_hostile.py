"""`results` commands on a store with planted content (issue 19, Low): terminal escape sequences in run-dir
names are shown escaped, an `error.txt` link is not followed, and damaged W&B files and Optuna databases give
a message (never a traceback), and are never written to."""
from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys

from tests.results.test_browse import ROOT, _records, run_cli, store, write_wandb_file  # noqa: F401 - fixture

ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x1b[31m\x9b1m\u202e"


def test_escape_sequences_in_run_dir_names_are_shown_escaped(store, capsys):  # noqa: F811 - the fixture
    root, runs = store
    hostile = runs["adam0"].path.with_name("evil" + ESCAPES)
    runs["adam0"].path.rename(hostile)
    for argv in (("ls", "--store", str(root)), ("show", "evil", "--store", str(root))):
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 0, err
        assert "evil" in out
        for c in ("\x1b", "\x07", "\x9b", "\u202e"):
            assert c not in out and c not in err
        assert "\\x1b]0;pwned\\x07" in out


def test_an_error_txt_link_is_not_followed(store, tmp_path, capsys):  # noqa: F811
    root, runs = store
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    runs["sgd1"].error_path.symlink_to(secret)
    rc, out, _ = run_cli(capsys, "show", runs["sgd1"].run_id, "--store", str(root))
    assert rc == 0 and "root:x:0:0" not in out
    assert "error.txt: not shown" in out and "symbolic link" in out


def test_error_txt_escapes_are_escaped_too(store, capsys):  # noqa: F811
    root, runs = store
    runs["sgd1"].error_path.write_text("Traceback\nValueError: \x1b[2Jgone\n")
    rc, out, _ = run_cli(capsys, "show", runs["sgd1"].run_id, "--store", str(root))
    assert rc == 0 and "\x1b" not in out and "ValueError: \\x1b[2Jgone" in out


def test_a_garbled_wandb_file_is_a_message(store, tmp_path, capsys):  # noqa: F811
    root, runs = store
    good = tmp_path / "good" / "run-abc.wandb"
    write_wandb_file(good, _records("abc", 5))
    data = bytearray(good.read_bytes())
    cases = {}
    flipped = bytearray(data)
    flipped[40] ^= 0xFF  # a bit flip in the first record's payload
    cases["fails its CRC-32 checksum"] = bytes(flipped)
    long = bytearray(data)
    long[7 + 4 : 7 + 6] = (60000).to_bytes(2, "little")  # the first record claims more than its block
    cases["past its block"] = bytes(long)
    garbage = bytearray(data[:7])  # a valid header and a record whose checksum matches but is not a protobuf
    import struct
    import zlib

    payload = b"\xff\xff\xff\xff"
    garbage += struct.pack("<IHB", zlib.crc32(bytes([1]) + payload), len(payload), 1) + payload
    cases["does not decode"] = bytes(garbage)
    for message, blob in cases.items():
        bad = tmp_path / "bad" / "run-abc.wandb"
        bad.parent.mkdir(exist_ok=True)
        bad.write_bytes(blob)
        rc, out, err = run_cli(capsys, "wandb", str(bad))
        assert rc == 2 and message in err and "is damaged" in err, (message, err)
        p = subprocess.run([sys.executable, "-m", "fisherbench", "results", "wandb", str(bad)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and "Traceback" not in p.stderr and message in p.stderr


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_garbage_and_foreign_databases_in_optuna_are_messages_and_left_unchanged(store, capsys):  # noqa: F811
    root, _ = store
    (root / "_optuna").mkdir()
    garbage = root / "_optuna" / "garbage.db"
    garbage.write_bytes(b"SQLite format 3\x00" + b"\x13" * 3000)  # looks like SQLite, is not
    foreign = root / "_optuna" / "notes.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE notes (text TEXT)")
    con.execute("INSERT INTO notes VALUES ('mine')")
    con.commit()
    con.close()
    before = {p: _sha(p) for p in (garbage, foreign)}
    rc, out, err = run_cli(capsys, "trials", "--store", str(root))
    assert rc == 0, err
    assert f"{garbage} is not a readable Optuna storage" in err
    assert f"{foreign} is not a readable Optuna storage: an SQLite database without Optuna's tables" in err
    assert {p: _sha(p) for p in before} == before  # Optuna would have created its tables in notes.db
    con = sqlite3.connect(f"file:{foreign}?mode=ro", uri=True)
    assert [r[0] for r in con.execute("SELECT name FROM sqlite_master")] == ["notes"]
    con.close()
    assert sorted(p.name for p in (root / "_optuna").iterdir()) == ["garbage.db", "notes.db"]  # no journal left
    p = subprocess.run([sys.executable, "-m", "fisherbench", "results", "trials", "--store", str(root)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "Traceback" not in p.stderr
