"""Tables of reports, labels and results: one reader for .csv, .jsonl and .json, and one rule for row ids, shared
by batch generation and the metrics."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

from .errors import CTFlowError
from .io import read_text_file

ID_KEYS = ("id", "name", "VolumeName")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def read_table(path: str | os.PathLike) -> list[dict]:
    """Rows of a .csv (header line), .jsonl (one JSON object a line) or .json (an array of objects) file."""
    return [row for _, row in read_table_rows(path)]


def read_table_rows(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """(where, row) of each row of a table, where "line N" or "item N" names the row in messages."""
    path = Path(path)
    text = read_text_file(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # no cell is longer than its file
        reader = csv.DictReader(io.StringIO(text))
        try:
            return [(f"line {reader.line_num}", row) for row in reader]
        except csv.Error as exc:
            raise CTFlowError(f"{path} line {reader.line_num}: not CSV ({exc})") from exc
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CTFlowError(f"{path} line {exc.lineno}: not JSON ({exc.msg})") from exc
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise CTFlowError(f"{path} must hold a JSON array of objects")
        return [(f"item {number}", row) for number, row in enumerate(rows, start=1)]
    if suffix != ".jsonl":
        raise CTFlowError(f"unsupported table {path.name!r}: use .csv, .jsonl or .json")
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON text may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CTFlowError(f"{path} line {number}: not JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise CTFlowError(f"{path} line {number}: not a JSON object but a {type(row).__name__}")
        rows.append((f"line {number}", row))
    return rows


def safe_id(raw: str) -> str:
    """A report id usable in file names on every system (the labels of a metrics run are matched the same way)."""
    return _UNSAFE.sub("_", raw)


def row_id(row: dict, order: int) -> str:
    """A row's safe id: its id, name or VolumeName column, else its number in the table."""
    return safe_id(next((str(row[key]) for key in ID_KEYS if row.get(key) not in (None, "")), f"r{order:05d}"))
