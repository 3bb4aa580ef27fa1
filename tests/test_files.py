"""files.py: an atomic write leaves the old file or the new one, and JSONL lines keep their numbers."""
import os

import pytest

from files import read_jsonl, write_atomically


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "results.json"
    out.write_text("old")

    def write_half_then_fail(tmp):
        tmp.write_text("half of the new")
        raise KeyboardInterrupt  # as a Ctrl-C in the middle of a write
    with pytest.raises(KeyboardInterrupt):
        write_atomically(out, write_half_then_fail)
    assert out.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]
    write_atomically(out, "new")
    assert out.read_text() == "new" and os.listdir(tmp_path) == ["results.json"]


def test_jsonl_lines_keep_their_numbers_and_errors_are_yielded(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{oops\n[2]\n')
    error = "Expecting property name enclosed in double quotes at column 2"
    assert list(read_jsonl(path)) == [(1, {"a": 1}, None), (3, None, error), (4, [2], None)]
