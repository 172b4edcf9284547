"""The search's Optuna storage (issue 19): a database in `_optuna/` that is not Optuna's (garbage, or someone
else's SQLite file) is refused with a message and left unchanged, and a link there is never followed."""
from __future__ import annotations

import hashlib
import sqlite3

from tests.sweep.test_search import TINY_CNN, _spec


def test_a_search_refuses_a_foreign_or_garbage_database_and_leaves_it_unchanged(tmp_path, capsys):
    from fisherbench.sweep.cli import main

    spec = _spec(tmp_path, TINY_CNN, "best_acc1", "  metric: best_acc1\n", trials=1)
    root = tmp_path / "runs"
    db = root / "_optuna" / "srch.db"
    db.parent.mkdir(parents=True)
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE notes (text TEXT)")
    con.commit()
    con.close()
    for content in (None, b"SQLite format 3\x00" + b"\x13" * 3000):
        if content is not None:
            db.write_bytes(content)
        before = hashlib.sha256(db.read_bytes()).hexdigest()
        assert main([str(spec), "--optuna", "--results-dir", str(root), "--threads", "1"]) == 2
        err = capsys.readouterr().err
        assert f"{db} is not a readable Optuna storage" in err and "Traceback" not in err
        assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_a_search_refuses_a_linked_database(tmp_path, capsys):
    from fisherbench.sweep.cli import main

    spec = _spec(tmp_path, TINY_CNN, "best_acc1", "  metric: best_acc1\n", trials=1)
    root = tmp_path / "runs"
    victim = tmp_path / "victim.db"
    victim.write_bytes(b"precious")
    (root / "_optuna").mkdir(parents=True)
    (root / "_optuna" / "srch.db").symlink_to(victim)
    assert main([str(spec), "--optuna", "--results-dir", str(root), "--threads", "1"]) == 2
    assert "srch.db is a symbolic link" in capsys.readouterr().err
    assert victim.read_bytes() == b"precious"
