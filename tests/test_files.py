"""files.py: an atomic write leaves the old file or the new one, JSONL lines keep their numbers, and a
literal is read out of a Python file without running it."""
import os
import re

import pytest

from files import read_jsonl, read_python_literal, write_atomically


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


def test_read_python_literal_parses_the_file_and_never_runs_it(tmp_path):
    marker = tmp_path / "ran.txt"
    path = tmp_path / "config.py"
    path.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n\n"
                    "def SETTINGS():\n    return 'a function, not the assignment'\n\n"
                    "OTHER = [1, -2.5]\n"
                    "SETTINGS = {'a': ['trailing space ', \"it's\"], 'b': (None, True), 3: {'x': 'y'}}\n"
                    "SETTINGS = 'a later assignment'\n")
    assert read_python_literal(path, "SETTINGS") == {"a": ["trailing space ", "it's"], "b": (None, True),
                                                    3: {"x": "y"}}  # the first top-level assignment
    assert read_python_literal(str(path), "OTHER") == [1, -2.5]
    assert not marker.exists()
    with pytest.raises(FileNotFoundError):
        read_python_literal(tmp_path / "missing.py", "SETTINGS")


@pytest.mark.parametrize("content, message", [
    ("OTHER = {}\n", r"PATH: no top-level `SETTINGS = \{\.\.\.\}` assignment: give the file that defines it"),
    ("def f():\n    SETTINGS = {}\n", r"PATH: no top-level `SETTINGS = "),  # in a function: not top-level
    ("X = {}\nSETTINGS = {'a': X}\n", r"PATH:2: SETTINGS is not a plain literal \(.+\): write it out as"),
    ("SETTINGS = dict(a=1)\n", r"PATH:1: SETTINGS is not a plain literal"),
    ("X = 1\nSETTINGS = {\n", r"PATH:2: not valid Python \(.+\): fix it or use an unmodified copy"),
    ("SETTINGS = {}\0\n", r"PATH(:\d+)?: not valid Python \(.*null bytes"),  # no line number, in 3.11
    (b"SETTINGS = '\xff'\n", r"PATH:1: byte 0xff is not UTF-8 text; save the file as UTF-8"),
])
def test_read_python_literal_errors_are_one_line_with_the_file_line_and_fix(tmp_path, content, message):
    path = tmp_path / "config.py"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as error:
        read_python_literal(path, "SETTINGS")
    assert re.match(message.replace("PATH", re.escape(str(path))), str(error.value))
    assert "\n" not in str(error.value)
