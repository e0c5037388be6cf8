"""Reading one line of a JSON Lines file, the same way everywhere (prompt files, training data)."""
from __future__ import annotations

import json
from typing import Any


def json_type(value: Any) -> str:
    """How a JSON value's type reads in an error message."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def parse_json_line(raw: bytes | str, first_line: bool = False) -> dict | None:
    """One line -> its JSON object, or None for a blank line.

    Raises ValueError with a short reason; the caller adds where (file and line number)."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"not valid UTF-8 (byte {e.start})") from None
    if first_line:
        raw = raw.removeprefix("\ufeff")  # a BOM some editors write; not part of the JSON
    if not raw.strip():
        return None
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {json_type(record)}")
    return record
