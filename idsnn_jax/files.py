"""The run's own files (JSON, text, PNG), written so that a crash never leaves half of one.

Every file a run rewrites goes through `write_atomic`: the new content is written to a
temporary file beside it and renamed over it (`os.replace`, atomic on POSIX), so a reader, or
the rerun after a crash, sees the old file or the new one, never a mix. `metrics.jsonl`, the
one file that grows, is appended a line at a time (`append_line`); a line cut short by a
crash is repaired when the file is next opened (`repair_last_line`). Every write passes
`faults.write_point`, so tests can make any of them fail as a full disk would.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any, BinaryIO

from idsnn_jax import faults


def write_atomic(path: str, write: Callable[[BinaryIO], Any]) -> None:
    """Writes `path` through `write(file)` into a temporary file in the same directory, then
    renames it over `path`. On any error the old file (if any) is left as it was."""
    faults.write_point(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str, *, changed: bool = False) -> None:
    """`write_atomic` of `text` (UTF-8); with `changed`, only if the file holds other text."""
    data = text.encode()
    if changed and os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read() == data:
                return
    write_atomic(path, lambda f: f.write(data))


def write_json(path: str, value: Any) -> None:
    """`write_atomic` of `value` as indented JSON with a final newline."""
    write_text(path, json.dumps(value, indent=2) + "\n")


def read_json(path: str, what: str) -> Any:
    """The JSON value in `path`; a damaged file raises ValueError naming it and `what` to do."""
    with open(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {what}") from None


def append_line(path: str, line: str) -> None:
    """Appends `line` and a newline to `path` (created if missing), flushed to disk."""
    faults.write_point(path)
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def repair_last_line(path: str) -> bool:
    """Cuts a last line without its newline (a write cut short) off `path`; True if it did."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return False
        f.truncate(data.rfind(b"\n") + 1)
    return True
