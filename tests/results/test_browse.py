"""`python -m fisherbench results ls|show|best|wandb` on fabricated stores: tables, filters, sorting, user errors (exit 2,
no traceback), and an offline W&B run file written in the documented record format."""
from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from tests.results.test_profiles import make_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def store(tmp_path):
    root = tmp_path / "runs"
    runs = {
        "adam0": make_run(root, "a", "adam", 0, 2),
        "adam1": make_run(root, "a", "adam", 1, 4),
        "sgd0": make_run(root, "a", "sgd", 0, None),
        "sgd1": make_run(root, "a", "sgd", 1, 6, status="diverged"),
        "lion0": make_run(root, "b", "lion", 0, 3),
    }
    unfinished = make_run(root, "b", "lion", 1, 3)
    unfinished.summary_path.unlink()  # running or killed: no summary
    runs["lion1"] = unfinished
    return root, runs


def run_cli(capsys, *argv):
    from fisherbench.results.browse import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_ls_table_filters_and_sort(store, capsys):
    root, runs = store
    rc, out, _ = run_cli(capsys, "ls", "--store", str(root))
    lines = out.splitlines()
    assert rc == 0 and lines[0].split() == ["id", "model", "data", "optimizer", "seed", "status", "best", "train",
                                            "s", "epochs"]
    body = [line.split() for line in lines[2:8]]
    # sorted by model, data, optimizer, seed
    assert [(b[1], b[3], b[4], b[5]) for b in body] == [
        ("a", "adam", "0", "completed"), ("a", "adam", "1", "completed"), ("a", "sgd", "0", "completed"),
        ("a", "sgd", "1", "diverged"), ("b", "lion", "0", "completed"), ("b", "lion", "1", "unfinished")]
    assert body[0][0] == runs["adam0"].run_id and body[0][6:8] == ["test/acc1", "0.8500"]
    assert body[5][-1] == "10.0"  # an unfinished run: the training time of its last evaluation
    assert f"6 runs in {root}: 4 completed, 1 diverged, 1 unfinished" in out

    rc, out, _ = run_cli(capsys, "ls", "--store", str(root), "--where", "optimizer.name=adam,lion", "--status",
                         "completed")
    assert rc == 0 and {line.split()[0] for line in out.splitlines()[2:5]} == {
        runs["adam0"].run_id, runs["adam1"].run_id, runs["lion0"].run_id}
    assert "3 runs in" in out and "matching optimizer.name=adam,lion status=completed" in out

    rc, out, _ = run_cli(capsys, "ls", "--store", str(root), "--metric", "final_test_acc1", "--sort", "optimizer.name")
    assert rc == 0 and out.splitlines()[0].split()[6] == "final_test_acc1"
    assert [line.split()[3] for line in out.splitlines()[2:8]] == ["adam", "adam", "lion", "lion", "sgd", "sgd"]


def test_show_and_best(store, capsys):
    root, runs = store
    rc, out, _ = run_cli(capsys, "show", runs["sgd1"].run_id[:6], "--store", str(root), "--rows", "2")
    assert rc == 0
    assert out.splitlines()[0] == f"run {runs['sgd1'].run_id}  ({runs['sgd1'].path})"
    assert "status: diverged" in out and "  optimizer: name=sgd lr=0.001" in out
    assert "metrics: 10 evaluations; the last 2:" in out
    assert out.rstrip().splitlines()[-1].split() == ["1.0000", "9", "10", "0.8500", "0.1000", "10.0000"]
    rc, out, _ = run_cli(capsys, "best", "--store", str(root))
    assert rc == 0 and "best run per optimizer by best test top-1 (%)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[3:]}
    assert rows["adam"][1] in (runs["adam0"].run_id, runs["adam1"].run_id) and rows["adam"][3] == "85.00"
    assert rows["sgd"][1] == runs["sgd0"].run_id  # the diverged run is not a result
    assert rows["lion"][1] == runs["lion0"].run_id and rows["lion"][4] == "1"  # the unfinished one is not counted
    rc, out, _ = run_cli(capsys, "best", "--store", str(root), "--group-by", "model.name,optimizer.name",
                         "--metric", "best:train/loss")
    assert rc == 0 and out.splitlines()[1].split()[:2] == ["model.name", "optimizer.name"]


@pytest.mark.parametrize("argv,message", [
    (["ls", "--store", "{missing}"], "no results store at"),
    (["show", "ffff", "--store", "{root}"], "no run 'ffff'"),
    (["ls", "--store", "{root}", "--where", "optimizer.name"], "write KEY=VALUE"),
    (["ls", "--store", "{root}", "--metric", "nope"], "unknown metric 'nope'"),
    (["wandb", "nope", "--store", "{root}"], "no run 'nope' in"),
])
def test_user_errors_exit_2(store, tmp_path, capsys, argv, message):
    root, _ = store
    argv = [a.format(root=root, missing=tmp_path / "missing") for a in argv]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and message in err and "Traceback" not in err


def test_module_entry_point(store):
    """`python -m fisherbench results` from the repository root: a table on stdout, a user error as one line and exit 2."""
    root, _ = store
    ok = subprocess.run([sys.executable, "-m", "fisherbench", "results", "ls", "--store", str(root)], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0 and "6 runs in" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "fisherbench", "results", "show", "zzz", "--store", str(root)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("[results] no run 'zzz'") and "Traceback" not in bad.stderr


# ------------------------------------------------------------------------------------------------- W&B
def write_wandb_file(path: Path, records: list[bytes], block: int = 32 * 1024) -> None:
    """The documented LevelDB-style log: a 7-byte file header, then 32 KiB blocks of records, each with a
    7-byte header (CRC-32, little-endian length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4); a record that does
    not fit in a block is split; a block tail shorter than a header is zero-padded."""
    out = bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 0))
    for payload in records:
        first = True
        while True:
            left = block - len(out) % block
            if left < 7:
                out += b"\0" * left
                continue
            room = left - 7
            chunk, payload = payload[:room], payload[room:]
            kind = (1 if not payload else 2) if first else (4 if not payload else 3)
            out += struct.pack("<IHB", zlib.crc32(bytes([kind]) + chunk), len(chunk), kind) + chunk
            first = False
            if not payload:
                break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(out))


def _records(run_id: str, n_history: int, big: int = 0) -> list[bytes]:
    from wandb.proto import wandb_internal_pb2 as pb

    recs = [pb.Record(run=pb.RunRecord(run_id=run_id, config=pb.ConfigRecord(update=[
        pb.ConfigItem(key="optimizer", value_json='{"name": "adam", "lr": 0.001}'),
        pb.ConfigItem(key="blob", value_json='"' + "x" * big + '"')])))]
    for i in range(n_history):
        recs.append(pb.Record(history=pb.HistoryRecord(item=[
            pb.HistoryItem(key="_step", value_json=str(i)),
            pb.HistoryItem(key="train/loss", value_json=str(1 / (i + 1)))])))
    recs.append(pb.Record(summary=pb.SummaryRecord(update=[pb.SummaryItem(key="best/test/acc1", value_json="0.9")])))
    return [r.SerializeToString() for r in recs]


def test_wandb_reader_on_the_documented_format(tmp_path):
    """Records that span blocks (a 70 kB config) and many small ones across block boundaries read back."""
    from fisherbench.results.wandb_offline import read_run

    f = tmp_path / "run-abc.wandb"
    write_wandb_file(f, _records("abc", 3000, big=70_000))
    run = read_run(f)
    assert run["run_id"] == "abc" and run["config"]["optimizer"] == {"name": "adam", "lr": 0.001}
    assert len(run["config"]["blob"]) == 70_000
    assert len(run["history"]) == 3000 and run["history"][-1]["train/loss"] == pytest.approx(1 / 3000)
    assert run["summary"] == {"best/test/acc1": 0.9}


def test_wandb_command_prints_a_run(store, tmp_path, capsys):
    root, runs = store
    rid = runs["adam0"].run_id
    f = runs["adam0"].path / "wandb" / f"offline-run-20250101_000000-{rid}" / f"run-{rid}.wandb"
    write_wandb_file(f, _records(rid, 12))
    # an id, a unique prefix of it (as `show` takes), the run directory, the file
    for ref in (rid, rid[:6], str(runs["adam0"].path), str(f)):
        rc, out, _ = run_cli(capsys, "wandb", ref, "--store", str(root), "--history", "2")
        assert rc == 0 and out.splitlines()[0] == f"W&B run {rid}  ({f})"
        assert "history: 12 rows; the last 2:" in out and "  best/test/acc1: 0.9" in out
        assert out.rstrip().splitlines()[-1] == f"  train/loss={1 / 12}"
    script = subprocess.run([sys.executable, "-m", "fisherbench.results.wandb_offline", str(f), "--history", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert script.returncode == 0 and "history: 12 rows; the last 1:" in script.stdout
    bad = tmp_path / "bad.wandb"
    bad.write_bytes(b"not a wandb file")
    rc, _, err = run_cli(capsys, "wandb", str(bad))
    assert rc == 2 and "is not a W&B run file (bad header)" in err


def test_wandb_prefix_of_a_run_without_a_file(store, capsys):
    root, runs = store
    rc, _, err = run_cli(capsys, "wandb", runs["sgd0"].run_id[:6], "--store", str(root))
    assert rc == 2 and "no W&B run file" in err and runs["sgd0"].run_id in err  # resolved; it logged no W&B file


def test_best_groups_by_the_option_chosen(store, capsys):
    """`optimizer.name` is `adafisher` for every AdaFisher variant; the option chosen (`adafisher_paper`, recorded in
    meta.json) tells them apart, and is the default grouping of `best`."""
    import json

    root, _ = store
    for option, variant, reach in (("adafisher", "official", 2), ("adafisher_paper", "paper", 5)):
        rd = make_run(root, "a", "adafisher", 0, reach, lr={"official": 0.001, "paper": 0.002}[variant])
        meta = json.loads(rd.meta_path.read_text())
        rd.meta_path.write_text(json.dumps({**meta, "choices": {"optimizer": option, "model": "small_cnn"}}))
    rc, out, _ = run_cli(capsys, "best", "--store", str(root), "--metric", "final_test_acc1")
    groups = [line.split()[0] for line in out.splitlines()[3:]]
    assert rc == 0 and "adafisher" in groups and "adafisher_paper" in groups
    rc, out, _ = run_cli(capsys, "best", "--store", str(root), "--group-by", "optimizer.name")
    assert [line.split()[0] for line in out.splitlines()[3:]].count("adafisher") == 1  # merged by name
    # the same key filters `ls`
    rc, out, _ = run_cli(capsys, "ls", "--store", str(root), "--where", "optimizer=adafisher_paper")
    assert rc == 0 and "1 runs in" in out


def test_ls_shows_the_keys_that_tell_runs_apart(store, capsys):
    root, runs = store
    other = make_run(root, "a", "adam", 0, 3, lr=0.01)  # the same names and seed as adam0, another lr
    rc, out, _ = run_cli(capsys, "ls", "--store", str(root))
    header = out.splitlines()[0].split()
    assert rc == 0 and header[:6] == ["id", "model", "data", "optimizer", "optimizer.lr", "seed"]
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:9]}
    assert rows[other.run_id][4] == "0.01" and rows[runs["adam0"].run_id][4] == "0.001"
    rc, out, _ = run_cli(capsys, "ls", "--store", str(root), "--keys", "model.width,budget.steps")
    assert out.splitlines()[0].split()[4:7] == ["model.width", "budget.steps", "seed"]
