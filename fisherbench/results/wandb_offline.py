"""Read back a W&B offline run file (`run-<id>.wandb`) without a server.

The file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks
of records, each with a 7-byte header (CRC-32, 2-byte length, type FULL/FIRST/MIDDLE/LAST) whose payloads
concatenate into serialised `wandb_internal_pb2.Record` protobufs. wandb ships no public reader for these
files; tests use this one to check what the W&B logger wrote, and it prints a run:

    python fisherbench/results/wandb_offline.py runs/<run id>/wandb/offline-run-*/run-<run id>.wandb
    python -m fisherbench results wandb <run id> --store runs        # the same, found from the run id

To upload offline runs to a W&B server: `wandb sync runs/*/wandb/offline-run-*` (every run of a store).
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
import zlib
from pathlib import Path
from typing import Any, Iterator, Optional

from fisherbench.core.config import TrainConfig
from fisherbench.core.errors import UserError
from fisherbench.core.store import printable

FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: Path | str) -> Iterator[bytes]:
    """The record payloads of a run file; ValueError naming the file and the byte for anything malformed."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path} ({exc.strerror or exc})") from None
    if not data.startswith(FILE_HEADER):
        raise ValueError(f"{path} is not a W&B run file (bad header)")
    pos, pending = len(FILE_HEADER), b""
    while pos + 7 <= len(data):
        block_left = BLOCK - pos % BLOCK
        if block_left < 7:  # block trailer padding
            pos += block_left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length > block_left - 7:  # a record never crosses its block: the length field is garbled
            raise ValueError(f"{path} is damaged: a record at byte {pos} claims {length} bytes, past its block")
        payload = data[pos + 7 : pos + 7 + length]
        if (kind or length) and zlib.crc32(bytes([kind]) + payload) != crc:  # wandb's checksum: type byte + data
            raise ValueError(f"{path} is damaged: the record at byte {pos} fails its CRC-32 checksum")
        pos += 7 + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload
            pending = b""
        elif kind == 0 and length == 0:  # zero padding at the end of a block
            pos += block_left - 7
        else:
            raise ValueError(f"{path}: unknown record type {kind} at byte {pos}")


def read_run(path: Path | str) -> dict[str, Any]:
    """{"history": [ {key: value, ...} per log call ], "config": {...}, "summary": {...}, "run_id": str}.

    ValueError (naming the file and the record) for a damaged file: a record that is not a protobuf, a value
    that is not JSON, nested too deep; never a traceback from the decoder."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb  # lazy: wandb takes ~0.5 s to import

    out: dict[str, Any] = {"history": [], "config": {}, "summary": {}, "run_id": None}
    for number, blob in enumerate(raw_records(path)):
        rec = pb.Record()
        try:
            rec.ParseFromString(blob)
            _read_record(rec, out)
        except (DecodeError, ValueError, RecursionError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is damaged: record {number} does not decode ({type(exc).__name__}: "
                             f"{str(exc)[:200]})") from None
    return out


def _read_record(rec: Any, out: dict[str, Any]) -> None:
    """Add one decoded record (run, history, config or summary) to `out`."""
    which = rec.WhichOneof("record_type")
    if which == "run":
        out["run_id"] = rec.run.run_id
        for item in rec.run.config.update:
            out["config"][item.key] = json.loads(item.value_json)
    elif which == "history":
        out["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                               for item in rec.history.item})
    elif which == "config":
        for item in rec.config.update:
            out["config"][item.key] = json.loads(item.value_json)
    elif which == "summary":
        for item in rec.summary.update:
            out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)


def find_run_files(run_dir: Path | str) -> list[Path]:
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))


def resolve_run_files(ref: str, store: Optional[str] = None) -> list[Path]:
    """The run files named by `ref`: a run-*.wandb file, a run directory, or a run id in `store`."""
    p = Path(ref)
    if p.is_file():
        return [p]
    candidates = [p] if p.is_dir() else []
    if store is not None or not candidates:
        candidates.append(Path(store or TrainConfig.results_dir) / ref)
    for d in candidates:
        files = find_run_files(d)
        links = [f for f in files if f.is_symlink()]
        if links:  # a store's files are never links: someone planted it (reading it could show any file)
            raise UserError(f"{links[0]} is a symbolic link; the suite never writes one there and does not follow it")
        if files:
            return files
    looked = " and ".join(str(c / "wandb/offline-run-*/run-*.wandb") for c in candidates)
    raise UserError(f"no W&B run file for {ref!r} (looked for {looked}; runs write one with logger=wandb)")


def _short(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    text = printable(text, lines=False)  # values come from the file: no terminal control sequences
    return text if len(text) <= 100 else text[:97] + "..."


def print_run(path: Path | str, history: int = 5, out=None) -> None:
    """Print an offline run: id, config, summary and the last `history` rows of its history."""
    out = out or sys.stdout
    run = read_run(path)
    rows = run["history"]
    print(printable(f"W&B run {run['run_id']}  ({path})", lines=False), file=out)
    print(f"config ({len(run['config'])} keys):", file=out)
    for k, v in run["config"].items():
        print(f"  {printable(k, lines=False)}: {_short(v)}", file=out)
    print(f"summary ({len(run['summary'])} keys):", file=out)
    for k, v in sorted(run["summary"].items()):
        if not k.startswith("_"):
            print(f"  {printable(k, lines=False)}: {_short(v)}", file=out)
    print(f"history: {len(rows)} rows" + (f"; the last {min(history, len(rows))}:" if rows and history else ""),
          file=out)
    for row in rows[-history:] if history else []:
        print("  " + ", ".join(f"{printable(k, lines=False)}={_short(v)}" for k, v in row.items()
                               if not k.startswith("_")), file=out)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fisherbench.results.wandb_offline", description="Print an offline W&B run file.")
    p.add_argument("file", help="a run-*.wandb file, a run directory, or a run id (with --store)")
    p.add_argument("--store", default=None)
    p.add_argument("--history", type=int, default=5)
    args = p.parse_args(argv)
    try:
        for f in resolve_run_files(args.file, args.store):
            print_run(f, args.history)
    except (ValueError, OSError) as exc:  # UserError is a ValueError; a bad file raises ValueError too
        print(f"[results] {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
