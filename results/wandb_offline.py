"""Read back a W&B offline run file (`run-<id>.wandb`) without a server.

The file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks
of records, each with a 7-byte header (CRC-32, 2-byte length, type FULL/FIRST/MIDDLE/LAST) whose payloads
concatenate into serialised `wandb_internal_pb2.Record` protobufs. wandb ships no public reader for these
files; tests use this one to check what the W&B logger wrote.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: Path | str) -> Iterator[bytes]:
    data = Path(path).read_bytes()
    if not data.startswith(FILE_HEADER):
        raise ValueError(f"{path} is not a W&B run file (bad header)")
    pos, pending = len(FILE_HEADER), b""
    while pos + 7 <= len(data):
        block_left = BLOCK - pos % BLOCK
        if block_left < 7:  # block trailer padding
            pos += block_left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
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
    """{"history": [ {key: value, ...} per log call ], "config": {...}, "summary": {...}, "run_id": str}."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict[str, Any] = {"history": [], "config": {}, "summary": {}, "run_id": None}
    for blob in raw_records(path):
        rec = pb.Record()
        rec.ParseFromString(blob)
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
    return out


def find_run_files(run_dir: Path | str) -> list[Path]:
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
