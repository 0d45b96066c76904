"""Read what W&B offline mode wrote (`run-<id>.wandb`), with no W&B server.

Hand-written because wandb ≥0.2x no longer ships a Python reader for its transaction
log: the file is a LevelDB-style log (7-byte file header ":W&B" + magic + version, then
32 KiB blocks of records, each with a 7-byte header: crc32, length, type FULL/FIRST/
MIDDLE/LAST) whose payloads are `wandb_internal_pb2.Record` protobufs. A file whose writer
was killed (SIGKILL, OOM) ends in a torn record: reading stops before it.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any, Iterator, Optional

BLOCK = 32768
FILE_HEADER = struct.Struct("<4sHB")
RECORD_HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_payloads(path: Path | str) -> Iterator[bytes]:
    """Yield each record's bytes, reassembling records split across blocks."""
    raw = Path(path).read_bytes()
    ident, _magic, _version = FILE_HEADER.unpack_from(raw, 0)
    if ident != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log")
    pos, parts = FILE_HEADER.size, []
    while pos + RECORD_HEADER.size <= len(raw):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < RECORD_HEADER.size:  # zero padding at the end of a block
            pos += left_in_block
            continue
        _crc, length, kind = RECORD_HEADER.unpack_from(raw, pos)
        pos += RECORD_HEADER.size
        if kind == 0 and length == 0:  # zero fill: rest of the block is empty
            pos += left_in_block - RECORD_HEADER.size
            continue
        chunk = raw[pos : pos + length]
        if len(chunk) < length:  # a torn tail: the writer was killed mid-record
            return
        pos += length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            parts = [chunk]
        elif kind == MIDDLE:
            parts.append(chunk)
        elif kind == LAST:
            parts.append(chunk)
            yield b"".join(parts)
            parts = []


def read_offline_run(path: Path | str, wait_for_exit: float = 0.0) -> dict[str, Any]:
    """{run: {id, group, job_type, tags, name}, config, history: [rows], summary} of one run file.

    W&B's service process writes the file asynchronously, so right after `finish()` it may
    not be complete yet: `wait_for_exit` seconds re-reads until the exit record is there.
    """
    deadline = time.monotonic() + wait_for_exit
    while True:
        out = _read_once(path)
        if out["exit_code"] is not None or time.monotonic() >= deadline:
            return out
        time.sleep(0.2)


def _read_once(path: Path | str) -> dict[str, Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict[str, Any] = {"run": {}, "config": {}, "history": [], "summary": {}, "exit_code": None}

    def key(item: Any) -> str:
        return item.key or "/".join(item.nested_key)

    for payload in iter_payloads(path):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out["run"] = {
                "id": r.run_id, "group": r.run_group, "job_type": r.job_type,
                "tags": list(r.tags), "name": r.display_name, "project": r.project,
                "start_ns": r.start_time.ToNanoseconds(),
            }
            if r.HasField("branch_point"):  # resume_from/fork_from: where this segment continues its run
                bp = r.branch_point
                out["run"]["branch_point"] = {"run": bp.run, "metric": bp.metric, "value": bp.value}
            for item in r.config.update:
                out["config"][key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                out["config"][key(item)] = json.loads(item.value_json)
        elif kind == "history":
            out["history"].append({key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            for item in rec.summary.update:
                out["summary"][key(item)] = json.loads(item.value_json)
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out


def find_offline_runs(run_dir: Path | str) -> list[Path]:
    """Every `run-*.wandb` under a run dir's wandb/ folder, oldest first."""
    return sorted(Path(run_dir).glob("wandb/*run-*/run-*.wandb"))


def merged_history(run_dir: Path | str, wait_for_exit: float = 0.0, run_id: Optional[str] = None) -> list[dict[str, Any]]:
    """The history a W&B server shows for the run in `run_dir` once its segments are synced:
    each segment that rewinds its run (`resume_from="<id>?_step=N"`: a branch point on `_step`
    of the same run) first drops the rows after step N, then appends its own.

    `run_id`: whose segments (default: the run of the newest segment; a run dir that started
    over holds the segments of an earlier run too)."""
    rows: list[dict[str, Any]] = []
    segments = [read_offline_run(p, wait_for_exit=wait_for_exit) for p in find_offline_runs(run_dir)]
    segments = sorted(segments, key=lambda seg: seg["run"].get("start_ns", 0))  # in the order they ran
    if run_id is None and segments:
        run_id = segments[-1]["run"].get("id")
    for seg in segments:
        if seg["run"].get("id") != run_id:
            continue
        bp = seg["run"].get("branch_point")
        if bp and bp["metric"] == "_step" and bp["run"] == run_id:
            rows = [r for r in rows if r.get("_step", 0) <= bp["value"]]
        rows += seg["history"]
    return rows
