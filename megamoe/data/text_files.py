"""Users' text files read line by line, so that what is wrong in one is named by file and line.

Python's own errors name neither: a ``UnicodeDecodeError`` gives a position in a buffer, and
``json.loads`` of one line always says "line 1".
"""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Data that cannot be used as given, with the file and line or the column that is wrong."""


def utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The lines of ``path`` (newline kept) with their 1-based numbers.

    Raises:
        DataError: a line is not UTF-8, naming the line and the byte offset in the file.
    """
    offset = 0
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                yield number, line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}:{number}: not UTF-8 text (byte {line[err.start]:#04x} at byte offset "
                    f"{offset + err.start}); save the file as UTF-8"
                ) from None
            offset += len(line)


def json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """Every non-blank line of ``path`` parsed as JSON, with its 1-based line number.

    Raises:
        DataError: a line is not UTF-8 or not JSON, naming the line (and the column, for JSON).
    """
    for number, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line.rstrip("\r\n"))  # else an error at the end is "column 1"
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not JSON ({err.msg}, column {err.colno})") from None
