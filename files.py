"""files.py: the two file habits every coin script shares, in one place:
atomic writes and JSONL with line numbers.

A support module, torch-free so that perturb.py can use it too. Read it when a script first writes a file.

- `write_atomically`: a crash, a Ctrl-C or a full disk leaves the old file or the new one, never half of one,
  so a checkpoint, a results file or a training file can always be read back.
- `read_jsonl`: every non-blank line with its line number, so errors can say "path:line: reason and fix".
"""
import json
import os
from pathlib import Path


def write_atomically(path, content):
    """Write `content` beside `path`, then rename it over `path` (a rename within a folder is atomic).

    content: text, or a function that writes the file at the path it is given (safetensors, a PNG). The folder
    must exist. A failure removes the temporary file and leaves `path` as it was.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        content(tmp) if callable(content) else tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_jsonl(path):
    """Yield (line number, parsed value or None, JSON error or None) for each non-blank line of a JSONL file.

    Errors are yielded, not raised, so that a validator can report every bad line at once.
    """
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line), None
                except json.JSONDecodeError as e:
                    yield lineno, None, f"{e.msg} at column {e.colno}"
