"""The run's files: replaced whole or not at all, a cut-short last line repaired, a damaged
JSON file named with what to do, and every write failing as a full disk would on request."""

from __future__ import annotations

import errno
import os

import pytest

from idsnn_jax import faults, files


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "summary.json"
    files.write_json(str(path), {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'

    def half(f):
        f.write(b'{"a": ')
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        files.write_atomic(str(path), half)
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert os.listdir(tmp_path) == ["summary.json"]  # no temporary file left behind


def test_write_text_changed_leaves_an_equal_file_alone(tmp_path):
    path = tmp_path / "config.json"
    files.write_text(str(path), "same\n")
    os.utime(path, ns=(1, 1))
    files.write_text(str(path), "same\n", changed=True)
    assert path.stat().st_mtime_ns == 1
    files.write_text(str(path), "other\n", changed=True)
    assert path.read_text() == "other\n" and path.stat().st_mtime_ns != 1


def test_read_json_names_a_damaged_file_and_what_to_do(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"seed": 0,')
    with pytest.raises(ValueError) as err:
        files.read_json(str(path), "delete it to go on")
    assert str(err.value).startswith(f"{path} is not valid JSON (")
    assert str(err.value).endswith("; delete it to go on") and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "content, repaired, left",
    [
        (b'{"a": 1}\n{"b"', True, b'{"a": 1}\n'),
        (b'{"b"', True, b""),
        (b'{"a": 1}\n', False, b'{"a": 1}\n'),
        (b"", False, b""),
    ],
)
def test_repair_last_line(tmp_path, content, repaired, left):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(content)
    assert files.repair_last_line(str(path)) is repaired
    assert path.read_bytes() == left


@pytest.mark.parametrize("kind, code", [("ENOSPC", errno.ENOSPC), ("EROFS", errno.EROFS)])
def test_injected_write_error_names_the_file_and_changes_nothing(tmp_path, monkeypatch, kind, code):
    """`IDSNN_FAULT=write:2:<kind>`: the second write raises that OSError naming its path,
    before anything is written (the old content stays); other writes go through."""
    monkeypatch.setattr(faults, "_hits", faults.collections.Counter())
    monkeypatch.setenv(faults.ENV, f"write:2:{kind}")
    files.write_text(str(tmp_path / "a.txt"), "old")
    with pytest.raises(OSError) as err:
        files.write_text(str(tmp_path / "a.txt"), "new")
    assert (err.value.errno, err.value.filename) == (code, str(tmp_path / "a.txt"))
    assert (tmp_path / "a.txt").read_text() == "old"
    files.append_line(str(tmp_path / "m.jsonl"), "{}")
    assert (tmp_path / "m.jsonl").read_text() == "{}\n"
    monkeypatch.setenv(faults.ENV, "write:1:EIO")
    with pytest.raises(ValueError, match=r"IDSNN_FAULT='write:1:EIO' is invalid"):
        files.write_text(str(tmp_path / "a.txt"), "x")
