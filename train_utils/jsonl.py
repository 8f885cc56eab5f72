"""JSON-lines files of a run (``metrics.jsonl``, ``iterations.jsonl``): the one reader and writer.

Rule for a damaged line: a last line without its newline is an append cut short (a crash or a
preemption during the write, or a run still writing) and is skipped; any other line that is not a
JSON object raises ValueError naming the file and the line. Blank lines are skipped.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of ``path`` (none when it does not exist), under the module's rule."""
    return [record for _, record in numbered_records(path)]


def numbered_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number from 1, record) of each record of ``path``, under the module's rule."""
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")
    if lines[-1]:  # no newline after the last line: an unfinished append
        lines = lines[:-1]
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {number}: damaged, not a JSON record ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number}: damaged, not a JSON record (a {type(record).__name__})")
        records.append((number, record))
    return records


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace ``path`` with ``records``, one line each, atomically (a temporary file renamed)."""
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
