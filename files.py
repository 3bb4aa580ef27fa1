"""files.py: the file habits the coin scripts share, in one place: atomic writes, flushing to the disk, errors
that name their file, JSONL with line numbers, and reading a literal out of a Python file without running it.

A support module, torch-free so that perturb.py can use it too. Read it when a script first writes a file.

- `write_atomically`: a crash, a Ctrl-C or a full disk leaves the old file or the new one, never half of one,
  so a checkpoint, a results file or a training file can always be read back. `fsync` flushes a file or a
  folder's list of names to the disk.
- `naming`: the OSError of a write or a flush (a full disk: SPACE) names no file; inside `naming(path)` it
  names `path`, so that run_folder.py can say which file found no room.
- `read_text`, `read_json`, `read_jsonl`: what users hand us is read one way: UTF-8 with or without a
  byte-order mark, LF or CRLF; anything else, and every bad line, is an error that says "path:line: reason and
  fix". read_jsonl yields every non-blank line with its line number.
- `read_python_literal`: data that other projects ship as Python (FLAN's templates.py, PromptBench's
  config.py) is parsed with ast and never imported: the rest of such a file may be any code at all.
"""
import ast
import errno
import json
import os
from contextlib import contextmanager
from pathlib import Path

# A write that found no room: a full disk, a used-up quota, or a file past the size limit (ulimit -f).
SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def write_atomically(path, content):
    """Write `content` beside `path`, then rename it over `path` (a rename within a folder is atomic).

    content: text, bytes, or a function that writes the file at the path it is given (a PNG). The folder must
    exist. A failure removes the temporary file and leaves `path` as it was; an OSError names the file.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # processes writing the same file don't collide
    try:
        with naming(path):
            if callable(content):
                content(tmp)
            else:
                tmp.write_bytes(content) if isinstance(content, bytes) else tmp.write_text(content, "utf-8")
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def naming(path):
    """A context in which an OSError that names no file (a write's, a flush's, an fsync's) names `path`."""
    try:
        yield
    except OSError as e:
        e.filename = str(path) if e.filename is None else e.filename
        raise


def fsync(path):
    """Flush a file, or a folder's list of names, from the page cache to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with naming(path):
            os.fsync(fd)
    finally:
        os.close(fd)


def read_text(path):
    """The text of a UTF-8 file. A byte-order mark (editors and spreadsheet exports write one) is dropped and
    CRLF line ends read as LF; a directory, or bytes that are not UTF-8, is a ValueError naming the path (and
    line) and the fix; a missing file is a FileNotFoundError."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: a directory, not a file; give the file's path")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: byte {data[e.start]:#04x} is not UTF-8 text; "
                         "save the file as UTF-8") from None


def read_json(path):
    """The value in a JSON file (read as read_text does); bad JSON is a ValueError naming the line."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not JSON ({e.msg} at column {e.colno}); fix the file") from None


def read_jsonl(path):
    """Yield (line number, parsed value or None, JSON error or None) for each non-blank line of a JSONL file
    (read as read_text does). Errors are yielded, not raised, so a validator can report every bad line."""
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if line.strip():
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as e:
                yield lineno, None, f"{e.msg} at column {e.colno}"


def read_python_literal(path, name):
    """The value of the first top-level `name = <literal>` of a Python file, which is parsed, never run.

    A ValueError says "path:line: reason: fix" when the file is not valid Python, has no such assignment, or
    assigns something other than a plain literal (a call, a name, a comprehension). A missing file raises
    FileNotFoundError.
    """
    path = Path(path)
    try:
        tree = ast.parse(read_text(path), filename=str(path))
    except SyntaxError as e:  # a null byte is a SyntaxError without a line number
        line = f":{e.lineno}" if getattr(e, "lineno", None) else ""
        raise ValueError(f"{path}{line}: not valid Python ({getattr(e, 'msg', e)}): "
                         "fix it or use an unmodified copy of the file") from None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            try:
                return ast.literal_eval(node.value)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}:{node.lineno}: {name} is not a plain literal ({e}): "
                                 "write it out as literals only, with no names or calls") from None
    raise ValueError(f"{path}: no top-level `{name} = {{...}}` assignment: give the file that defines it")
