"""
Operator files in JSON: read, parse and check, every problem one line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def load_json_file(path: str, what: str, parse: Callable[[object], T]) -> T:
    """
    parse(the JSON of the file at path); any problem is a ValueError whose
    message is one sentence naming what the file is and its path.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"Cannot read the {what} {path}: {e.strerror}.") from e
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"The {what} {path} is not valid JSON: {e}.") from e
    try:
        return parse(data)
    except ValueError as e:
        raise ValueError(f"The {what} {path} is wrong: {e}") from e
